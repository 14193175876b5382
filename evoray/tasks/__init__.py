"""Built-in targeted tasks (train/val/dev/test splits) and the simulated candidate generator.

:func:`write_task` writes one family's files into a folder:

==================  ===========  =========================================================
file                record kind  what
==================  ===========  =========================================================
``pool.<fmt>``      candidate    the simulated generator's pool (``--generator`` preset)
``targets.<fmt>``   target       the ``val`` split: the few dozen target examples
``dev.<fmt>``       mcq          for choosing hyper-parameters
``test.<fmt>``      mcq          for reporting only (at least 500 items)
``train.<fmt>``     candidate    clean on-task examples (a reference, never a pool)
``task.json``       -            family, seed, preset, sizes and the pool's mix
==================  ===========  =========================================================
"""

from __future__ import annotations

import json

from evoray.data.io import write_records
from evoray.storage import atomic_write_bytes
from evoray.tasks.families import FAMILIES, LETTERS, Family, Question, to_prompt
from evoray.tasks.simulate import (
    KINDS,
    PRESETS,
    SPLIT_SIZES,
    TaskSplits,
    get_family,
    make_splits,
    mix_counts,
    simulate_pool,
)

__all__ = ["FAMILIES", "KINDS", "PRESETS", "SPLIT_SIZES", "Family", "Question", "TaskSplits",
           "get_family", "make_splits", "mix_counts", "simulate_pool", "split_records",
           "write_task"]


def split_records(splits: TaskSplits, name: str) -> list[dict]:
    """Records of one split: ``val`` as target records, ``dev``/``test`` as MCQ items,
    ``train`` as clean candidate records. Wordings cycle through the family's variants."""
    fam = get_family(splits.family)
    out = []
    for i, q in enumerate(splits.splits[name]):
        rid = f"{fam.name}-{name}-{i:05d}"
        prompt = to_prompt(fam.render(q, i % fam.n_variants), q.options)
        meta = {"qkey": q.qkey, "task": fam.name}
        if name in ("dev", "test"):
            out.append({"id": rid, "prompt": prompt, "choices": list(LETTERS),
                        "answer": q.answer, "subtask": q.subtask, "meta": meta})
        elif name == "val":
            out.append({"id": rid, "prompt": prompt, "response": q.answer,
                        "subtask": q.subtask, "meta": meta})
        else:
            out.append({"id": rid, "prompt": prompt, "response": q.answer,
                        "source": f"task:{fam.name}",
                        "meta": {**meta, "kind": "clean", "subtask": q.subtask,
                                 "correct": q.answer}})
    return out


def write_task(task: str, out_dir: str, *, pool_size: int = 2000, generator: str = "weak",
               seed: int = 0, fmt: str = "jsonl",
               sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Write a task's splits and a simulated pool into ``out_dir``; return ``{name: path}``.

    The same arguments give byte-identical files.
    """
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}")
    splits = make_splits(task, seed, sizes)
    pool = simulate_pool(splits, pool_size, generator, seed)
    base = out_dir.rstrip("/")
    files = {"pool": (pool, "candidate"), "targets": (split_records(splits, "val"), "target"),
             "dev": (split_records(splits, "dev"), "mcq"),
             "test": (split_records(splits, "test"), "mcq"),
             "train": (split_records(splits, "train"), "candidate")}
    paths = {}
    for name, (records, kind) in files.items():
        paths[name] = f"{base}/{name}.{fmt}"
        write_records(records, paths[name], kind)
    summary = {"task": task, "seed": seed, "generator": generator, "pool_size": pool_size,
               "mix": mix_counts(pool_size, PRESETS[generator]),
               "sizes": {name: len(recs) for name, (recs, _) in files.items()}}
    paths["task"] = f"{base}/task.json"
    atomic_write_bytes(paths["task"], (json.dumps(summary, indent=2) + "\n").encode())
    return paths
