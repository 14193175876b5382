"""``train(...)``: LoRA fine-tuning of a base model on a records file with Ray Train.

The driver reads and tokenizes the records (the foundation's policy: prompts cut from the left,
an example whose response does not fit ``max_length`` is an error or, with
``on_overflow="skip"``, a counted skip), then runs a ``TorchTrainer`` over
``ScalingConfig(num_workers, use_gpu)`` with :func:`evoray.train.loop.train_loop` on each worker
(DDP when there are several). ``num_workers=0`` runs the loop in this process, with no Ray call
at all (tests, notebooks, a Tune trial, a benchmark that scores every epoch through
``on_checkpoint``); otherwise the tokenized rows reach the workers as Ray Data shards with
``preserve_order``, each worker keeping ``n // num_workers`` of them so that every worker takes
the same number of steps.

Checkpoints go to ``<storage_path>/<name>`` (``CheckpointConfig(num_to_keep)``); a worker failure
restarts the group from the last checkpoint up to ``max_failures`` times, and rerunning with the
same ``name`` and ``storage_path`` resumes from it. The final checkpoint folder (adapter, Adam
state, optimizer state, metrics; see :mod:`evoray.train.loop`) is also copied to ``out``.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field

from evoray.config import TrainConfig
from evoray.errors import EvorayError, RecordError, TrainError

__all__ = ["TrainResult", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        adapter: folder (path or URI) of the trained adapter, ``out``.
        adam_state: its ``adam_state.safetensors`` (for LESS-style Adam features).
        metrics: the last report: ``step``, ``epoch``, ``loss`` (nats per response token, last
            step), ``samples_per_s`` (this worker, excluding start-up), ``resumed_from_step``.
        history: training loss of every optimizer step, in order.
        n_examples: examples trained on; ``skipped``: ids dropped by ``on_overflow="skip"``.
        checkpoint: the last checkpoint's path in ``storage_path`` (None in local mode).
        early_stop: with ``early_stop_patience``: ``best_epoch`` (the adapter kept),
            ``stopped_epoch`` and ``curve`` (each epoch's target accuracy and loss); else None.
    """

    adapter: str
    adam_state: str
    metrics: dict
    history: list[float] = field(default_factory=list)
    n_examples: int = 0
    skipped: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    early_stop: dict | None = None


def _rows(records_path: str, model_spec: str, cfg: TrainConfig, cache_dir: str | None):
    from evoray.data import encode_pairs, read_records
    from evoray.models import load_tokenizer

    try:
        records = read_records(records_path, "candidate")
    except RecordError as e:  # target records (with `subtask`) train on prompt and response too
        try:
            records = read_records(records_path, "target")
        except RecordError:
            raise e from None
    tok = load_tokenizer(model_spec, cache_dir=cache_dir)
    encoded, skipped = encode_pairs(tok, records, cfg.max_length, on_overflow=cfg.on_overflow)
    if not encoded:
        raise TrainError(f"{records_path}: no example fits max_length={cfg.max_length} "
                         f"({len(skipped)} skipped); raise train.max_length")
    if skipped:
        log.warning("%s: skipped %d example(s) longer than max_length=%d", records_path,
                    len(skipped), cfg.max_length)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded], skipped


def _check_init_adapter(init_adapter: str, model_spec: str, cache_dir: str | None) -> None:
    from evoray.lora import load_with_adapter

    load_with_adapter(model_spec, init_adapter, cache_dir=cache_dir)


def _input_error(e: BaseException) -> EvorayError | None:
    """The EvorayError inside Ray's wrapping of a worker failure, if there is one."""
    todo, seen = [e], set()
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, EvorayError):
            return err
        todo += [err.__cause__, getattr(err, "cause", None)]
        todo += list((getattr(err, "worker_failures", None) or {}).values())
    return None


def train(records_path: str, model_spec: str, init_adapter: str | None = None,
          cfg: TrainConfig | None = None, *, out: str, name: str | None = None,
          cache_dir: str | None = None, progress: bool = False,
          on_checkpoint=None, targets: list[dict] | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter of ``model_spec`` on the (prompt, response) records.

    Args:
        records_path: candidate or target records (``id``, ``prompt``, ``response``), path or
            URI.
        model_spec: base model (see :func:`evoray.models.load_model`).
        init_adapter: continue this adapter folder (e.g. the previous round's); None = fresh.
        cfg: training settings; None = defaults.
        out: folder (path or URI) that receives the final adapter and its state.
        name: Ray Train run name; the same name and ``cfg.storage_path`` resume a run. None = a
            new unique name.
        cache_dir: model cache (see :func:`evoray.models.default_cache_dir`).
        progress: worker 0 prints a line every tenth of the steps (step, epoch, loss, rate);
            with workers on Ray the lines reach the driver through Ray's log forwarding.
        on_checkpoint: local mode only: called as ``on_checkpoint(folder, metrics)`` with every
            checkpoint folder (each epoch's end, every ``checkpoint_every`` steps, the last
            step) while it exists, e.g. to score the adapter on dev epoch by epoch.
        targets: target records (``prompt``, ``response``) that ``cfg.early_stop_patience``
            scores each epoch on (:mod:`evoray.train.early_stop`); never trained on.

    Raises:
        RecordError: the file is empty or malformed. ResponseTooLong: an example does not fit
        ``max_length`` (``on_overflow="error"``). ModelError: the adapter is missing or was
        trained on another base model. TrainError: no example left, or fewer than the workers.
    """
    from evoray.train.loop import optimizer_steps

    cfg = cfg or TrainConfig()
    if cfg.num_workers == 0 and cfg.use_gpu:
        raise TrainError("train.use_gpu needs num_workers >= 1 (local mode has no GPU placement)")
    if cfg.num_workers and on_checkpoint is not None:
        raise TrainError("on_checkpoint needs local mode (num_workers=0)")
    if cfg.early_stop_patience and not targets:
        raise TrainError("train.early_stop_patience needs the targets to score each epoch on")
    rows, skipped = _rows(records_path, model_spec, cfg, cache_dir)
    if init_adapter:
        _check_init_adapter(init_adapter, model_spec, cache_dir)
    workers = max(1, cfg.num_workers)
    per_worker = len(rows) // workers
    if per_worker == 0:
        raise TrainError(f"{records_path}: {len(rows)} example(s) for {workers} workers")
    per_epoch = optimizer_steps(per_worker, cfg.batch_size, cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * per_epoch
    loop_cfg = {"cfg": cfg, "model": model_spec, "init_adapter": init_adapter, "out": out,
                "cache_dir": cache_dir, "steps_per_epoch": per_epoch, "total_steps": total,
                "rows_per_worker": per_worker, "progress": progress}
    log.info("training %s on %d examples: %d steps (%d per epoch), %d worker(s)", model_spec,
             len(rows), total, per_epoch, cfg.num_workers)
    early_stop = None
    if cfg.num_workers == 0 and cfg.early_stop_patience:
        metrics, early_stop = _train_early_stop(loop_cfg, rows, targets, on_checkpoint)
        checkpoint = None
    elif cfg.num_workers == 0:
        from evoray.train.loop import LocalSession, train_loop

        session = LocalSession(on_checkpoint)
        train_loop({**loop_cfg, "rows": rows}, session)
        metrics, checkpoint = dict(session.metrics), None
    else:
        result = _fit(loop_cfg, rows, cfg, name)
        metrics = dict(result.metrics or {})
        checkpoint = result.checkpoint.path if result.checkpoint else None
    history = metrics.pop("history", [])
    sep = "/" if "://" in out else os.sep
    return TrainResult(adapter=out, adam_state=out.rstrip("/") + sep + "adam_state.safetensors",
                       metrics=metrics, history=history, n_examples=len(rows), skipped=skipped,
                       checkpoint=checkpoint, early_stop=early_stop)


def _train_early_stop(loop_cfg: dict, rows: list[dict], targets: list[dict],
                      on_checkpoint) -> tuple[dict, dict]:
    """Local training that keeps the epoch best on the targets (:mod:`evoray.train.early_stop`)
    and uploads that epoch's checkpoint folder to ``out``. Returns the loop's last report and
    the early-stopping record."""
    from evoray.lora import upload_dir
    from evoray.train.early_stop import KeepBest, StopTraining
    from evoray.train.loop import LocalSession, train_loop

    cfg = loop_cfg["cfg"]
    keeper = KeepBest(loop_cfg["model"], targets, cfg.early_stop_patience,
                      loop_cfg["steps_per_epoch"], max_length=cfg.max_length,
                      cache_dir=loop_cfg["cache_dir"])

    def hook(folder: str, metrics: dict) -> None:
        if on_checkpoint is not None:
            on_checkpoint(folder, metrics)
        keeper(folder, metrics)

    session = LocalSession(hook)
    try:
        try:
            train_loop({**loop_cfg, "rows": rows, "out": None}, session)
        except StopTraining:
            pass
        if keeper.best is None:
            raise TrainError("early stopping scored no epoch: train.max_steps ends before the "
                             "first epoch does")
        upload_dir(keeper.folder, loop_cfg["out"])
    finally:
        keeper.cleanup()
    record = {"best_epoch": keeper.best_epoch, "stopped_epoch": keeper.curve[-1]["epoch"],
              "patience": cfg.early_stop_patience, "curve": keeper.curve}
    log.info("early stopping kept epoch %d of %d (target accuracy %.3f)", keeper.best_epoch,
             record["stopped_epoch"], keeper.best["accuracy"])
    return dict(session.metrics), record


def _fit(loop_cfg: dict, rows: list[dict], cfg: TrainConfig, name: str | None):
    """Run the loop on ``cfg.num_workers`` Ray Train workers; the rows reach them as Ray Data
    shards in order. Returns Ray Train's ``Result``."""
    import ray
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from evoray.ray_utils import init_ray
    from evoray.train.loop import FAIL_ENV, train_loop

    init_ray()
    env = {FAIL_ENV: os.environ[FAIL_ENV]} if os.environ.get(FAIL_ENV) else {}
    run_config = RunConfig(
        worker_runtime_env={"env_vars": env} if env else None,
        name=name or f"evoray-train-{uuid.uuid4().hex[:8]}",
        storage_path=cfg.storage_path,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
        failure_config=FailureConfig(max_failures=cfg.max_failures))
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg, datasets={"train": ray.data.from_items(rows)},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=run_config)
    try:
        return trainer.fit()
    except EvorayError:
        raise
    except Exception as e:  # Ray wraps worker errors; keep an input error readable
        cause = _input_error(e)
        if cause is not None:
            raise cause from e
        raise
