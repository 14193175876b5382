"""Features of tokenized batches: proxy model + batched per-sample gradients + projection.

:class:`FeatureExtractor` is the whole computation, without Ray; the Ray Data stage
(:mod:`evoray.features.stage`) runs one per actor and hands it a block's batches at once.

Gradients are computed batch by batch, but projected in *passes* of several batches, up to
``proj_batch_mb`` of held gradients: every pass walks the whole projection matrix, regenerating
what the cache does not hold, so a pass of 96 rows instead of one batch of 16 pays that walk once
for six batches. It matters for a trained proxy: SmolLM2's round-2 adapter (r 16 on all seven
projections, 4.9M gradient entries) makes the matrix 20 GB at dim 1024, ten times the default
cache; per 16 rows the projection then took 11 s against 4 s for the gradients. A feature does
not depend on the pass it came in (:mod:`evoray.features.projection` projects fixed groups of
rows), so the passes change speed and memory only.
"""

from __future__ import annotations

import contextlib
import math

import torch

from evoray.config import FeaturesConfig
from evoray.errors import FeatureError
from evoray.features.grads import BatchedGradients, adam_precondition, reference_gradients
from evoray.features.projection import ROWS, RademacherProjector
from evoray.lora import attach_lora, load_adam_state

__all__ = ["FeatureExtractor", "default_dim"]


def default_dim(cfg: FeaturesConfig, device: str | torch.device) -> int:
    """``cfg.dim``, else 8192 on a GPU (LESS) and 1024 on a CPU."""
    return cfg.dim or (8192 if torch.device(device).type == "cuda" else 1024)


class FeatureExtractor:
    """Projected per-sample LoRA-gradient features of a proxy model.

    Args:
        model, tokenizer: a base causal LM (from :func:`evoray.models.load_model`).
        cfg: features settings (LoRA shape, dim, seed, projection memory).
        adapter: folder of a trained LoRA adapter; None = a fresh LoRA (``B = 0``).
        adam_state: file from :func:`save_adam_state`; candidates' gradients are then Adam-
            preconditioned (LESS). Target features must be computed without it.
        device: where the model runs.
        reference: compute gradients the LESS way (one backward per sample), for benchmarks.
    """

    def __init__(self, model, tokenizer, cfg: FeaturesConfig, *, adapter: str | None = None,
                 adam_state: str | None = None, device: str = "cpu", reference: bool = False):
        self.cfg, self.device, self.reference = cfg, torch.device(device), reference
        self.tokenizer = tokenizer
        self.model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha,
                                 target_modules=cfg.target_modules, adapter=adapter,
                                 seed=cfg.seed)
        self.model.to(self.device)
        self.grads = BatchedGradients(self.model)
        self.adam = load_adam_state(adam_state, self.model) if adam_state else None
        self.dim = default_dim(cfg, self.device)
        self.projector = RademacherProjector(self.grads.sizes, self.dim, cfg.seed,
                                             block_mb=cfg.proj_block_mb,
                                             cache_mb=cfg.proj_cache_mb, device=self.device)

    @property
    def a_skipped(self) -> bool:
        """True when the ``A`` gradients are skipped (every ``B`` is zero and no Adam state)."""
        return self.grads.a_skipped and self.adam is None and not self.reference

    @property
    def proj_rows(self) -> int:
        """Most rows a projection pass holds gradients for: ``proj_batch_mb`` over a row's
        gradient bytes, rounded down to whole groups of ``ROWS`` (a pass that ends mid-group
        pads it), at least one batch whatever its size."""
        rows = int(self.cfg.proj_batch_mb * 2**20 // (4 * sum(self.grads.sizes)))
        return max(1, rows // ROWS * ROWS or rows)

    def __call__(self, batch: dict[str, torch.Tensor], ids=None):
        """Features of a right-padded batch (``input_ids``, ``attention_mask``, ``labels``).

        Returns:
            ``(features (B, dim) float32, grad_norm (B,), loss (B,))`` as numpy arrays.

        Raises:
            FeatureError: naming the sample (``ids[n]`` if given) whose loss or gradient is not
                finite, or that has no response token.
        """
        return self.many([(batch, ids)])[0]

    def many(self, batches):
        """:meth:`__call__` for each ``(batch, ids)`` of ``batches``, gradients projected in
        passes of whole batches holding at most :attr:`proj_rows` rows (one batch if larger)."""
        out, pending, held = [], [], 0
        for batch, ids in batches:
            n = batch["input_ids"].shape[0]
            if pending and held + n > self.proj_rows:
                out += self._project(pending)
                pending, held = [], 0
            pending.append(self._gradients(batch, ids))
            held += n
        return out + (self._project(pending) if pending else [])

    def _gradients(self, batch: dict[str, torch.Tensor], ids):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids = list(ids) if ids is not None else list(range(batch["input_ids"].shape[0]))
        empty = (batch["labels"][:, 1:] == -100).all(1)
        if empty.any():
            raise FeatureError(f"sample {ids[int(empty.nonzero()[0])]!r} has no response token "
                               f"to compute a loss on")
        with (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.bf16
              else contextlib.nullcontext()):
            if self.reference:
                grads, losses = reference_gradients(self.model, batch)
            else:
                grads, losses = self.grads(batch)
        if self.adam is not None:
            n = batch["input_ids"].shape[0]
            grads = [g if g is not None else torch.zeros(n, *s[0].shape, device=self.device)
                     for g, s in zip(grads, self.adam, strict=False)]
            grads = adam_precondition(grads, self.adam)
        sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads if g is not None)
        return [grads, sq, losses, ids]

    def _project(self, pending: list) -> list:
        """Project the held batches' gradients in one pass; check and return each batch's."""
        grads = [g for g, *_ in pending]
        for b in pending:  # the pass holds the concatenated copy alone
            b[0] = None
        joined = []
        for p in range(len(grads[0])):
            parts = [g[p] for g in grads]
            joined.append(None if parts[0] is None else torch.cat(parts) if len(parts) > 1
                          else parts[0])
            for g in grads:
                g[p] = None
        features = self.projector.project(joined)
        del joined
        out, at = [], 0
        for _, sq, losses, ids in pending:
            f, at = features[at:at + len(ids)], at + len(ids)
            finite = torch.isfinite(losses) & torch.isfinite(sq) & torch.isfinite(f).all(1)
            if not finite.all():
                n = int((~finite).nonzero()[0])
                raise FeatureError(f"sample {ids[n]!r}: non-finite loss or gradient "
                                   f"(loss {losses[n].item()})")
            out.append((f.cpu().numpy(), sq.sqrt().float().cpu().numpy(),
                        losses.float().cpu().numpy()))
        return out

    def info(self) -> dict:
        """What the features depend on, for the metadata file."""
        return {
            "dim": self.dim, "seed": self.cfg.seed, "lora_r": self.cfg.lora_r,
            "lora_alpha": self.cfg.lora_alpha, "target_modules": list(self.cfg.target_modules),
            "layers": [p.name for p in self.grads.pairs], "a_skipped": self.a_skipped,
            "adam": self.adam is not None, "bf16": self.cfg.bf16,
            "gradient_entries": sum(self.grads.sizes),
            "projection_block_rows": self.projector.block_rows,
            "projection_cached_mb": math.ceil(self.projector.cached_bytes / 2**20),
            "projection_peak_mb": math.ceil(self.projector.peak_bytes / 2**20),
        }

