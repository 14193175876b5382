"""``evoray sweep``: Ray Tune sweeps of select → train → evaluate on features computed once.

Feature extraction is the expensive step, so the driver prepares once per (pool, proxy) what every
trial shares: the task files, the generator's round-1 pool, its cleaned copy and the features of
pool and targets under the base proxy (base + fresh seeded LoRA), as round 1 of ``evoray evolve``
makes them with the same settings. Trials only read them: each selects (``select.*``), trains
(``train.*``) and scores its adapter on the dev split after every epoch::

    sweep_dir/
      manifest.json        the sweep's config (``--resume`` must keep it)
      shared/              (or sweep.shared_dir) manifest.json (a hash of each stage's inputs),
                           task/{targets,dev,test}.jsonl (dev/test as scored), pool.jsonl,
                           clean.jsonl, features/{pool,targets}/
      tune/                the Tune experiment (Tuner.restore reads it) and trial checkpoints
      train/<trial_id>/    Ray Train runs of multi-worker trials
      trials/<trial_id>/   selection/, attempts.json (one entry per start of the trial) and,
                           while it trains in-process, adapter_NN/ (its latest epochs)
      results.csv, epochs.csv, summary.md, plots/, best_config.yaml   (evoray.tune_report)

**Scores.** ``sweep.metric`` (``dev_accuracy`` or ``dev_loss``) drives the scheduler and the
choice of the best config; test accuracy and loss are recorded beside it, never optimised.

**Trials.** With ``train.num_workers: 0`` a trial trains in its own process, one epoch per call to
:func:`evoray.train.train` continuing the previous epoch's adapter, scores it and reports it with
a Tune checkpoint (a retried or restored trial goes on after its last reported epoch). So each
epoch gets its own warm-up and decay over that epoch's steps and a fresh AdamW (a saw-tooth, as
in warm restarts): every reported adapter sits at the end of a decay, which is what ASHA compares.
Epoch ``e`` shuffles with ``train.seed + e``. ``best_config.yaml`` fed to ``evoray evolve``
trains all epochs under one decay instead. With ``train.num_workers >= 1`` a trial follows Ray's
Train V2 pattern: it runs a ``TorchTrainer`` over :func:`evoray.train.loop.train_loop` (one
schedule, a checkpoint at each epoch's end) with a ``TuneReportCallback`` that scores each
checkpoint, in the Train controller, before Tune sees the report.

**Resources.** A trial's process reserves ``sweep.trial_cpus`` (default ``train.cpus_per_worker``)
through Tune; Train workers are placed by their controller, outside Tune's accounting, so a null
``max_concurrent_trials`` is derived from what one trial needs in all. A trial that cannot fit
is an error before any trial starts.

**Resume.** Tune saves the experiment state as it goes; ``resume=True`` (``--resume``) runs
``Tuner.restore``: finished trials are kept, unfinished and errored ones go on from their last
checkpoint. A failed trial is retried ``sweep.max_failures`` times (``FailureConfig``).
``EVORAY_SWEEP_STOP_AFTER=N`` sends the driver Tune's stop signal (SIGUSR1, as Ctrl-C would be)
once N trials have finished: for tests; Tune must run in the driver's main thread.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import shutil
import signal
import tempfile
import time
from datetime import UTC, datetime

from evoray.config import Config, apply_override, config_from_dict, config_to_dict, load_config
from evoray.errors import ConfigError, EvorayError

__all__ = ["sweep", "check_config", "parse_space", "expected_trials", "trial_resources",
           "plan_concurrency", "prepare_shared", "register", "SweepInterrupted", "STOP_ENV",
           "SPACE_KINDS"]

STOP_ENV = "EVORAY_SWEEP_STOP_AFTER"
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_RANGES = ("uniform", "loguniform", "randint")
# Fields that set a trial's resources (fixed for the whole sweep) or that the sweep replaces.
_FIXED = {"train.num_workers": "decides every trial's resources",
          "train.use_gpu": "decides every trial's resources",
          "train.cpus_per_worker": "decides every trial's resources",
          "train.max_steps": "sweeps count epochs (ASHA's time unit); vary train.epochs"}
_STATE = "evoray_sweep.json"
_SAY = [print]  # where progress lines go; Tune restores its callbacks from a pickle


class SweepInterrupted(EvorayError):
    """The sweep stopped before every trial finished; ``--resume`` continues it."""


def _say(message: str) -> None:
    _SAY[0](message)


# -- the search space -----------------------------------------------------------------------

def _field(cfg: Config, path: str):
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def parse_space(cfg: Config) -> dict[str, tuple[str, list]]:
    """``sweep.space`` checked against the config: ``{path: (kind, values)}``, values coerced.

    Raises:
        ConfigError: an empty space or grid, a malformed entry, an unknown path (naming the
            closest valid one), a path outside ``select.*``/``train.*`` or one fixed for the
            sweep, or a value the field refuses (type or range).
    """
    if not cfg.sweep.space:
        raise ConfigError("sweep.space: empty; give at least one parameter, e.g. "
                          "'select.ratio: {grid: [0.05, 0.1, 0.2]}'")
    forms = "{grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, " \
            "{randint: [lo, hi]}"
    out = {}
    for path, spec in cfg.sweep.space.items():
        where = f"sweep.space['{path}']"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"{where}: expected one of {forms}; got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: empty {kind}; list at least one value")
        if kind in _RANGES and (len(values) != 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values)
                or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0)):
            raise ConfigError(f"{where}: {kind} needs [low, high] numbers with low < high"
                              f"{' and low > 0' if kind == 'loguniform' else ''}; got {values}")
        checked = values if kind != "randint" else [values[0], values[1] - 1]
        coerced = []
        for v in checked:
            try:
                coerced.append(_field(apply_override(cfg, path, v), path))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if dataclasses.is_dataclass(_field(cfg, path)):
            raise ConfigError(f"{where}: names a whole section; give one field, e.g. "
                              f"'{path}.{dataclasses.fields(_field(cfg, path))[0].name}'")
        if path.split(".")[0] not in ("select", "train"):
            raise ConfigError(f"{where}: '{path}' would change the shared task, pool or features "
                              "(computed once for every trial); a sweep varies select.* and "
                              "train.* only")
        if path in _FIXED:
            raise ConfigError(f"{where}: '{path}' {_FIXED[path]}; it cannot vary within a sweep")
        out[path] = (kind, coerced if kind in ("grid", "choice") else list(values))
    return out


def expected_trials(cfg: Config, space: dict[str, tuple[str, list]]) -> int:
    """Trials the sweep runs: grid points × ``num_samples`` (grid), else ``num_samples``."""
    if cfg.sweep.search != "grid":
        return cfg.sweep.num_samples
    return cfg.sweep.num_samples * math.prod(len(v) for k, v in space.values() if k == "grid")


def _max_epochs(cfg: Config, space: dict) -> int:
    kind, values = space.get("train.epochs", ("grid", [cfg.train.epochs]))
    return values[1] - 1 if kind == "randint" else max(values)


def check_config(cfg: Config) -> dict[str, tuple[str, list]]:
    """Every check that needs no Ray: the space (:func:`parse_space`), the search algorithm's
    package, ASHA's grace period, training and the dev split. Returns the parsed space."""
    space = parse_space(cfg)
    sw, t = cfg.sweep, cfg.train
    if sw.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search: 'optuna' needs the optuna package, which is not "
                          "installed (pip install optuna); or use search: grid or random")
    if sw.scheduler == "asha" and sw.grace_period > _max_epochs(cfg, space):
        raise ConfigError(f"sweep.grace_period: {sw.grace_period} is more than the most epochs a "
                          f"trial trains ({_max_epochs(cfg, space)})")
    if t.max_steps is not None:
        raise ConfigError(f"train.max_steps: {_FIXED['train.max_steps']}")
    if t.num_workers == 0 and t.use_gpu:
        raise ConfigError("train.use_gpu: in-process trials (train.num_workers 0) train on CPU; "
                          "set train.num_workers >= 1 for GPU trials")
    if cfg.evolve.targets and not cfg.evolve.dev:
        raise ConfigError("evolve.dev: a sweep scores trials on a dev split; give one with "
                          "evolve.targets (or leave both null for the built-in task's)")
    return space


# -- resources ------------------------------------------------------------------------------

def trial_resources(cfg: Config) -> tuple[dict[str, float], dict[str, float]]:
    """``(own, total)``: what a trial's process reserves through Tune, and what one trial needs
    in all (its process plus its Train workers)."""
    t = cfg.train
    own = t.cpus_per_worker if cfg.sweep.trial_cpus is None else cfg.sweep.trial_cpus
    return {"CPU": own}, {"CPU": own + t.num_workers * t.cpus_per_worker,
                          "GPU": float(t.num_workers if t.use_gpu else 0)}


def plan_concurrency(cfg: Config, available: dict[str, float],
                     largest_node: dict[str, float] | None = None) -> int:
    """``sweep.max_concurrent_trials``, or as many trials as ``available`` holds at once.

    Raises:
        ConfigError: one trial needs more than ``available`` (or its process more CPUs than
            ``largest_node`` has).
    """
    own, need = trial_resources(cfg)
    t = cfg.train
    what = (f"its process {own['CPU']:g} CPU" + (
        f" + {t.num_workers} Train worker(s) x {t.cpus_per_worker:g} CPU"
        f"{' + 1 GPU' if t.use_gpu else ''}" if t.num_workers else ""))
    fit = all(v <= available.get(k, 0) + 1e-9 for k, v in need.items() if v > 0)
    if largest_node is not None and own["CPU"] > largest_node.get("CPU", 0) + 1e-9:
        fit = False
        what += f"; the largest node has {largest_node.get('CPU', 0):g} CPU"
    if not fit:
        show = lambda res: ", ".join(f"{k} {res.get(k, 0):g}" for k in need)  # noqa: E731
        raise ConfigError(f"no trial can start: one needs {what} ({show(need)}) but the cluster "
                          f"has {show(available)}; lower train.num_workers, "
                          "train.cpus_per_worker or sweep.trial_cpus, or set sweep.resources "
                          "for a cluster that grows on demand")
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    ratios = [available.get(k, 0) / v for k, v in need.items() if v > 0]
    return max(1, math.floor(min(ratios) + 1e-9) if ratios else int(available.get("CPU", 1)))


def _cluster(cfg: Config) -> tuple[dict[str, float], dict[str, float] | None]:
    if cfg.sweep.resources:
        return dict(cfg.sweep.resources), None
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, key=lambda r: r.get("CPU", 0)) if nodes else None
    return dict(ray.cluster_resources()), largest


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


def _trial(params: dict, *, base: dict, paths: dict, root: str) -> None:
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


# -- the driver -----------------------------------------------------------------------------

def _progress_callback():
    """Tune callback: one line per reported epoch and per finished trial; ``STOP_ENV``."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.finished = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            shown = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in trial.config.items())
            test = (f", test {result['test_accuracy']:.3f}" if "test_accuracy" in result
                    else "")
            _say(f"[sweep] {trial.trial_id} {shown} epoch {result.get('epoch')}: dev "
                 f"{result.get('dev_accuracy', float('nan')):.3f}{test}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished += 1
            _say(f"[sweep] {trial.trial_id} finished ({self.finished} so far)")
            stop = os.environ.get(STOP_ENV)
            if stop and self.finished >= int(stop):
                _say(f"[sweep] {STOP_ENV}={stop}: stopping the driver")
                os.kill(os.getpid(), signal.SIGUSR1)

        def on_trial_error(self, iteration, trials, trial, **info):
            _say(f"[sweep] {trial.trial_id} failed: {trial.error_file}")

    return Progress()


def _tune_space(space: dict, search: str) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search if search == "grid" else tune.choice,
            "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {path: make[kind](values) for path, (kind, values) in space.items()}


def _tuner(cfg: Config, space: dict, paths: dict, root: str, concurrency: int, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    own, _ = trial_resources(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config_to_dict(cfg), paths=paths, root=root), own)
    experiment = f"{root}/tune"
    if resume and tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    sw = cfg.sweep
    scheduler = FIFOScheduler() if sw.scheduler == "fifo" else ASHAScheduler(
        time_attr="epoch", max_t=_max_epochs(cfg, space), grace_period=sw.grace_period,
        reduction_factor=sw.reduction_factor, stop_last_trials=False)
    search_alg = None
    if sw.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=cfg.seed)
    elif sw.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.seed)
    return tune.Tuner(
        trainable, param_space=_tune_space(space, sw.search),
        tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=sw.num_samples,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(
            name="tune", storage_path=root, verbose=0, callbacks=[_progress_callback()],
            failure_config=tune.FailureConfig(max_failures=sw.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _start_ray(cfg: Config) -> bool:
    """Join the cluster (``ray job submit``, or a Ray already started), else start a local one;
    True if started here. A local Ray gets the dashboard when trials run Train workers: an
    early-stopped trial's worker placement group is removed by Ray Train's
    ``PlacementGroupCleaner``, which watches the killed controller through the State API."""
    import ray

    from evoray.ray_utils import init_ray, quiet_ray_data

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS") or cfg.train.num_workers == 0:
        return init_ray()
    ray.init(include_dashboard=True, configure_logging=False, log_to_driver=False)
    quiet_ray_data()
    return True


def _absolute(path: str) -> str:
    return path.rstrip("/") if "://" in path else os.path.abspath(os.path.expanduser(path))


def _changed(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two config dicts."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if found := _changed(a, b, f"{prefix}{key}."):
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def sweep(cfg: Config, *, resume: bool = False, say=print) -> dict:
    """Run the Tune sweep of ``cfg.sweep`` (see the module docstring) and write its results.

    Args:
        cfg: the job config: ``model``, ``generate``, ``features`` and ``evolve`` (task) make the
            shared pool and features; ``select`` and ``train`` are each trial's defaults, which
            ``sweep.space`` varies.
        resume: continue the sweep in ``sweep.sweep_dir`` (``Tuner.restore``); finished trials
            are not run again.
        say: prints a line per shared stage, per reported epoch and per finished trial.

    Returns:
        ``{"sweep_dir", "trials": rows of results.csv, "best": the best row, "files": {...},
        "seconds"}``.

    Raises:
        ConfigError: a bad search space, an optuna search without optuna, or resources no
            trial can get; each before any trial starts.
        SweepInterrupted: the driver was stopped before every trial finished.
        EvorayError: a sweep exists there without ``resume``, or ``resume`` with another config.
    """
    from evoray.stages import Manifest
    from evoray.storage import exists
    from evoray.tune_report import collect, write_outputs

    t0 = time.perf_counter()
    space = check_config(cfg)
    if cfg.trust_remote_code:
        from evoray.models import allow_remote_code

        allow_remote_code()
    root = _absolute(cfg.sweep.sweep_dir)
    shared = _absolute(cfg.sweep.shared_dir or f"{root}/shared")
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(
        cfg.sweep, sweep_dir=root, shared_dir=shared), cache_dir=cfg.cache_dir and _absolute(
            cfg.cache_dir))
    manifest = Manifest(root)
    if manifest.data["config"] is not None:
        if not resume:
            raise EvorayError(f"{root} already holds a sweep ({manifest.path}); pass --resume "
                              "to continue it, or set sweep.sweep_dir to a new folder")
        changed = _changed(manifest.data["config"], config_to_dict(cfg))
        if changed:
            raise EvorayError(f"--resume: '{changed}' differs from the config the sweep in "
                              f"{root} started with; a resumed sweep keeps its settings")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    concurrency = plan_concurrency(cfg, *_cluster(cfg)) if cfg.sweep.resources else None
    _SAY[0] = say
    started = _start_ray(cfg)
    try:
        concurrency = concurrency or plan_concurrency(cfg, *_cluster(cfg))
        _, need = trial_resources(cfg)
        total = expected_trials(cfg, space)
        say(f"[sweep] {total} trial(s) of {', '.join(space)} ({cfg.sweep.search} search, "
            f"{cfg.sweep.scheduler}, metric {cfg.sweep.metric}), up to {concurrency} at once "
            f"({', '.join(f'{k} {v:g}' for k, v in need.items() if v)} each) -> {root}")
        paths = prepare_shared(cfg, shared, say=say)
        resumed = resume and exists(f"{root}/tune/tuner.pkl")
        manifest.data["config"] = config_to_dict(cfg)
        manifest.save()
        grid = _tuner(cfg, space, paths, root, concurrency, resume).fit()
    finally:
        _SAY[0] = print
        if started:
            import ray

            ray.shutdown()
    from ray.tune import ExperimentAnalysis

    # Statuses as saved (after a stop signal the in-memory ones read "terminated" for all)
    ended = {t.trial_id for t in ExperimentAnalysis(f"{root}/tune").trials
             if t.status in ("TERMINATED", "ERROR")}
    rows, epochs = collect(grid, cfg, space, ended)
    finished = sum(r["status"] != "unfinished" for r in rows)
    if finished < total:
        raise SweepInterrupted(f"the sweep stopped with {finished} of {total} trials finished; "
                               f"rerun with --resume to continue it ({root})")
    if "://" not in root:  # adapter copies of trials that were stopped mid-way
        for left in glob.glob(os.path.join(root, "trials", "*", "adapter_*")):
            shutil.rmtree(left, ignore_errors=True)
    seconds = time.perf_counter() - t0
    files = write_outputs(cfg, space, rows, epochs, seconds=seconds, resumed=resumed)
    best = files.pop("best")
    say(f"[sweep] {len(rows)} trials in {seconds:.0f} s; best {cfg.sweep.metric} "
        f"{best[cfg.sweep.metric]:.4f} ({best['trial_id']}); summary: {files['summary']}")
    return {"sweep_dir": root, "trials": rows, "best": best, "files": files,
            "seconds": seconds}


# -- command line ---------------------------------------------------------------------------

def _cmd_sweep(args) -> int:
    config, overrides = args.config, list(args.overrides)
    sweep(load_config(config, overrides), resume=args.resume)
    return 0


def register(sub) -> None:
    """Add ``evoray sweep`` to the ``evoray`` sub-parsers."""
    p = sub.add_parser("sweep", help="Ray Tune sweep of select -> train -> evaluate over "
                       "features computed once (see tune_configs/)")
    p.add_argument("config", help="sweep YAML: a job config with sweep.space")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. sweep.num_samples=2")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in sweep.sweep_dir (Tuner.restore); finished "
                        "trials are kept")
    p.set_defaults(func=_cmd_sweep)
