"""Deterministic splits of a task family, and the simulated candidate generator.

:func:`make_splits` draws distinct questions (by ``qkey``) for ``test``, ``dev``, ``val`` and
``train``, in that order, from ``random.Random(f"evoray:{family}:{seed}:splits")``: the same seed
gives the same splits whatever else is generated.

:func:`simulate_pool` writes a candidate pool with an exact mix of kinds (shares rounded by
largest remainder, so 2,000 candidates of ``weak`` hold exactly 700 clean, 400 wrong-label,
500 off-task and 400 near-duplicates):

* ``clean``: a new on-task question with the right letter;
* ``wrong_label``: a new on-task question with one of the wrong letters (noise);
* ``off_task``: a question of another family (uniformly chosen), right letter for that family;
* ``near_duplicate``: an earlier on-task candidate (clean or wrong-label) reworded and/or with
  another number format; same options, same ``qkey``, and the original's letter, right or wrong.

New on-task questions never share a ``qkey`` with ``val``, ``dev`` or ``test`` or with each
other. Every candidate keeps ``meta.kind``, ``meta.qkey``, ``meta.task``, ``meta.subtask``,
``meta.correct`` (the right letter) and, for near-duplicates, ``meta.dup_of``. Selectors never
read ``meta``; benchmarks score selections with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from evoray.errors import ConfigError, did_you_mean
from evoray.tasks.families import FAMILIES, LETTERS, Family, Question, to_prompt

__all__ = ["PRESETS", "KINDS", "SPLIT_SIZES", "TaskSplits", "make_splits", "simulate_pool",
           "mix_counts", "get_family"]

KINDS = ("clean", "wrong_label", "off_task", "near_duplicate")
PRESETS: dict[str, dict[str, float]] = {
    "weak": {"clean": 0.35, "wrong_label": 0.20, "off_task": 0.25, "near_duplicate": 0.20},
    "strong": {"clean": 0.75, "wrong_label": 0.05, "off_task": 0.10, "near_duplicate": 0.10},
}
SPLIT_SIZES = {"test": 500, "dev": 200, "val": 40, "train": 1000}
_STYLES = ("plain", "comma", "padded")


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown task {name!r}{did_you_mean(name, FAMILIES)}")
    return FAMILIES[name]


@dataclass
class TaskSplits:
    """The questions of each split of one family, and the keys a pool must avoid."""

    family: str
    seed: int
    splits: dict[str, list[Question]]

    @property
    def reserved(self) -> set[str]:
        """qkeys of ``val``, ``dev`` and ``test``: never emitted by a generator."""
        return {q.qkey for s in ("val", "dev", "test") for q in self.splits[s]}


def _distinct(fam: Family, rng: random.Random, n: int, avoid: set[str]) -> list[Question]:
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ConfigError(f"task {fam.name!r} ran out of distinct questions after {len(out)} "
                              f"of {n}; ask for fewer")
        q = fam.sample(rng)
        if q.qkey not in avoid:
            avoid.add(q.qkey)
            out.append(q)
    return out


def make_splits(family: str, seed: int = 0, sizes: dict[str, int] | None = None) -> TaskSplits:
    """Distinct questions for ``test``, ``dev``, ``val`` and ``train`` (sizes: ``SPLIT_SIZES``)."""
    fam = get_family(family)
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    rng = random.Random(f"evoray:{family}:{seed}:splits")
    used: set[str] = set()
    splits = {name: _distinct(fam, rng, sizes[name], used) for name in ("test", "dev", "val",
                                                                          "train")}
    return TaskSplits(family, seed, splits)


def mix_counts(n: int, shares: dict[str, float]) -> dict[str, int]:
    """Exact counts summing to ``n`` (largest remainder, ties in ``KINDS`` order)."""
    raw = {k: shares[k] * n for k in KINDS}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(KINDS, key=lambda k: -(raw[k] - counts[k]))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _record(cid: str, q: Question, stem: str, letter: str, kind: str, source: str,
            extra: dict | None = None) -> dict:
    meta = {"kind": kind, "qkey": q.qkey, "task": q.family, "subtask": q.subtask,
            "correct": q.answer, **(extra or {})}
    return {"id": cid, "prompt": to_prompt(stem, q.options), "response": letter,
            "source": source, "meta": meta}


def simulate_pool(splits: TaskSplits, n: int, preset: str = "weak", seed: int = 0,
                  id_prefix: str | None = None) -> list[dict]:
    """A pool of ``n`` candidate records for ``splits.family`` with ``PRESETS[preset]``'s mix.

    Deterministic in ``(splits, n, preset, seed)``.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown generator preset {preset!r}{did_you_mean(preset, PRESETS)}")
    if n <= 0:
        raise ConfigError(f"pool size must be positive, got {n}")
    fam = get_family(splits.family)
    others = [f for name, f in FAMILIES.items() if name != fam.name]
    rng = random.Random(f"evoray:{fam.name}:{splits.seed}:{preset}:{seed}:pool")
    counts = mix_counts(n, PRESETS[preset])
    kinds = [k for k in KINDS for _ in range(counts[k])]
    rng.shuffle(kinds)
    first = next((i for i, k in enumerate(kinds) if k in ("clean", "wrong_label")), None)
    if first is None and counts["near_duplicate"]:
        kinds[kinds.index("near_duplicate")] = "clean"  # a near-duplicate needs an original
        first = kinds.index("clean")
    if first:
        kinds.insert(0, kinds.pop(first))  # an original comes before any near-duplicate
    fresh = iter(_distinct(fam, rng, counts["clean"] + counts["wrong_label"] + 1,
                           set(splits.reserved)))
    prefix = id_prefix or f"{fam.name}-{preset}-s{seed}"
    source = f"simulated:{preset}"
    pool: list[dict] = []
    originals: list[tuple[dict, Question, int]] = []
    for i, kind in enumerate(kinds):
        cid = f"{prefix}-{i:06d}"
        if kind in ("clean", "wrong_label"):
            q, variant = next(fresh), rng.randrange(fam.n_variants)
            letter = q.answer if kind == "clean" else rng.choice(
                [c for c in LETTERS if c != q.answer])
            rec = _record(cid, q, fam.render(q, variant), letter, kind, source)
            originals.append((rec, q, variant))
        elif kind == "off_task":
            other = rng.choice(others)
            q = other.sample(rng)
            rec = _record(cid, q, other.render(q, rng.randrange(other.n_variants)), q.answer,
                          kind, source)
        else:
            orig, q, variant = rng.choice(originals)
            stem = fam.render(q, variant)
            while stem == fam.render(q, variant):  # another wording or number format
                stem = fam.render(q, rng.randrange(fam.n_variants), rng.choice(_STYLES))
            rec = _record(cid, q, stem, orig["response"], kind, source, {"dup_of": orig["id"]})
        pool.append(rec)
    return pool
