"""Per-sample LoRA gradients of a proxy model, a whole batch in one forward and one backward.

The proxy is a causal LM with a LoRA adapter (peft). A sample's loss is the mean cross-entropy
over its response tokens (labels != -100); a batch's loss is the *sum* of its samples' losses, so
the gradient reaching sample n's activations comes from sample n's loss alone.

For a LoRA pair ``y = B(A x)·s``, forward hooks on the ``A`` and ``B`` linears keep each one's
input, and tensor hooks their output gradient. The gradient of a linear ``W`` (out×in) for sample n
is ``Σ_t δ_{n,t} ⊗ x_{n,t}`` (output gradient × input, summed over the sample's tokens), so

* ``∂L_n/∂B = δ_Bᵀ h`` with ``h = A x`` the input of ``B`` and ``δ_B = ∂L_n/∂y · s``,
* ``∂L_n/∂A = δ_Aᵀ x`` with ``δ_A = δ_B B``, the gradient reaching ``h``,

which is docs/algorithms.md §1's ``s·Δᵀ(X Aᵀ)`` and ``s·(Δ B)ᵀ X``. Right padding makes padded
positions carry exactly zero gradient, so no mask is needed. When every ``B`` is zero (a fresh
adapter) the ``A`` gradients are identically zero: they are skipped (``a_skipped``), which leaves
the projected feature unchanged since zero blocks project to zero.

The LoRA weights themselves do not require grad during extraction (autograd would otherwise also
sum their gradients over the batch, work nobody reads); the input embeddings do, so the backward
reaches every layer. The batched path asks the model for the logits of response positions only
(:func:`evoray.models.response_logits`); :func:`reference_gradients` is the plain LESS way (one
``loss.backward()`` per sample, full logits) that tests and benchmarks compare against.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from evoray.data.tokenize import IGNORE
from evoray.lora import lora_pairs
from evoray.models import response_logits, sample_means

__all__ = ["per_sample_losses", "BatchedGradients", "reference_gradients", "adam_precondition"]


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over response tokens, per sample: ``(B,)``.

    ``logits`` is ``(B, T, V)``; ``labels`` ``(B, T)`` with ``-100`` on prompt and padding.
    """
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                          ignore_index=IGNORE, reduction="none").view_as(target)
    count = (target != IGNORE).sum(1)
    return nll.sum(1) / count.clamp(min=1)


def _forward_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`per_sample_losses` from the logits of the response positions alone (see
    :func:`evoray.models.response_logits`); the reference path reads the full logits."""
    logits, target, row, _ = response_logits(model, batch)
    nll = F.cross_entropy(logits, target, reduction="none")
    return sample_means(nll, row, batch["labels"].shape[0])


def _full_forward_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return per_sample_losses(out.logits, batch["labels"])


class BatchedGradients:
    """Per-sample gradients of every LoRA matrix for a batch, from one forward and one backward.

    Args:
        model: a peft model from :func:`attach_lora`.

    Attributes:
        pairs: the LoRA pairs; the gradient is flattened as ``[A_0, B_0, A_1, B_1, ...]``.
        sizes: entries of each matrix in that order (for the projector).
        a_skipped: True when every ``B`` is zero, so the ``A`` gradients are skipped (None).
    """

    def __init__(self, model):
        self.model = model
        self.pairs = lora_pairs(model)
        self.sizes = [n for p in self.pairs for n in (p.A.weight.numel(), p.B.weight.numel())]
        self.a_skipped = all(bool((p.B.weight == 0).all()) for p in self.pairs)

    @contextmanager
    def _hooks(self, store: dict):
        handles = []

        def keep(key, want_grad):
            def hook(module, inputs, output):
                store[key, "in"] = inputs[0].detach()
                if want_grad:
                    output.register_hook(lambda g: store.__setitem__((key, "grad"), g.detach()))
            return hook

        for i, pair in enumerate(self.pairs):
            handles.append(pair.A.register_forward_hook(keep((i, "A"), not self.a_skipped)))
            handles.append(pair.B.register_forward_hook(keep((i, "B"), True)))
        embed = self.model.get_input_embeddings()
        handles.append(embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def __call__(self, batch: dict[str, torch.Tensor]):
        """Returns ``(grads, losses)``: ``grads[p]`` is ``(B, *shape of matrix p)`` float32, or
        None for skipped ``A`` matrices; ``losses`` is ``(B,)``."""
        store: dict = {}
        with self._hooks(store), torch.enable_grad():
            losses = _forward_losses(self.model, batch)
            losses.sum().backward()
        grads = []
        for i in range(len(self.pairs)):
            if self.a_skipped:
                grads.append(None)
            else:
                grads.append(torch.einsum("btr,bti->bri", store[(i, "A"), "grad"].float(),
                                          store[(i, "A"), "in"].float()))
            grads.append(torch.einsum("bto,btr->bor", store[(i, "B"), "grad"].float(),
                                      store[(i, "B"), "in"].float()))
        return grads, losses.detach()


def reference_gradients(model, batch: dict[str, torch.Tensor]):
    """The LESS way: one forward and ``loss.backward()`` per sample, reading ``.grad`` of every
    LoRA matrix. Same output layout as :class:`BatchedGradients` (``A`` always computed)."""
    pairs = lora_pairs(model)
    params = [w for p in pairs for w in (p.A.weight, p.B.weight)]
    for w in params:
        w.requires_grad_(True)
    grads, losses = [[] for _ in params], []
    try:
        for n in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][n].sum())
            one = {k: v[n:n + 1, :length] for k, v in batch.items()}
            for w in params:
                w.grad = None
            with torch.enable_grad():
                loss = _full_forward_losses(model, one)[0]
                loss.backward()
            losses.append(loss.detach())
            for g, w in zip(grads, params, strict=False):
                g.append(w.grad.detach().clone())
    finally:
        for w in params:
            w.requires_grad_(False)
            w.grad = None
    return [torch.stack(g) for g in grads], torch.stack(losses)


def adam_precondition(grads: list[torch.Tensor | None], state: list[tuple | None], *,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
    """LESS's Adam-preconditioned gradient, per sample: ``m' / sqrt(v' + eps)`` with
    ``m' = β1·m + (1-β1)·g`` and ``v' = β2·v + (1-β2)·g²``, from the optimizer's ``(m, v)`` of
    each matrix (``state[p]``, shaped like the matrix). A matrix with no state (None) or no
    gradient (None) is passed through unchanged."""
    out = []
    for g, s in zip(grads, state, strict=False):
        if g is None or s is None:
            out.append(g)
            continue
        m, v = (t.to(g.device, torch.float32) for t in s)
        m2 = beta1 * m + (1 - beta1) * g
        v2 = beta2 * v + (1 - beta2) * g * g
        out.append(m2 / torch.sqrt(v2 + eps))
    return out
