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

This module is the driver and the CLI; the search space and resources are
:mod:`evoray.tune_space`, what trials share and one trial's body :mod:`evoray.tune_trial`, the
tables :mod:`evoray.tune_report`.

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
import logging
import os
import shutil
import signal
import time

from evoray.config import Config, config_to_dict, load_config
from evoray.errors import EvorayError
from evoray.tune_space import (
    check_config,
    cluster_resources,
    expected_trials,
    max_epochs,
    plan_concurrency,
    trial_resources,
    tune_space,
)
from evoray.tune_trial import prepare_shared, trial

__all__ = ["sweep", "register", "SweepInterrupted", "STOP_ENV"]

STOP_ENV = "EVORAY_SWEEP_STOP_AFTER"
# The driver's progress lines: Tune pickles its callbacks (and restores them on --resume), so
# the callback logs here and sweep() routes this logger to its ``say`` while it runs.
_PROGRESS = logging.getLogger("evoray.sweep.progress")
_PROGRESS.setLevel(logging.INFO)
_PROGRESS.propagate = False


class _SayHandler(logging.Handler):
    """Hands each progress line to the driver's ``say``."""

    def __init__(self, say):
        super().__init__()
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        self.say(record.getMessage())


class SweepInterrupted(EvorayError):
    """The sweep stopped before every trial finished; ``--resume`` continues it."""


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
            _PROGRESS.info(f"[sweep] {trial.trial_id} {shown} epoch {result.get('epoch')}: dev "
                 f"{result.get('dev_accuracy', float('nan')):.3f}{test}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished += 1
            _PROGRESS.info(f"[sweep] {trial.trial_id} finished ({self.finished} so far)")
            stop = os.environ.get(STOP_ENV)
            if stop and self.finished >= int(stop):
                _PROGRESS.info(f"[sweep] {STOP_ENV}={stop}: stopping the driver")
                os.kill(os.getpid(), signal.SIGUSR1)

        def on_trial_error(self, iteration, trials, trial, **info):
            _PROGRESS.info(f"[sweep] {trial.trial_id} failed: {trial.error_file}")

    return Progress()


def _tuner(cfg: Config, space: dict, paths: dict, root: str, concurrency: int, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    own, _ = trial_resources(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=config_to_dict(cfg), paths=paths, root=root), own)
    experiment = f"{root}/tune"
    if resume and tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    sw = cfg.sweep
    scheduler = FIFOScheduler() if sw.scheduler == "fifo" else ASHAScheduler(
        time_attr="epoch", max_t=max_epochs(cfg, space), grace_period=sw.grace_period,
        reduction_factor=sw.reduction_factor, stop_last_trials=False)
    search_alg = None
    if sw.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=cfg.seed)
    elif sw.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.seed)
    return tune.Tuner(
        trainable, param_space=tune_space(space, sw.search),
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
    concurrency = plan_concurrency(cfg, *cluster_resources(cfg)) if cfg.sweep.resources else None
    handler, started = _SayHandler(say), False
    try:
        _PROGRESS.addHandler(handler)
        started = _start_ray(cfg)
        concurrency = concurrency or plan_concurrency(cfg, *cluster_resources(cfg))
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
        _PROGRESS.removeHandler(handler)
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
