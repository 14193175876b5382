"""What a sweep's trials share and what one trial does (in its Tune trial process).

:func:`prepare_shared` makes, once per sweep, the task files, round-1 pool, cleaned pool and
features every trial reads (the stages of :mod:`evoray.stages`, as ``evolve``'s round 1 makes
them). :func:`trial` selects with the trial's settings, then trains and scores its adapter on dev
(and test) after every epoch: in its own process (``train.num_workers: 0``) or on Ray Train
workers with a callback that scores each checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime

from evoray.config import Config, apply_override, config_from_dict
from evoray.errors import EvorayError

__all__ = ["prepare_shared", "trial"]

_STATE = "evoray_sweep.json"


# -- what every trial shares ----------------------------------------------------------------

def prepare_shared(cfg: Config, shared: str, *, say=print) -> dict[str, str | None]:
    """Task files, round-1 pool, cleaned pool and features (base proxy) under ``shared``, each
    stage recorded in ``shared/manifest.json`` (:mod:`evoray.stages`, as ``evolve`` runs them)
    and skipped when already there.

    Raises:
        EvorayError: ``shared`` holds a stage made from other settings (a sweep's finished trials
            would no longer match); naming the stage.
    """
    from evoray.data import read_records, write_records
    from evoray.stages import (
        Manifest,
        clean_pool,
        eval_prompts,
        features_inputs,
        featurize_round,
        file_digest,
        generate_inputs,
        generate_pool,
        task_records,
    )
    from evoray.storage import atomic_write_bytes, read_bytes

    m, ev, sw = Manifest(shared), cfg.evolve, cfg.sweep
    p = {"targets": f"{shared}/task/targets.jsonl", "dev": f"{shared}/task/dev.jsonl",
         "test": f"{shared}/task/test.jsonl", "prompts": f"{shared}/task/eval_prompts.json",
         "pool": f"{shared}/pool.jsonl", "clean": f"{shared}/clean.jsonl",
         "features_pool": f"{shared}/features/pool",
         "features_targets": f"{shared}/features/targets"}

    def stage(key, inputs, outputs, fn) -> str:
        return m.run(key, inputs, outputs, fn, say=say, label="[sweep] shared", changed=(
            "set sweep.shared_dir (or sweep.sweep_dir) to a new folder"))[0]

    def task():
        targets, dev, test = task_records(cfg)
        write_records(targets, p["targets"], "target")
        write_records(dev[:sw.dev_size], p["dev"], "mcq")
        if test:
            write_records(test[:sw.test_size], p["test"], "mcq")
        atomic_write_bytes(p["prompts"], json.dumps(sorted(eval_prompts(targets, dev, test)))
                           .encode())
        return {"targets": len(targets), "dev": len(dev[:sw.dev_size]),
                "test": len(test[:sw.test_size])}

    task_d = stage("task", [ev.task, cfg.seed, sw.dev_size, sw.test_size,
                            [file_digest(f) for f in (ev.targets, ev.dev, ev.test)]],
                   [p["targets"], p["dev"], p["prompts"]], task)
    if m.stages["task"]["stats"]["test"] == 0:
        p["test"] = None
    gen_d = stage("generate", generate_inputs(cfg, 1, task_d), [p["pool"]],
                  lambda: generate_pool(cfg, 1, read_records(p["targets"], "target"), p["pool"]))
    prompts = set(json.loads(read_bytes(p["prompts"])))
    clean_d = stage("clean", [gen_d, task_d], [p["clean"]],
                    lambda: clean_pool(p["pool"], p["clean"], prompts))
    stage("features", features_inputs(cfg, clean_d, task_d),
          [f"{p['features_pool']}/meta.json", f"{p['features_targets']}/meta.json"],
          lambda: featurize_round(cfg, p["clean"], p["targets"], p["features_pool"],
                                  p["features_targets"]))
    return p


# -- one trial (runs in a Tune trial process) -----------------------------------------------

def _scores(cfg: Config, paths: dict, adapter: str) -> dict:
    """Dev (and test) accuracy and response loss of base + ``adapter``, model loaded once."""
    from evoray.data import read_records
    from evoray.lora import load_with_adapter
    from evoray.train import evaluate_model

    t0 = time.perf_counter()
    model, tok = load_with_adapter(cfg.model, adapter, cache_dir=cfg.cache_dir)
    out = {}
    for split in ("dev", "test"):
        if paths[split]:
            m = evaluate_model(model, tok, read_records(paths[split], "mcq"),
                               max_length=cfg.train.max_length)
            out.update({f"{split}_accuracy": m["accuracy"], f"{split}_loss": m["loss"]})
    return {**out, "eval_s": time.perf_counter() - t0}


def _mix(records: list[dict]) -> dict:
    """The selection's make-up as trial metrics (``picked_<kind>``; {} for records with no kind)."""
    from evoray.stages import mix

    return {f"picked_{k}": v for k, v in (mix(records) or {}).items()}


def _note_attempt(tdir: str, resumed_epoch: int | None) -> None:
    """Append this start of the trial to ``attempts.json`` (tests read it: a finished trial is
    never started again by ``--resume``)."""
    from evoray.storage import atomic_write_bytes, exists, read_bytes

    path = f"{tdir}/attempts.json"
    seen = json.loads(read_bytes(path)) if exists(path) else []
    seen.append({"started": datetime.now(UTC).isoformat(timespec="seconds"),
                 "resumed_from_epoch": resumed_epoch, "pid": os.getpid()})
    atomic_write_bytes(path, json.dumps(seen, indent=1).encode())


def trial(params: dict, *, base: dict, paths: dict, root: str) -> None:
    """Tune's function trainable: select with this trial's settings, train, score every epoch."""
    from ray import tune

    from evoray.data import read_records
    from evoray.select.io import select_files

    cfg = config_from_dict(Config, base)
    for key, value in params.items():
        cfg = apply_override(cfg, key, value)
    tid = tune.get_context().get_trial_id()
    tdir = f"{root}/trials/{tid}"
    t0 = time.perf_counter()
    summary, _, feats = select_files(cfg.select, paths["features_pool"],
                                     paths["features_targets"], f"{tdir}/selection",
                                     pool=paths["clean"])
    picked = read_records(f"{tdir}/selection/selected.jsonl", "candidate")
    extra = {"selected": summary["selected"], "pool": len(feats),
             "select_s": time.perf_counter() - t0, **_mix(picked)}
    data = f"{tdir}/selection/selected.jsonl"
    if cfg.train.num_workers == 0:
        _epochs_in_process(cfg, paths, data, extra, tdir)
    else:
        _note_attempt(tdir, None)
        _epochs_on_workers(cfg, paths, data, extra, root, tid)


def _epochs_in_process(cfg: Config, paths: dict, data: str, extra: dict, tdir: str) -> None:
    """Train, score and report epoch after epoch. The working copies of the adapter live in
    ``tdir/adapter_NN`` (a local temporary folder when ``tdir`` is a URI); Tune copies each
    reported one into its checkpoint, and the sweep removes the copies left by stopped trials."""
    from ray import tune

    from evoray.train import train

    work = tdir if "://" not in tdir else tempfile.mkdtemp(prefix="evoray-sweep-")
    start, adapter = 0, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # a retried or restored trial: go on after its last reported epoch
        with ckpt.as_directory() as d, open(os.path.join(d, _STATE)) as f:
            start = json.load(f)["epoch"]
            adapter = os.path.join(work, f"adapter_{start:02d}")
            shutil.copytree(d, adapter, dirs_exist_ok=True)
    _note_attempt(tdir, start if ckpt is not None else None)
    for e in range(start, cfg.train.epochs):
        out = os.path.join(work, f"adapter_{e + 1:02d}")
        shutil.rmtree(out, ignore_errors=True)  # a copy left by a killed attempt
        tcfg = dataclasses.replace(cfg.train, epochs=1, seed=cfg.train.seed + e)
        t0 = time.perf_counter()
        res = train(data, cfg.model, adapter, tcfg, out=out, cache_dir=cfg.cache_dir)
        metrics = {"epoch": e + 1, "train_loss": float(res.metrics.get("loss", float("nan"))),
                   "train_s": time.perf_counter() - t0, **_scores(cfg, paths, out), **extra}
        with open(os.path.join(out, _STATE), "w") as f:
            json.dump({"epoch": e + 1}, f)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(out))
        if adapter:
            shutil.rmtree(adapter, ignore_errors=True)
        adapter = out
    if adapter:
        shutil.rmtree(adapter, ignore_errors=True)


def _scoring_callback(cfg: Config, paths: dict, extra: dict):
    """A ``TuneReportCallback`` that scores each epoch's checkpoint on dev (and test) before
    forwarding the report to Tune. It runs in the Train controller (on the trial's node, no
    reserved CPU), so the scheduler sees a dev metric every epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreEachEpoch(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is None:  # evoray's loop attaches one at every epoch's end
                return
            m = {k: v for k, v in metrics[0].items() if k not in ("history", "loss")}
            m["train_loss"] = float(metrics[0].get("loss", float("nan")))
            with checkpoint.as_directory() as d:
                m.update(_scores(cfg, paths, d))
            super().after_report(run_context, [{**m, **extra}], checkpoint)

    return ScoreEachEpoch()


def _epochs_on_workers(cfg: Config, paths: dict, data: str, extra: dict, root: str,
                       tid: str) -> None:
    """Train V2 in a Tune trial: a ``TorchTrainer`` named after the trial (a retried trial
    resumes its Train run from the last checkpoint) with :func:`_scoring_callback`."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from evoray.data import encode_pairs, read_records
    from evoray.models import load_tokenizer
    from evoray.train.loop import optimizer_steps, train_loop

    t = cfg.train
    tok = load_tokenizer(cfg.model, cache_dir=cfg.cache_dir)
    encoded, _ = encode_pairs(tok, read_records(data, "candidate"), t.max_length,
                              on_overflow=t.on_overflow)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    per_worker = len(rows) // t.num_workers
    if per_worker == 0:
        raise EvorayError(f"{data}: {len(rows)} example(s) for {t.num_workers} workers")
    per_epoch = optimizer_steps(per_worker, t.batch_size, t.grad_accum)
    loop_cfg = {"cfg": dataclasses.replace(t, checkpoint_every=0), "model": cfg.model,
                "init_adapter": None, "out": None, "cache_dir": cfg.cache_dir,
                "steps_per_epoch": per_epoch, "total_steps": t.epochs * per_epoch,
                "rows_per_worker": per_worker, "progress": False}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg, datasets={"train": ray.data.from_items(rows)},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker,
                                                           **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=tid, storage_path=f"{root}/train",
                             callbacks=[_scoring_callback(cfg, paths, extra)],
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=t.max_failures)))
    trainer.fit()
