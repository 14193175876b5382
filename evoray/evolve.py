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
        proxy.json               the proxy's accuracy and loss AUC on the targets, and whether
                                 both are at chance (docs/algorithms.md §6; also in metrics.json)
        features/pool/           gradient features of clean.jsonl (proxy: see below); none
                                 when select.method reads no features (random)
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

Fault injection for tests and for trying resume by hand (``EVORAY_FAIL_AFTER``,
``EVORAY_KILL_AT``): :mod:`evoray.faults`. Temporary outputs left by a killed driver are removed
when the run starts again. The manifest, the stage runner, cleaning and the round's generate and
features steps are :mod:`evoray.stages`, shared with the sweep.

**Evaluation** uses the test file only (accuracy and response loss, docs/algorithms.md §5);
``dev`` is kept in the task folder for hyper-parameter sweeps.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from evoray.config import Config, config_to_dict
from evoray.data.io import write_records
from evoray.errors import EvorayError
from evoray.select.api import FEATURE_FREE
from evoray.stages import (
    Manifest,
    clean_pool,
    digest,
    eval_prompts,
    features_inputs,
    featurize_round,
    file_digest,
    generate_inputs,
    generate_pool,
    mix,
    select_inputs,
    task_records,
    versions,
)
from evoray.storage import atomic_write_bytes, read_bytes, remove_temporaries

__all__ = ["evolve", "round_dir", "format_table"]

log = logging.getLogger(__name__)


def round_dir(run_dir: str, r: int) -> str:
    return f"{run_dir.rstrip('/')}/round_{r:02d}"


class _Loop:
    def __init__(self, cfg: Config, resume: bool, say, progress: bool):
        self.cfg, self.say = cfg, say
        self.run = cfg.evolve.run_dir.rstrip("/")
        self.manifest = Manifest(self.run)
        if self.manifest.stages and not resume:
            raise EvorayError(f"{self.run} already holds a run ({self.manifest.path}); pass "
                              "--resume to continue it, or set evolve.run_dir to a new folder")
        self.manifest.data["config"] = config_to_dict(cfg)
        self.manifest.data["versions"] = versions()
        self.progress = progress
        ev = cfg.evolve
        self.eval_kw = {"max_length": cfg.train.max_length, "cache_dir": cfg.cache_dir,
                        "num_actors": ev.eval_actors, "num_gpus": ev.eval_gpus,
                        "device": "cuda" if ev.eval_gpus > 0 else "cpu", "limit": ev.test_size}

    def stage(self, key: str, inputs, outputs: list[str], fn) -> tuple[str, dict]:
        return self.manifest.run(key, inputs, outputs, fn, say=self.say)

    # -- inputs shared by every round -------------------------------------------------------

    def task_files(self) -> dict[str, str | None]:
        ev = self.cfg.evolve
        if ev.targets:
            return {"targets": ev.targets, "dev": ev.dev, "test": ev.test}
        folder = f"{self.run}/task"
        paths = {name: f"{folder}/{name}.jsonl" for name in ("targets", "dev", "test")}
        paths = {**paths, **{k: v for k, v in (("dev", ev.dev), ("test", ev.test)) if v}}

        def write():  # the built-in task's splits, where the config gives no file
            records = dict(zip(("targets", "dev", "test"), task_records(self.cfg), strict=True))
            kinds = {"targets": "target", "dev": "mcq", "test": "mcq"}
            for name, kind in kinds.items():
                if paths[name].startswith(folder):
                    write_records(records[name], paths[name], kind)
            return {"task": ev.task, **{k: len(v) for k, v in records.items()}}

        self.stage("task", [ev.task, self.cfg.seed], list(paths.values()), write)
        return paths

    # -- one round --------------------------------------------------------------------------

    def round(self, r: int, files: dict, prompts: set[str], prev: dict | None) -> dict:
        from evoray.data import read_records

        cfg, rd = self.cfg, round_dir(self.run, r)
        prev_adapter = prev["adapter"] if prev else None
        prev_train = prev["train_digest"] if prev else None
        # -- generate
        pool = f"{rd}/pool.jsonl"
        gen_inputs = generate_inputs(cfg, r, files["targets_hash"], proxy_digest=prev_train,
                                     prev_generate=prev["generate_digest"] if prev else None)

        def generate():
            exclude = set()
            if cfg.generate.kind == "pool":
                for q in range(1, r):
                    exclude |= {x["id"] for x in read_records(f"{round_dir(self.run, q)}"
                                                               "/pool.jsonl", "candidate")}
            return generate_pool(cfg, r, files["target_records"], pool, adapter=prev_adapter,
                                 exclude_ids=exclude)

        gen_digest, _ = self.stage(f"round_{r:02d}/generate", gen_inputs, [pool], generate)
        # -- clean
        clean = f"{rd}/clean.jsonl"
        clean_digest, clean_stats = self.stage(
            f"round_{r:02d}/clean", [gen_digest, files["eval_hash"]], [clean],
            lambda: clean_pool(pool, clean, prompts))
        # -- the proxy's competence on the targets (docs/algorithms.md §6)
        proxy_path = self.proxy_check(r, files, prev)
        # -- features (none for a method that reads none: random), then select
        sel_dir = f"{rd}/selection"
        if cfg.select.method in FEATURE_FREE:
            def pick():
                from evoray.select.io import select_pool

                return select_pool(cfg.select, clean, sel_dir)[0]

            read_digest = clean_digest
        else:
            read_digest, fpool, ftargets = self.features(r, clean, clean_digest, files, prev)

            def pick():
                from evoray.select.io import select_files

                return select_files(cfg.select, fpool, ftargets, sel_dir, pool=clean)[0]

        def select():
            summary = pick()
            return {"method": cfg.select.method, "selected": summary["selected"],
                    "of": summary["diagnostics"]["n"]}

        sel_digest, _ = self.stage(f"round_{r:02d}/select", [read_digest, select_inputs(cfg)],
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
            from evoray.train import train

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
                        progress=self.progress, targets=files["target_records"])
            stop = {k: res.early_stop[k] for k in ("best_epoch", "stopped_epoch")} \
                if res.early_stop else {}
            return {"examples": res.n_examples, "steps": res.metrics.get("step"),
                    "loss": round(float(res.metrics.get("loss", float("nan"))), 4),
                    "skipped": len(res.skipped), **stop}

        train_digest = digest(f"round_{r:02d}/train", train_inputs)
        train_digest, train_stats = self.stage(f"round_{r:02d}/train", train_inputs,
                                               [f"{adapter}/adapter_config.json"], do_train)
        # -- evaluate
        metrics_path = f"{rd}/metrics.json"

        def do_evaluate():
            from evoray.train import evaluate

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
                     n_selected=len(picked), clean_stats=clean_stats, mix=mix(picked),
                     pool_mix=mix(cleaned), train=train_stats, seconds=seconds,
                     proxy=json.loads(read_bytes(proxy_path)))
            atomic_write_bytes(metrics_path, (json.dumps(m, indent=2) + "\n").encode())
            return {k: round(m[k], 4) for k in ("accuracy", "loss") if k in m}

        self.stage(f"round_{r:02d}/evaluate", [train_digest, files["test_hash"]],
                   [metrics_path], do_evaluate)
        replay = (prev["replay_digests"] if prev else []) + [sel_digest]
        return {"adapter": adapter, "train_digest": train_digest, "generate_digest": gen_digest,
                "replay_digests": replay,
                "metrics": json.loads(read_bytes(metrics_path))}

    def proxy_adapter(self, prev: dict | None) -> str | None:
        """Round r's proxy: the previous round's adapter, or None (the base model; a fresh LoRA
        changes nothing until trained) in round 1 and with ``evolve.fixed_proxy``."""
        return None if (self.cfg.evolve.fixed_proxy or prev is None) else prev["adapter"]

    def proxy_check(self, r: int, files: dict, prev: dict | None) -> str:
        """Round r's proxy (the model that computes its features) on the targets: accuracy as
        multiple-choice questions and loss AUC, written to ``round_NN/proxy.json`` and the
        manifest; one warning line when both are at chance."""
        from evoray.lora import load_with_adapter
        from evoray.train.competence import AT_CHANCE_MESSAGE, competence

        cfg, path = self.cfg, f"{round_dir(self.run, r)}/proxy.json"
        proxy = self.proxy_adapter(prev)

        def check():
            model, tok = load_with_adapter(cfg.model, proxy, cache_dir=cfg.cache_dir)
            m = competence(model, tok, files["target_records"],
                           max_length=cfg.train.max_length, device=self.eval_kw["device"])
            m["proxy"] = "base model" if proxy is None else f"round {r - 1} model"
            atomic_write_bytes(path, (json.dumps(m, indent=2) + "\n").encode())
            if m["at_chance"]:
                log.warning("round %d: %s", r, AT_CHANCE_MESSAGE.format(**m))
            return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                    if k in ("accuracy", "auc", "n", "at_chance")}

        inputs = [cfg.model, files["targets_hash"], cfg.train.max_length,
                  None if proxy is None else prev["train_digest"]]
        self.stage(f"round_{r:02d}/proxy", inputs, [path], check)
        return path

    def features(self, r: int, clean: str, clean_digest: str, files: dict,
                 prev: dict | None) -> tuple[str, str, str]:
        """Round r's features stage (proxy: the previous round's model); returns its digest and
        the pool's and the targets' feature folders."""
        cfg, rd = self.cfg, round_dir(self.run, r)
        prev_adapter = prev["adapter"] if prev else None
        prev_train = prev["train_digest"] if prev else None
        proxy = self.proxy_adapter(prev)
        adam = (f"{prev_adapter}/adam_state.safetensors"
                if cfg.features.adam and prev_adapter else None)
        fpool, ftargets = f"{rd}/features/pool", f"{rd}/features/targets"
        feat_inputs = features_inputs(cfg, clean_digest, files["targets_hash"],
                                      proxy_digest=None if proxy is None else prev_train,
                                      adam_digest=prev_train if adam else None)
        feat_digest, _ = self.stage(
            f"round_{r:02d}/features", feat_inputs,
            [f"{fpool}/meta.json", f"{ftargets}/meta.json"],
            lambda: featurize_round(cfg, clean, files["targets"], fpool, ftargets, proxy=proxy,
                                    adam_state=adam, proxy_name="base + fresh LoRA" if proxy
                                    is None else f"round {r - 1} model"))
        return feat_digest, fpool, ftargets

    def base(self, files: dict, known: dict | None = None) -> dict | None:
        """Round 0: the base model on the test set; ``known`` (another run's round 0) is
        copied instead when it was measured on the same model, test set and length."""
        if not files["test"]:
            return None
        from evoray.train import evaluate

        path = f"{self.run}/base/metrics.json"
        same = {"model": self.cfg.model, "test_hash": files["test_hash"],
                "max_length": self.cfg.train.max_length}

        def do_evaluate():
            if known and all(known.get(k) == v for k, v in same.items()):
                m = known
            else:
                res = evaluate(self.cfg.model, None, files["test"], **self.eval_kw)
                m = {"round": 0, "accuracy": res["accuracy"], "loss": res["loss"],
                     "n_test": res["n"], "per_subtask": res["per_subtask"], **same}
            atomic_write_bytes(path, (json.dumps(m, indent=2) + "\n").encode())
            return {"accuracy": round(m["accuracy"], 4), "loss": round(m["loss"], 4)}

        self.stage("base/evaluate", [self.cfg.model, files["test_hash"]], [path], do_evaluate)
        return json.loads(read_bytes(path))


def format_table(rows: list[dict]) -> str:
    """The per-round table: accuracy, loss, the proxy's accuracy and loss AUC on the targets
    (``p.acc``, ``p.AUC``), counts and the selection's make-up."""
    head = (f"{'round':>5} {'accuracy':>8} {'loss':>6} {'p.acc':>5} {'p.AUC':>5} {'pool':>5} "
            f"{'clean':>5} {'picked':>6} {'clean%':>6} {'wrong%':>6} {'off%':>5} {'dup%':>5}")
    lines = [head]
    for m in rows:
        acc = f"{m['accuracy']:.3f}" if m.get("accuracy") is not None else "-"
        loss = f"{m['loss']:.3f}" if m.get("loss") is not None else "-"
        mix = m.get("mix") or {}
        shares = " ".join(f"{100 * mix[k]:>{w}.0f}" if k in mix else f"{'-':>{w}}"
                          for k, w in (("clean", 6), ("wrong_label", 6), ("off_task", 5),
                                       ("near_duplicate", 5)))
        proxy = [f"{v:.2f}" if v is not None else "-" for v in
                 ((m.get("proxy") or {}).get(k) for k in ("accuracy", "auc"))]
        lines.append(f"{m['round']:>5} {acc:>8} {loss:>6} {proxy[0]:>5} {proxy[1]:>5} "
                     f"{m.get('n_generated', '-'):>5} "
                     f"{m.get('n_clean', '-'):>5} {m.get('n_selected', '-'):>6} {shares}")
    return "\n".join(lines)


def evolve(cfg: Config, *, resume: bool = False, say=print, progress: bool = True,
           base: dict | None = None) -> dict:
    """Run ``cfg.evolve.rounds`` rounds of the loop; see the module docstring for the layout.

    Args:
        cfg: the job's config (``evolve``, ``generate``, ``features``, ``select``, ``train``).
        resume: continue the run in ``cfg.evolve.run_dir``, skipping finished stages.
        say: prints a line as each stage ends, and the final table.
        progress: training also prints a line every tenth of its steps.
        base: another run's round-0 metrics (its result's ``"base"``), reused when they were
            measured on the same model and test set (the demo's arms), instead of evaluating the
            base model again.

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
    remove_temporaries(loop.run)
    loop.manifest.save()
    files = loop.task_files()
    files["target_records"] = read_records(files["targets"], "target")
    files["targets_hash"] = file_digest(files["targets"])
    files["test_hash"] = file_digest(files["test"])
    if cfg.evolve.test_size and files["test"]:  # scoring fewer items is another evaluation
        files["test_hash"] = digest(files["test_hash"], cfg.evolve.test_size)
    prompts = eval_prompts(files["target_records"], *(
        read_records(files[name], "mcq") for name in ("dev", "test") if files[name]))
    files["eval_hash"] = digest(sorted(prompts))
    say(f"[evolve] {cfg.evolve.rounds} round(s) of {cfg.generate.kind} candidates "
        f"({cfg.generate.pool_size} a round), {cfg.select.method} selection, model "
        f"{cfg.model!r} -> {loop.run}")
    started = init_ray()
    try:
        base = loop.base(files, known=base)
        rounds, prev = [], None
        for r in range(1, cfg.evolve.rounds + 1):
            prev = loop.round(r, files, prompts, prev)
            rounds.append(prev["metrics"])
    finally:
        if started:
            import ray

            ray.shutdown()
    say(format_table(([base] if base else []) + rounds))
    return {"run_dir": loop.run, "base": base, "rounds": rounds}
