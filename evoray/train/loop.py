"""The Ray Train worker loop: LoRA fine-tuning with response-only loss, checkpoints, resume.

Each worker receives tokenized examples (``input_ids``, ``labels``: -100 on the prompt) as its Ray
Data shard (``ray.train.get_dataset_shard("train")``; in local mode, ``num_workers=0``, the rows
come in the loop config and Ray is not started). The shard is small (a selection), so it is read
once into memory; every epoch permutes it with ``seed + epoch`` and cuts it into micro-batches of
``batch_size``, ``grad_accum`` of which make one optimizer step. Before each step the torch RNG is
reseeded with ``seed + step``, so dropout depends on the step alone and a run resumed from a
checkpoint continues exactly as an uninterrupted one would.

A checkpoint (every ``checkpoint_every`` steps, at each epoch's end and at the last step) is a
folder with the adapter (peft files + tokenizer + ``evoray_adapter.json``), ``trainer_state.pt``
(optimizer and scheduler ``state_dict``; it loads with ``torch.load(weights_only=True)``),
``adam_state.safetensors`` (the LoRA matrices' Adam moments in the format
:func:`evoray.lora.load_adam_state` reads: ``<module>.lora_A.exp_avg`` /
``.exp_avg_sq`` and the same for ``lora_B``; module names are those of a peft model wrapping the
base, as :func:`evoray.lora.attach_lora` builds it) and ``state.json`` (global step,
epoch, step in epoch = the data position, the loss history and the config). Rank 0 attaches it to
``ray.train.report``; every worker reports the same metrics the same number of times.

The loop talks to its runner through a small session (rank, world size, the checkpoint to resume
from, ``report``): :class:`RaySession` inside Ray Train workers, :class:`LocalSession` when
:func:`evoray.train.train` runs the loop in its own process (``num_workers=0``), with no Ray
call at all, so local training also runs inside a Tune trial or a Ray task. The local session
keeps the last report and may hand every checkpoint folder to a callback (``on_checkpoint``)
before it is deleted: the hook that per-epoch evaluation and early stopping use.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from evoray.data.tokenize import Encoded, collate
from evoray.models import response_logits

__all__ = ["train_loop", "response_loss", "FAIL_ENV", "save_checkpoint", "optimizer_steps",
           "LocalSession", "RaySession"]

FAIL_ENV = "EVORAY_TRAIN_FAIL_AT_STEP"  # tests: raise once at this step unless resumed


def optimizer_steps(n_rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch over ``n_rows`` examples (last partial batch kept)."""
    return math.ceil(math.ceil(n_rows / batch_size) / grad_accum)


def _schedule(step: int, total: int, warmup: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def response_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce",
                  q: float = 0.7) -> torch.Tensor:
    """The mean over response tokens of cross-entropy (``kind="ce"``) or of the generalized
    cross-entropy ``(1 - p ** q) / q`` (``"gce"``), ``p`` the probability of each target token.
    GCE's gradient is cross-entropy's times ``p ** q``: a token the model finds unlikely (a wrong
    label, once the rule is partly learnt) pulls less than under cross-entropy."""
    if kind == "ce":
        return torch.nn.functional.cross_entropy(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return ((1.0 - torch.exp(-q * ce)) / q).mean()


def _set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _build_model(c: dict, device: torch.device):
    from evoray.lora import fresh_adapter, load_adapter, localize
    from evoray.models import load_model

    cfg = c["cfg"]
    model, tok = load_model(c["model"], cache_dir=c.get("cache_dir"))
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        (enable or model.gradient_checkpointing_enable)()
        model.config.use_cache = False
    if c.get("init_adapter"):
        local, handle = localize(c["init_adapter"])
        model = load_adapter(model, local, trainable=True)
        if handle is not None:
            handle.cleanup()
    else:
        model = fresh_adapter(model, cfg, cfg.seed)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model.to(device), tok


def save_checkpoint(folder: str, model, tok, optimizer, scheduler, state: dict, c: dict) -> None:
    """Write the checkpoint described in the module docstring into ``folder``."""
    from evoray.lora import save_adam_state, write_meta

    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_meta(folder, c["model"], model.get_base_model())
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(folder, "trainer_state.pt"))
    if state["step"] > 0:
        save_adam_state(optimizer, model, os.path.join(folder, "adam_state.safetensors"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, indent=1)


def _load_checkpoint(d: str, model, optimizer, scheduler) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(os.path.join(d, "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    trainer = torch.load(os.path.join(d, "trainer_state.pt"), weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    with open(os.path.join(d, "state.json")) as f:
        return json.load(f)


class RaySession:
    """The loop inside a Ray Train worker: its shard, ``ray.train.get_checkpoint`` and
    ``ray.train.report``."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def rows(self, c: dict) -> list[dict]:
        import ray.train

        return list(ray.train.get_dataset_shard("train").iter_rows())[:c["rows_per_worker"]]

    def checkpoint(self):
        """The ``ray.train.Checkpoint`` to resume from (None: start afresh)."""
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, folder: str | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=None if folder is None else
                         Checkpoint.from_directory(folder))


class LocalSession:
    """The loop in the caller's process (``num_workers=0``): rows from the config, no resume,
    the last report kept in ``metrics``; ``on_checkpoint(folder, metrics)``, if given, sees every
    checkpoint folder (at each epoch's end, every ``checkpoint_every`` steps, and the last) while
    it exists."""

    rank, world, local_rank = 0, 1, 0

    def __init__(self, on_checkpoint=None):
        self.on_checkpoint, self.metrics = on_checkpoint, {}

    def rows(self, c: dict) -> list[dict]:
        return c["rows"]

    def checkpoint(self) -> None:
        return None

    def report(self, metrics: dict, folder: str | None) -> None:
        self.metrics = metrics
        if folder is not None and self.on_checkpoint is not None:
            self.on_checkpoint(folder, metrics)


def train_loop(c: dict, session: LocalSession | RaySession | None = None) -> None:
    """Ray Train's per-worker function (``session`` None: a :class:`RaySession`); ``c`` holds
    ``cfg`` (TrainConfig), ``model``, ``init_adapter``, ``out``, ``steps_per_epoch``,
    ``total_steps`` and the rows (local) or their count per worker. Torch's
    deterministic-algorithms flag is restored on return (local mode runs in the caller's
    process)."""
    flag = torch.are_deterministic_algorithms_enabled()
    try:
        _train(c, session or RaySession())
    finally:
        torch.use_deterministic_algorithms(flag)


def _train(c: dict, session) -> None:
    cfg = c["cfg"]
    rank, world = session.rank, session.world
    device = torch.device(f"cuda:{session.local_rank}" if cfg.use_gpu else "cpu")
    _set_determinism(cfg.seed)
    rows = [Encoded([int(t) for t in r["input_ids"]], [int(t) for t in r["labels"]])
            for r in session.rows(c)]
    model, tok = _build_model(c, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total, per_epoch = c["total_steps"], c["steps_per_epoch"]
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, total, warmup, cfg.schedule))
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "resumed_from_step": 0, "history": []}
    resume = session.checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = _load_checkpoint(d, model, optimizer, scheduler)
        state["resumed_from_step"] = state["step"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cfg.use_gpu else None)
    fail_at = int(os.environ.get(FAIL_ENV, "0"))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16
                else contextlib.nullcontext())
    net.train()
    t0, samples = time.perf_counter(), 0
    while state["step"] < total:
        order = np.random.default_rng(cfg.seed + state["epoch"]).permutation(len(rows))
        micro = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for k in range(state["step_in_epoch"], per_epoch):
            if state["step"] >= total:
                break
            if fail_at and state["step"] == fail_at and state["resumed_from_step"] == 0:
                raise RuntimeError(f"{FAIL_ENV}={fail_at}: injected failure")
            torch.manual_seed(cfg.seed + state["step"])
            group = micro[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
            loss_sum = 0.0
            for j, idx in enumerate(group):
                batch = {n: t.to(device) for n, t in
                         collate([rows[i] for i in idx], tok.pad_token_id).items()}
                sync = j == len(group) - 1 or world == 1
                with (contextlib.nullcontext() if sync else net.no_sync()), autocast:
                    logits, target, _, _ = response_logits(net, batch)
                    loss = response_loss(logits, target, cfg.loss, cfg.gce_q)
                (loss / len(group)).backward()
                loss_sum += loss.item() / len(group)
                samples += len(idx)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["history"].append(round(loss_sum, 6))
            epoch_end = k + 1 == per_epoch
            state["epoch"] += epoch_end
            state["step_in_epoch"] = 0 if epoch_end else k + 1
            if c.get("progress") and rank == 0 and (
                    state["step"] % max(1, total // 10) == 0 or state["step"] == total):
                print(f"[train] step {state['step']}/{total} (epoch {state['epoch']}) loss "
                      f"{loss_sum:.4f}, {samples / (time.perf_counter() - t0):.1f} samples/s",
                      flush=True)
            if (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0) or \
                    epoch_end or state["step"] == total:
                _report(session, model, tok, optimizer, scheduler, state, c, loss_sum,
                        samples / (time.perf_counter() - t0))


def _report(session, model, tok, optimizer, scheduler, state, c, loss, rate) -> None:
    metrics = {"step": state["step"], "epoch": state["epoch"], "loss": loss,
               "samples_per_s": rate, "resumed_from_step": state["resumed_from_step"],
               "history": list(state["history"]), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="evoray-ckpt-") as tmp:
        folder = None
        if session.rank == 0:
            save_checkpoint(tmp, model, tok, optimizer, scheduler, state, c)
            if state["step"] == c["total_steps"] and c.get("out"):
                from evoray.lora import upload_dir

                upload_dir(tmp, c["out"])
            folder = tmp
        session.report(metrics, folder)
