"""What ``evolve``, ``sweep`` and the benchmarks share: the manifest and its stage runner, the
task's records and evaluation prompts, cleaning, and a round's generate and features steps.

**Manifest and stages.** A run folder's ``manifest.json`` holds its config and every finished
stage: a hash of the stage's inputs, when it finished, its seconds and its stats.
:meth:`Manifest.run` runs a stage unless the manifest holds it with the same inputs and its
outputs exist; a stage is recorded only after its outputs are written (atomically), so an
interrupted run resumes at the first unfinished stage. Fault injection
(:mod:`evoray.faults`, off unless its environment variables are set) is consulted around every
stage.

**Cleaning** (:func:`clean_pool`) drops invalid records, exact duplicates (normalised prompt and
response, or id) and candidates whose prompt is an evaluation prompt (:func:`eval_prompts`: the
targets', dev's and test's, normalised by :func:`normal_text`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from datetime import UTC, datetime

from evoray.config import Config, config_to_dict
from evoray.data.io import detect_format, write_records
from evoray.data.records import validate_record
from evoray.errors import EvorayError, RecordError
from evoray.faults import from_env
from evoray.storage import atomic_write_bytes, exists, read_bytes
from evoray.tasks import KINDS  # the simulated generator's candidate kinds (``meta.kind``)

__all__ = ["MANIFEST_VERSION", "Manifest", "digest", "file_digest", "versions", "normal_text",
           "eval_prompts", "clean_pool", "mix", "task_records", "generate_inputs",
           "generate_pool", "features_inputs", "featurize_round", "select_inputs"]

log = logging.getLogger(__name__)
# Version 2: stage inputs through :mod:`evoray.stages` (features keyed by value settings only,
# selection by the method's own settings); a manifest of another version is refused.
MANIFEST_VERSION = 2



def digest(*parts) -> str:
    """A stage's input hash: SHA-256 of the parts as sorted JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | None) -> str | None:
    """SHA-256 of a file's bytes (None for no file)."""
    return hashlib.sha256(read_bytes(path)).hexdigest() if path else None


class Manifest:
    """``<run_dir>/manifest.json``: the run's config and its finished stages."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir.rstrip("/")
        self.path = f"{self.run_dir}/manifest.json"
        self.faults = from_env()
        self.data = {"version": MANIFEST_VERSION, "config": None, "stages": {}}
        if exists(self.path):
            try:
                self.data = json.loads(read_bytes(self.path))
            except json.JSONDecodeError as e:
                raise EvorayError(f"{self.path}: not valid JSON ({e.msg}, line {e.lineno}); "
                                  "move it away to start the run afresh") from None
            if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
                raise EvorayError(f"{self.path}: not an evoray manifest (expected an object with "
                                  "a 'stages' object); move it away to start the run afresh")
            if self.data.get("version") != MANIFEST_VERSION:
                raise EvorayError(
                    f"{self.path}: made by another evoray (manifest version "
                    f"{self.data.get('version')!r}, this one writes {MANIFEST_VERSION}), whose "
                    "stage hashes differ; start a new run (or sweep) folder")

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def save(self) -> None:
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=2) + "\n").encode())

    def done(self, key: str, inputs_digest: str, outputs: list[str]) -> dict | None:
        entry = self.stages.get(key)
        if entry and entry["inputs"] == inputs_digest and all(exists(o) for o in outputs):
            return entry
        return None

    def record(self, key: str, inputs_digest: str, seconds: float, stats: dict) -> dict:
        entry = {"inputs": inputs_digest,
                 "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                 "seconds": round(seconds, 3), "stats": stats}
        self.stages[key] = entry
        self.save()
        return entry

    def run(self, key: str, inputs, outputs: list[str], fn, *, say=print,
            label: str = "[evolve]", changed: str | None = None) -> tuple[str, dict]:
        """Run ``fn() -> stats`` unless this manifest holds ``key`` with these ``inputs`` and
        every path of ``outputs`` exists; record it; return ``(inputs digest, stats)``.

        ``changed``: when given, a recorded ``key`` with other inputs is an error that ends with
        this hint (a sweep's shared stages must not change under finished trials) instead of a
        rerun.
        """
        d = digest(key, inputs)
        entry = self.stages.get(key)
        if changed and entry and entry["inputs"] != d:
            raise EvorayError(f"{self.path}: stage '{key}' was made with other settings; "
                              f"{changed}")
        entry = self.done(key, d, outputs)
        if entry is not None:
            say(f"{label} {key}: done earlier, skipped")
            return d, entry["stats"]
        t0 = time.perf_counter()
        with self.faults.running(key, self.run_dir):
            stats = fn() or {}
        entry = self.record(key, d, time.perf_counter() - t0, stats)
        shown = ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, int | float | str))
        say(f"{label} {key}: {shown or 'done'} ({entry['seconds']:.1f} s)")
        self.faults.recorded(key)
        return d, stats


def versions() -> dict:
    """Installed versions of evoray and the libraries whose behaviour a run depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("evoray", "torch", "ray", "transformers", "peft", "pot", "faiss-cpu",
                 "faiss-gpu", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


# -- the task and cleaning ----------------------------------------------------------------------

def normal_text(text: str) -> str:
    """Lower-cased, whitespace-collapsed text: how cleaning compares prompts and responses."""
    return " ".join(text.lower().split())


def eval_prompts(*records: list[dict]) -> set[str]:
    """The normalised prompts of evaluation records (targets, dev, test): what cleaning drops."""
    return {normal_text(r["prompt"]) for recs in records for r in recs}


def task_records(cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """``(targets, dev, test)``: the user's files (``evolve.targets``, ``.dev``, ``.test``; dev and
    test may be absent: empty lists) or the built-in task's splits (``evolve.task``,
    ``seed``)."""
    from evoray.data import read_records

    ev = cfg.evolve
    if ev.targets:
        return (read_records(ev.targets, "target"),
                read_records(ev.dev, "mcq") if ev.dev else [],
                read_records(ev.test, "mcq") if ev.test else [])
    from evoray.tasks import make_splits, split_records

    splits = make_splits(ev.task, cfg.seed)
    targets, dev, test = (split_records(splits, s) for s in ("val", "dev", "test"))
    return targets, dev, test


def _raw_records(path: str) -> tuple[list[tuple[object, int]], int]:
    """Every record of a JSONL or Parquet file with its line/row, and the count of lines that are
    not JSON at all (those are dropped as invalid)."""
    data = read_bytes(path)
    if detect_format(path) == "jsonl":
        out, bad = [], 0
        for n, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if raw.strip():
                try:
                    out.append((json.loads(raw), n))
                except json.JSONDecodeError:
                    bad += 1
        return out, bad
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    for rec in rows:
        if isinstance(rec.get("meta"), str):
            try:
                rec["meta"] = json.loads(rec["meta"])
            except json.JSONDecodeError:
                rec["meta"] = None
        for key in [k for k, v in rec.items() if v is None]:
            del rec[key]
    return [(rec, n) for n, rec in enumerate(rows, start=1)], 0


def clean_pool(path: str, out: str, prompts: set[str]) -> dict:
    """Write the usable candidates of ``path`` to ``out`` and return the counts dropped.

    Dropped, in this order: records that fail validation (``invalid``; the first reason is
    logged), exact duplicates by normalised (lower-cased, whitespace-collapsed) prompt and
    response, or by id (``duplicates``; the first is kept), and candidates whose normalised prompt
    is in ``prompts`` (``contaminated``; see :func:`eval_prompts`).

    Raises:
        EvorayError: no candidate is left.
    """
    records, invalid = _raw_records(path)
    unit = "line" if detect_format(path) == "jsonl" else "row"
    kept, seen_ids, seen_pairs = [], set(), set()
    dup = contaminated = 0
    first_error = None
    for rec, n in records:
        try:
            rec = validate_record(rec, "candidate", path=path, **{unit: n})
        except RecordError as e:
            invalid += 1
            first_error = first_error or str(e)
            continue
        pair = hashlib.sha256(f"{normal_text(rec['prompt'])}\x00{normal_text(rec['response'])}"
                              .encode()).digest()
        if rec["id"] in seen_ids or pair in seen_pairs:
            dup += 1
            continue
        seen_ids.add(rec["id"])
        seen_pairs.add(pair)
        if normal_text(rec["prompt"]) in prompts:
            contaminated += 1
            continue
        kept.append(rec)
    if first_error:
        log.warning("%d invalid candidate(s) dropped; the first: %s", invalid, first_error)
    stats = {"invalid": invalid, "duplicates": dup, "contaminated": contaminated,
             "kept": len(kept)}
    stats = {"generated": sum(stats.values()), **stats}
    if not kept:
        raise EvorayError(f"{path}: no candidate left after cleaning ({stats})")
    write_records(kept, out, "candidate")
    return stats


def mix(records: list[dict]) -> dict | None:
    """The share of each candidate kind (``meta.kind``) among ``records``; None when a record
    has no kind (a generator other than the simulated one)."""
    kinds = [(r.get("meta") or {}).get("kind") for r in records]
    if not records or any(k is None for k in kinds):
        return None
    counts = collections.Counter(kinds)
    return {k: counts[k] / len(records) for k in sorted(set(KINDS) | set(counts))}


# -- a round's generate and features steps ------------------------------------------------------

def generate_inputs(cfg: Config, r: int, targets_digest: str, *, proxy_digest: str | None = None,
                    prev_generate: str | None = None) -> list:
    """What round ``r``'s candidates depend on: the generate section, task, seed, round, targets;
    the proxy model when a model generator uses the evolving model; the previous round's draw
    for the ``pool`` generator (it excludes what earlier rounds drew)."""
    gen = cfg.generate
    inputs = [config_to_dict(gen), cfg.evolve.task, cfg.seed, r, targets_digest]
    if gen.kind in ("hf", "vllm") and gen.model is None:
        inputs += [cfg.model, proxy_digest]
    if gen.kind == "pool":
        inputs.append(prev_generate)
    return inputs


def generate_pool(cfg: Config, r: int, targets: list[dict], out: str, *,
                  adapter: str | None = None, exclude_ids: set | None = None) -> dict:
    """Round ``r``'s candidates into ``out`` (seed ``generate.seed + r``); the generator's stats."""
    from evoray.generate import RoundContext, make_generator

    ctx = RoundContext(round=r, seed=cfg.generate.seed + r, targets=targets, model=cfg.model,
                       adapter=adapter, cache_dir=cfg.cache_dir, exclude_ids=exclude_ids or set())
    return make_generator(cfg.generate, task=cfg.evolve.task, split_seed=cfg.seed).generate(
        ctx, out)


def features_inputs(cfg: Config, clean_digest: str, targets_digest: str, *,
                    proxy_digest: str | None = None, adam_digest: str | None = None) -> list:
    """What a round's features depend on: the cleaned pool, the targets, the model, the features
    settings that change a value (:func:`evoray.features.key.value_settings`), the proxy's
    training and the Adam state's."""
    from evoray.features.key import value_settings

    return [clean_digest, targets_digest, cfg.model, value_settings(cfg.features), proxy_digest,
            adam_digest]


def featurize_round(cfg: Config, clean: str, targets: str, out_pool: str, out_targets: str, *,
                    proxy: str | None = None, adam_state: str | None = None,
                    proxy_name: str = "base + fresh LoRA") -> dict:
    """Features of the cleaned pool and of the targets with the same proxy (``proxy``: an adapter
    folder; None = the base model with a fresh seeded LoRA)."""
    from evoray.features.stage import featurize

    featurize(clean, cfg.model, proxy, cfg.features, out=out_pool, adam_state=adam_state,
              cache_dir=cfg.cache_dir)
    featurize(targets, cfg.model, proxy, cfg.features, out=out_targets, kind="target",
              cache_dir=cfg.cache_dir)
    return {"proxy": proxy_name}


def select_inputs(cfg: Config) -> dict:
    """What a selection depends on: method, budget, seed and the method's own settings (not the
    settings of the other selectors)."""
    sel = cfg.select
    return {"method": sel.method, "ratio": sel.ratio, "k": sel.k, "seed": sel.seed,
            **sel.method_params()}
