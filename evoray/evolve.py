"""The EvoSelect loop: generate → clean → featurize → select → train → evaluate, round after round.

:func:`evolve` runs ``evolve.rounds`` rounds and writes everything under ``evolve.run_dir`` (a
local path or a pyarrow filesystem URI such as ``s3://bucket/run``)::

    run_dir/
      manifest.json              config, and every finished stage: input hash, time, seconds, stats
      task/                      targets.jsonl, dev.jsonl, test.jsonl (built-in task only)
      base/metrics.json          the base model on the test set (round 0)
      round_01/
        pool.jsonl               the generator's candidates
        clean.jsonl              after dropping invalid records, exact duplicates and candidates
                                 whose prompt is a val/dev/test prompt (counts in the manifest)
        features/pool/           gradient features of clean.jsonl (proxy: see below)
        features/targets/        gradient features of the targets, same proxy
        selection/               selected.parquet, summary.json, scores.parquet, selected.jsonl
        train.jsonl              the training data, when evolve.replay adds earlier selections
        adapter/                 the LoRA adapter after this round (continues the previous one)
        metrics.json             test accuracy and loss, counts, the selection's make-up
      round_02/ ...

**Proxy.** Round r's features come from the model after round r-1 (base + its adapter); round 1
uses the base with a fresh seeded LoRA. ``evolve.fixed_proxy`` keeps round 1's proxy in every round.

**Resume.** A stage is recorded in ``manifest.json`` (written atomically) only after its outputs
are written, with a hash of its inputs: its config section and the hashes of the stages it reads.
``resume=True`` skips every stage whose record matches and whose outputs exist, and runs the rest;
a changed setting reruns the stages it reaches and everything downstream. Without ``resume`` a run
folder that already holds a manifest is refused, so nothing is overwritten by mistake.

**Determinism.** Every stage is seeded (generator: ``generate.seed + round``; the features
projection, selection and training have their own seeds), so on CPU an interrupted run resumed
with ``resume=True`` ends with the same selections as an uninterrupted one.

``EVORAY_FAIL_AFTER=round_01/select`` makes the loop stop with an error right after that stage is
recorded (for fault tests and for trying resume by hand). ``EVORAY_KILL_AT=<stage>:<when>`` kills
the driver process with SIGKILL instead, as a crash or the OOM killer would: ``before`` the stage
runs, ``after`` it is recorded, or ``during`` it: after the first optimizer step taken in the
driver's process (in-process training), or as soon as a temporary output (``*.tmp-XXXXXXXX``, a
features folder being written) appears under the run folder. Temporary outputs left by a killed
driver are removed when the run starts again.

**Evaluation** uses the test file only (accuracy and response loss, ALGORITHMS.md §4); ``dev`` is
kept in the task folder for hyper-parameter sweeps.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from datetime import UTC, datetime

from evoray.config import Config, config_to_dict
from evoray.data.io import detect_format, write_records
from evoray.data.records import validate_record
from evoray.errors import EvorayError, RecordError
from evoray.storage import atomic_write_bytes, exists, read_bytes, resolve

__all__ = ["evolve", "clean_pool", "normal_text", "Manifest", "round_dir", "FAIL_ENV", "KILL_ENV",
           "KINDS"]

log = logging.getLogger(__name__)

FAIL_ENV = "EVORAY_FAIL_AFTER"
KILL_ENV = "EVORAY_KILL_AT"
_KILL_WHEN = ("before", "during", "after")
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")  # the atomic writers' temporary names
KINDS = ("clean", "wrong_label", "off_task", "near_duplicate")


def round_dir(run_dir: str, r: int) -> str:
    return f"{run_dir.rstrip('/')}/round_{r:02d}"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: str | None) -> str | None:
    return hashlib.sha256(read_bytes(path)).hexdigest() if path else None


def _temporaries(run_dir: str) -> list:
    """Temporary outputs of evoray's atomic writers under ``run_dir``: ``FileInfo`` entries."""
    import pyarrow.fs as pafs

    fs, root = resolve(run_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if _TEMPORARY.search(i.path.rstrip("/"))]


def _remove_temporaries(run_dir: str) -> None:
    """Remove what a killed driver left under temporary names (partial files and folders; no
    final name ever holds them)."""
    import pyarrow.fs as pafs

    fs, _ = resolve(run_dir)
    gone: list[str] = []
    for info in _temporaries(run_dir):
        if any(info.path.startswith(g + "/") for g in gone):
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(info.path)
        gone.append(info.path.rstrip("/"))
        log.warning("removed %s, a partial output left by an interrupted run", info.path)


def _kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _kill_midway(run_dir: str):
    """SIGKILL this process from inside a stage (``EVORAY_KILL_AT=<stage>:during``): after the
    first optimizer step taken in this process, or once a temporary output appears under
    ``run_dir``, whichever comes first."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(lambda *_: _kill_now())
    done = threading.Event()

    def watch():
        while not done.wait(0.02):
            if _temporaries(run_dir):
                _kill_now()

    threading.Thread(target=watch, daemon=True, name="evoray-kill-at").start()
    try:
        yield
    finally:
        done.set()
        hook.remove()


class Manifest:
    """``run_dir/manifest.json``: the run's config and its finished stages."""

    def __init__(self, run_dir: str):
        self.path = f"{run_dir.rstrip('/')}/manifest.json"
        self.data = {"version": 1, "config": None, "stages": {}}
        if exists(self.path):
            try:
                self.data = json.loads(read_bytes(self.path))
            except json.JSONDecodeError as e:
                raise EvorayError(f"{self.path}: not valid JSON ({e.msg}, line {e.lineno}); "
                                  "move it away to start the run afresh") from None
            if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
                raise EvorayError(f"{self.path}: not an evoray manifest (expected an object with "
                                  "a 'stages' object); move it away to start the run afresh")

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def save(self) -> None:
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=2) + "\n").encode())

    def done(self, key: str, digest: str, outputs: list[str]) -> dict | None:
        entry = self.stages.get(key)
        if entry and entry["inputs"] == digest and all(exists(o) for o in outputs):
            return entry
        return None

    def record(self, key: str, digest: str, seconds: float, stats: dict) -> dict:
        entry = {"inputs": digest, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                 "seconds": round(seconds, 3), "stats": stats}
        self.stages[key] = entry
        self.save()
        return entry


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("evoray", "torch", "ray", "transformers", "peft", "pot", "faiss-cpu",
                 "faiss-gpu", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def normal_text(text: str) -> str:
    """Lower-cased, whitespace-collapsed text: how cleaning compares prompts and responses."""
    return " ".join(text.lower().split())


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


def clean_pool(path: str, out: str, eval_prompts: set[str]) -> dict:
    """Write the usable candidates of ``path`` to ``out`` and return the counts dropped.

    Dropped, in this order: records that fail validation (``invalid``; the first reason is
    logged), exact duplicates by normalised (lower-cased, whitespace-collapsed) prompt and
    response, or by id (``duplicates``; the first is kept), and candidates whose normalised prompt
    is a val/dev/test prompt (``contaminated``).

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
        if normal_text(rec["prompt"]) in eval_prompts:
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


def _mix(records: list[dict]) -> dict | None:
    kinds = [(r.get("meta") or {}).get("kind") for r in records]
    if not records or any(k is None for k in kinds):
        return None
    counts = collections.Counter(kinds)
    return {k: counts[k] / len(records) for k in sorted(set(KINDS) | set(counts))}


class _Loop:
    def __init__(self, cfg: Config, resume: bool, say, progress: bool):
        self.cfg, self.say = cfg, say
        self.run = cfg.evolve.run_dir.rstrip("/")
        self.manifest = Manifest(self.run)
        if self.manifest.stages and not resume:
            raise EvorayError(f"{self.run} already holds a run ({self.manifest.path}); pass "
                              "--resume to continue it, or set evolve.run_dir to a new folder")
        self.manifest.data["config"] = config_to_dict(cfg)
        self.manifest.data["versions"] = _versions()
        self.fail_after = os.environ.get(FAIL_ENV)
        self.kill_at = None
        if os.environ.get(KILL_ENV):
            key, _, when = os.environ[KILL_ENV].rpartition(":")
            if not key or when not in _KILL_WHEN:
                raise EvorayError(f"{KILL_ENV}={os.environ[KILL_ENV]!r}: expected "
                                  f"<stage>:<{'|'.join(_KILL_WHEN)}>, e.g. round_01/train:during")
            self.kill_at = (key, when)
        self.progress = progress
        ev = cfg.evolve
        self.eval_kw = {"max_length": cfg.train.max_length, "cache_dir": cfg.cache_dir,
                        "num_actors": ev.eval_actors, "num_gpus": ev.eval_gpus,
                        "device": "cuda" if ev.eval_gpus > 0 else "cpu", "limit": ev.test_size}

    def stage(self, key: str, inputs, outputs: list[str], fn) -> tuple[str, dict]:
        """Run ``fn() -> stats`` unless the manifest holds ``key`` with these inputs; return
        ``(digest, stats)``."""
        digest = _digest(key, inputs)
        entry = self.manifest.done(key, digest, outputs)
        if entry is not None:
            self.say(f"[evolve] {key}: done earlier, skipped")
            return digest, entry["stats"]
        kill = self.kill_at[1] if self.kill_at and self.kill_at[0] == key else None
        if kill == "before":
            _kill_now()
        t0 = time.perf_counter()
        with _kill_midway(self.run) if kill == "during" else contextlib.nullcontext():
            stats = fn() or {}
        entry = self.manifest.record(key, digest, time.perf_counter() - t0, stats)
        shown = ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, int | float | str))
        self.say(f"[evolve] {key}: {shown or 'done'} ({entry['seconds']:.1f} s)")
        if kill == "after":
            _kill_now()
        if self.fail_after == key:
            raise EvorayError(f"injected failure after {key} ({FAIL_ENV}); rerun with --resume")
        return digest, stats

    # -- inputs shared by every round -------------------------------------------------------

    def task_files(self) -> dict[str, str | None]:
        ev = self.cfg.evolve
        if ev.targets:
            return {"targets": ev.targets, "dev": ev.dev, "test": ev.test}
        from evoray.tasks import make_splits, split_records

        folder = f"{self.run}/task"
        paths = {name: f"{folder}/{name}.jsonl" for name in ("targets", "dev", "test")}
        paths = {**paths, **{k: v for k, v in (("dev", ev.dev), ("test", ev.test)) if v}}

        def write():
            splits = make_splits(ev.task, self.cfg.seed)
            kinds = {"targets": ("val", "target"), "dev": ("dev", "mcq"), "test": ("test", "mcq")}
            for name, (split, kind) in kinds.items():
                if paths[name].startswith(folder):
                    write_records(split_records(splits, split), paths[name], kind)
            return {"task": ev.task, **{k: len(splits.splits[s]) for k, (s, _) in kinds.items()}}

        self.stage("task", [ev.task, self.cfg.seed], list(paths.values()), write)
        return paths

    # -- one round --------------------------------------------------------------------------

    def round(self, r: int, files: dict, eval_prompts: set[str], prev: dict | None) -> dict:
        from evoray.data import read_records
        from evoray.features.stage import featurize
        from evoray.generate import RoundContext, make_generator
        from evoray.select.io import select_files
        from evoray.train import evaluate, train

        cfg, rd = self.cfg, round_dir(self.run, r)
        prev_adapter = prev["adapter"] if prev else None
        prev_train = prev["train_digest"] if prev else None
        gen = cfg.generate
        # -- generate
        pool = f"{rd}/pool.jsonl"
        gen_inputs = [config_to_dict(gen), cfg.evolve.task, cfg.seed, r, files["targets_hash"]]
        if gen.kind in ("hf", "vllm") and gen.model is None:
            gen_inputs += [cfg.model, prev_train]
        if gen.kind == "pool":
            gen_inputs.append(prev["generate_digest"] if prev else None)

        def generate():
            exclude = set()
            if gen.kind == "pool":
                for q in range(1, r):
                    exclude |= {x["id"] for x in read_records(f"{round_dir(self.run, q)}"
                                                               "/pool.jsonl", "candidate")}
            ctx = RoundContext(round=r, seed=gen.seed + r, targets=files["target_records"],
                               model=cfg.model, adapter=prev_adapter, cache_dir=cfg.cache_dir,
                               exclude_ids=exclude)
            return make_generator(gen, task=cfg.evolve.task, split_seed=cfg.seed).generate(
                ctx, pool)

        gen_digest, _ = self.stage(f"round_{r:02d}/generate", gen_inputs, [pool], generate)
        # -- clean
        clean = f"{rd}/clean.jsonl"
        clean_digest, clean_stats = self.stage(
            f"round_{r:02d}/clean", [gen_digest, files["eval_hash"]], [clean],
            lambda: clean_pool(pool, clean, eval_prompts))
        # -- features
        proxy = None if (cfg.evolve.fixed_proxy or prev is None) else prev_adapter
        adam = (f"{prev_adapter}/adam_state.safetensors"
                if cfg.features.adam and prev_adapter else None)
        fpool, ftargets = f"{rd}/features/pool", f"{rd}/features/targets"
        feat_inputs = [clean_digest, files["targets_hash"], cfg.model,
                       config_to_dict(cfg.features), None if proxy is None else prev_train,
                       adam is not None and prev_train]

        def features():
            featurize(clean, cfg.model, proxy, cfg.features, out=fpool, adam_state=adam,
                      cache_dir=cfg.cache_dir)
            featurize(files["targets"], cfg.model, proxy, cfg.features, out=ftargets,
                      kind="target", cache_dir=cfg.cache_dir)
            return {"proxy": "base + fresh LoRA" if proxy is None else f"round {r - 1} model"}

        feat_digest, _ = self.stage(f"round_{r:02d}/features", feat_inputs,
                                    [f"{fpool}/meta.json", f"{ftargets}/meta.json"], features)
        # -- select
        sel_dir = f"{rd}/selection"

        def select():
            summary, sel, feats = select_files(cfg.select, fpool, ftargets, sel_dir, pool=clean)
            return {"method": cfg.select.method, "selected": summary["selected"],
                    "of": len(feats)}

        sel_digest, _ = self.stage(f"round_{r:02d}/select", [feat_digest,
                                                            config_to_dict(cfg.select)],
                                   [f"{sel_dir}/selected.jsonl", f"{sel_dir}/scores.parquet"],
                                   select)
        selected = f"{sel_dir}/selected.jsonl"
        # -- train
        adapter = f"{rd}/adapter"
        data = selected
        if cfg.evolve.replay and r > 1:
            data = f"{rd}/train.jsonl"
        train_inputs = [sel_digest, prev_train, config_to_dict(cfg.train), cfg.model,
                        prev["replay_digests"] if (cfg.evolve.replay and prev) else None]

        def do_train():
            if data != selected:
                records = []
                for q in range(1, r + 1):
                    records += read_records(f"{round_dir(self.run, q)}/selection/selected.jsonl",
                                            "candidate")
                write_records(records, data, "candidate")
            tcfg = cfg.train
            if tcfg.storage_path is None and tcfg.num_workers > 0:
                tcfg = dataclasses.replace(tcfg, storage_path=f"{self.run}/ray_train")
            res = train(data, cfg.model, init_adapter=prev_adapter, cfg=tcfg, out=adapter,
                        name=f"round_{r:02d}-{train_digest[:10]}", cache_dir=cfg.cache_dir,
                        progress=self.progress)
            return {"examples": res.n_examples, "steps": res.metrics.get("step"),
                    "loss": round(float(res.metrics.get("loss", float("nan"))), 4),
                    "skipped": len(res.skipped)}

        train_digest = _digest(f"round_{r:02d}/train", train_inputs)
        train_digest, train_stats = self.stage(f"round_{r:02d}/train", train_inputs,
                                               [f"{adapter}/adapter_config.json"], do_train)
        # -- evaluate
        metrics_path = f"{rd}/metrics.json"

        def do_evaluate():
            m = {"round": r}
            if files["test"]:
                res = evaluate(cfg.model, adapter, files["test"], **self.eval_kw)
                m.update(accuracy=res["accuracy"], loss=res["loss"], n_test=res["n"],
                         per_subtask=res["per_subtask"])
            picked = read_records(selected, "candidate")
            cleaned = read_records(clean, "candidate")
            seconds = {k.split("/")[1]: v["seconds"] for k, v in self.manifest.stages.items()
                       if k.startswith(f"round_{r:02d}/")}
            m.update(n_generated=clean_stats["generated"], n_clean=len(cleaned),
                     n_selected=len(picked), clean_stats=clean_stats, mix=_mix(picked),
                     pool_mix=_mix(cleaned), train=train_stats, seconds=seconds)
            atomic_write_bytes(metrics_path, (json.dumps(m, indent=2) + "\n").encode())
            return {k: round(m[k], 4) for k in ("accuracy", "loss") if k in m}

        self.stage(f"round_{r:02d}/evaluate", [train_digest, files["test_hash"]],
                   [metrics_path], do_evaluate)
        replay = (prev["replay_digests"] if prev else []) + [sel_digest]
        return {"adapter": adapter, "train_digest": train_digest, "generate_digest": gen_digest,
                "replay_digests": replay,
                "metrics": json.loads(read_bytes(metrics_path))}

    def base(self, files: dict) -> dict | None:
        if not files["test"]:
            return None
        from evoray.train import evaluate

        path = f"{self.run}/base/metrics.json"

        def do_evaluate():
            res = evaluate(self.cfg.model, None, files["test"], **self.eval_kw)
            m = {"round": 0, "accuracy": res["accuracy"], "loss": res["loss"], "n_test": res["n"],
                 "per_subtask": res["per_subtask"]}
            atomic_write_bytes(path, (json.dumps(m, indent=2) + "\n").encode())
            return {"accuracy": round(m["accuracy"], 4), "loss": round(m["loss"], 4)}

        self.stage("base/evaluate", [self.cfg.model, files["test_hash"]], [path], do_evaluate)
        return json.loads(read_bytes(path))


def format_table(rows: list[dict]) -> str:
    """The per-round table: accuracy, loss, counts and the selection's make-up."""
    head = (f"{'round':>5} {'accuracy':>8} {'loss':>6} {'pool':>5} {'clean':>5} {'picked':>6}"
            f" {'clean%':>6} {'wrong%':>6} {'off%':>5} {'dup%':>5}")
    lines = [head]
    for m in rows:
        acc = f"{m['accuracy']:.3f}" if m.get("accuracy") is not None else "-"
        loss = f"{m['loss']:.3f}" if m.get("loss") is not None else "-"
        mix = m.get("mix") or {}
        shares = " ".join(f"{100 * mix[k]:>{w}.0f}" if k in mix else f"{'-':>{w}}"
                          for k, w in (("clean", 6), ("wrong_label", 6), ("off_task", 5),
                                       ("near_duplicate", 5)))
        lines.append(f"{m['round']:>5} {acc:>8} {loss:>6} {m.get('n_generated', '-'):>5} "
                     f"{m.get('n_clean', '-'):>5} {m.get('n_selected', '-'):>6} {shares}")
    return "\n".join(lines)


def evolve(cfg: Config, *, resume: bool = False, say=print, progress: bool = True) -> dict:
    """Run ``cfg.evolve.rounds`` rounds of the loop; see the module docstring for the layout.

    Args:
        cfg: the job's config (``evolve``, ``generate``, ``features``, ``select``, ``train``).
        resume: continue the run in ``cfg.evolve.run_dir``, skipping finished stages.
        say: prints a line as each stage ends, and the final table.
        progress: training also prints a line every tenth of its steps.

    Returns:
        ``{"run_dir", "base": base metrics or None, "rounds": [metrics of each round]}``.

    Raises:
        EvorayError: a run already exists there without ``resume``; a stage's own errors (bad
            records, a wrong adapter, an empty pool after cleaning), each naming its input.
    """
    from evoray.data import read_records
    from evoray.ray_utils import init_ray

    if cfg.trust_remote_code:
        from evoray.models import allow_remote_code

        allow_remote_code()
    loop = _Loop(cfg, resume, say, progress)
    _remove_temporaries(loop.run)
    loop.manifest.save()
    files = loop.task_files()
    files["target_records"] = read_records(files["targets"], "target")
    files["targets_hash"] = _file_digest(files["targets"])
    files["test_hash"] = _file_digest(files["test"])
    if cfg.evolve.test_size and files["test"]:  # scoring fewer items is another evaluation
        files["test_hash"] = _digest(files["test_hash"], cfg.evolve.test_size)
    eval_prompts = {normal_text(r["prompt"]) for r in files["target_records"]}
    for name in ("dev", "test"):
        if files[name]:
            eval_prompts |= {normal_text(r["prompt"]) for r in read_records(files[name], "mcq")}
    files["eval_hash"] = _digest(sorted(eval_prompts))
    say(f"[evolve] {cfg.evolve.rounds} round(s) of {cfg.generate.kind} candidates "
        f"({cfg.generate.pool_size} a round), {cfg.select.method} selection, model "
        f"{cfg.model!r} -> {loop.run}")
    started = init_ray()
    try:
        base = loop.base(files)
        rounds, prev = [], None
        for r in range(1, cfg.evolve.rounds + 1):
            prev = loop.round(r, files, eval_prompts, prev)
            rounds.append(prev["metrics"])
    finally:
        if started:
            import ray

            ray.shutdown()
    say(format_table(([base] if base else []) + rounds))
    return {"run_dir": loop.run, "base": base, "rounds": rounds}
