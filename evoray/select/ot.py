"""Semi-relaxed entropic optimal transport, in the log domain, on dense or kNN-sparse costs.

Problem (targets j = 1..M are columns, candidates i = 1..N rows)::

    min_{π ≥ 0, Σ_i π_ij = b_j}  ⟨C, π⟩ + eps·KL(π ‖ a⊗b) + tau·KL(π·1 ‖ a)

The target marginal ``b`` is enforced exactly; the candidate marginal is only pulled towards the
reference ``a`` (uniform over the candidates still in play) by a KL penalty, so the mass a
candidate receives, ``r_i = Σ_j π_ij``, measures how strongly the targets pull on it. This is
POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, eps, reg_m=(tau, inf))`` (KL reference
``a⊗b``), which the tests compare against. POT solves the dense problem as well (and faster on a
first block: ``benchmarks/ot_solvers.py``), but it has no kNN-sparse form, which EvoSelect needs
above ``sparse_above`` candidates; one solver serves both, so dense and sparse selections share
their numerics and warm starts. Dual potentials ``f`` (N,) and ``g`` (M,) are kept in the log
domain and absorbed into a kernel ``K_ij = exp((f_i + g_j − C_ij)/eps)`` (Schmitzer's
stabilisation); between absorptions the updates are matrix-vector products with ``K``, which is
what makes 10⁵ × 10³ costs affordable::

    g-step (exact):  g_j ← −eps·log Σ_i a_i exp((f_i − C_ij)/eps)
    f-step (KL):     f_i ← −tau/(tau + eps) · eps·log Σ_j b_j exp((g_j − C_ij)/eps)

Each iteration ends with the g-step, so the returned plan meets the target marginal to rounding;
convergence is the L1 target-marginal violation that the f-step left before it, below ``tol``.

A sparse cost holds, for each target j, K entries ``C[j, :]`` on candidates ``idx[j, :]``; the
other pairs are absent (infinite cost). A dense cost is the case ``idx = None``, K = N.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["LocalParts", "OTPart", "OTResult", "SemiRelaxedOT", "lava_gradient"]

COLUMN_BLOCK = 8192  # candidates per block of a dense kernel rebuild (M × 8192 float64 temps)

log = logging.getLogger(__name__)


@dataclass
class OTResult:
    """Diagnostics of one solve.

    Attributes:
        iterations: f/g iterations run (absorption steps included).
        converged: the target-marginal violation before the last g-step fell below ``tol``.
        violation: that L1 violation.
        marginal_err: L1 error ``Σ_j |Σ_i π_ij − b_j|`` of the returned plan.
        cost: transport cost ``⟨C, π⟩``.
    """

    iterations: int
    converged: bool
    violation: float
    marginal_err: float
    cost: float
    absorptions: int = 0
    extra: dict = field(default_factory=dict)


class OTPart:
    """The candidate side of the problem for a set of candidates: their costs, potentials
    ``f``, reference masses ``a``, kernel ``K`` and scalings ``u``.

    Every per-candidate vector lives in a part; :class:`SemiRelaxedOT` keeps only per-target
    vectors and reduces the parts' per-target partial sums. A local selection has one part in
    the process; the sharded backend (:mod:`evoray.select.sharded`) has one per Ray actor, each
    holding its own candidates' costs, so the (M, N) cost never exists in one place.

    Args:
        C: (M, K) costs, float32; ``K = n`` when ``idx`` is None (dense).
        idx: (M, K) int64 candidate (of this part) of each cost entry, or None for dense.
        n: number of candidates in this part.
        eps, tau: as :class:`SemiRelaxedOT`.
        dtype: kernel precision.
    """

    def __init__(self, C: np.ndarray, idx: np.ndarray | None, n: int, *, eps: float,
                 tau: float, dtype: str):
        self.C, self.idx, self.n, self.eps = C, idx, n, eps
        self.fi = tau / (tau + eps)
        self.dtype = np.dtype(dtype)
        self.f = np.zeros(n)
        self.g = np.zeros(len(C))
        self.K: np.ndarray | None = None
        self.u = np.ones(n)
        self.a = np.full(n, 1.0 / max(n, 1))
        if idx is not None:  # segments of the entries of each candidate, for log-sum-exp
            flat = idx.ravel()
            self._order = np.argsort(flat, kind="stable")
            self._cands, self._starts = np.unique(flat[self._order], return_index=True)
        self.has = (np.ones(n, bool) if idx is None
                    else np.bincount(idx.ravel(), minlength=n) > 0)  # candidates with entries

    # ---- kernel products and log-sum-exps, by column blocks when dense ---------------------
    def _cols(self):
        """Column blocks of the (M, K) arrays: all at once when sparse."""
        width = self.C.shape[1] if self.idx is not None else COLUMN_BLOCK
        for s in range(0, self.C.shape[1], width):
            yield slice(s, min(s + width, self.C.shape[1]))

    def _exponent(self, f: np.ndarray, g: np.ndarray, cols: slice) -> torch.Tensor:
        """``(f_i + g_j − C_ij)/eps`` on columns ``cols``, as a float64 tensor."""
        fi = f[cols] if self.idx is None else f[self.idx[:, cols]]
        X = torch.from_numpy(np.asarray(fi, np.float64)) - torch.from_numpy(self.C[:, cols])
        X += torch.from_numpy(g)[:, None]
        return X.div_(self.eps)

    def _to_targets(self, x: np.ndarray) -> np.ndarray:
        """``Σ_i K_ji x_i`` for each target j: (n,) -> (M,)."""
        if self.idx is None:
            return self.K @ x.astype(self.dtype)
        return (self.K * x[self.idx]).sum(axis=1)

    def _to_candidates(self, y: np.ndarray) -> np.ndarray:
        """``Σ_j K_ji y_j`` for each candidate i: (M,) -> (n,)."""
        if self.idx is None:
            return y.astype(self.dtype) @ self.K
        return np.bincount(self.idx.ravel(), (self.K * y[:, None]).ravel(), minlength=self.n)

    def _lse_candidates(self, g: np.ndarray) -> np.ndarray:
        """``log Σ_j exp((g_j − C_ij)/eps)`` for each candidate i (−inf where it has no entry)."""
        zero = np.zeros(self.n)
        if self.idx is None:
            return np.concatenate([torch.logsumexp(self._exponent(zero, g, cols), dim=0).numpy()
                                   for cols in self._cols()])
        flat = self._exponent(zero, g, slice(None)).numpy().ravel()[self._order]
        top = np.maximum.reduceat(flat, self._starts)
        rep = np.repeat(top, np.diff(np.append(self._starts, len(flat))))
        out = np.full(self.n, -np.inf)
        out[self._cands] = top + np.log(np.add.reduceat(np.exp(flat - rep), self._starts))
        return out

    # ---- the steps the solver calls -----------------------------------------------------------
    def reference(self, a: np.ndarray | None = None) -> np.ndarray:
        """Set the reference masses (None: keep them) and reset ``u``; return, per target,
        whether it reaches a candidate with mass here ((M,) bool)."""
        if a is not None:
            self.a = np.asarray(a, np.float64)
        self.live = (self.a > 0) & self.has
        with np.errstate(divide="ignore"):
            self.log_a = np.log(self.a)
        self.u = np.ones(self.n)
        if self.idx is None:
            return np.full(len(self.C), self.live.any())
        return self.live[self.idx].any(axis=1)

    def drop(self, picked: np.ndarray, value: float) -> None:
        """Take the ``picked`` candidates out (``a = 0``) and set every other one to ``value``."""
        self.a[picked] = 0.0
        self.a[self.a > 0] = value

    def lse_targets(self) -> np.ndarray:
        """``log Σ_i exp((f_i + eps·log a_i − C_ij)/eps)`` for each target j, over this part."""
        f = self.f + self.eps * self.log_a
        out = torch.full((len(self.C),), -torch.inf, dtype=torch.float64)
        zero = np.zeros(len(self.C))
        for cols in self._cols():
            out = torch.logaddexp(out, torch.logsumexp(self._exponent(f, zero, cols), dim=1))
        return out.numpy()

    def log_f(self, g: np.ndarray, log_b: np.ndarray) -> None:
        """The f-step in the log domain for the new potentials ``g``, then rebuild ``K``."""
        self.g = np.array(g)  # a copy: a Ray argument is read-only
        with np.errstate(invalid="ignore"):
            lse = self._lse_candidates(g + self.eps * log_b)
        self.f = np.where(np.isfinite(lse), -self.fi * self.eps * lse, 0.0)
        self.u = np.ones(self.n)
        self._rebuild()

    def targets_u(self) -> np.ndarray:
        """``Σ_i K_ji a_i u_i`` for each target j, over this part."""
        return self._to_targets(self.a * self.u)

    def scale(self, y: np.ndarray) -> tuple[bool, float]:
        """The u-update for target scalings ``y = b·v``: ``(ok, max |log u|)``; not ok (u left
        as it was) when the kernel has left floating-point range."""
        s = self._to_candidates(y)
        live = self.live
        if not (np.isfinite(s[live]).all() and (s[live] > 0).all()):
            return False, np.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            log_u = np.where(live, -self.fi * np.log(s) - (1 - self.fi) * self.f / self.eps, 0.0)
        self.u = np.exp(log_u)
        return True, float(np.abs(log_u).max()) if len(log_u) else 0.0

    def absorb(self, g: np.ndarray) -> None:
        """Fold ``u`` into ``f``, take the solver's new ``g``, and rebuild ``K`` exactly from C
        (nothing to do when neither changed)."""
        if np.all(self.u == 1.0) and np.array_equal(g, self.g) and self.K is not None:
            return
        with np.errstate(divide="ignore"):
            f = self.f + self.eps * np.log(self.u)
        self.f = np.where(np.isfinite(f), f, 0.0)
        self.g = np.array(g)
        self.u = np.ones(self.n)
        self._rebuild()

    def _rebuild(self) -> None:
        """``K = exp((f ⊕ g − C)/eps)`` at the stored entries."""
        if self.K is None:
            self.K = np.empty(self.C.shape, self.dtype)
        for cols in self._cols():
            self.K[:, cols] = torch.exp(self._exponent(self.f, self.g, cols)).numpy()

    def marginal(self) -> np.ndarray:
        """``Σ_i K_ji a_i`` for each target j, over this part."""
        return self._to_targets(self.a)

    def plan_cost(self, b: np.ndarray) -> float:
        """This part's share of ``⟨C, π⟩``."""
        if self.idx is None:
            return sum(float(b @ ((self.K[:, c] * self.C[:, c]) @ self.a[c]))
                       for c in self._cols())
        return float((self.plan_entries(b) * self.C).sum())

    def plan_entries(self, b: np.ndarray) -> np.ndarray:
        """π at the stored entries, (M, K)."""
        ai = self.a if self.idx is None else self.a[self.idx]
        return self.K * ai * b[:, None]

    def mass(self, b: np.ndarray) -> np.ndarray:
        """Received mass ``r_i = Σ_j π_ij`` of this part's candidates, (n,)."""
        return self.a * self._to_candidates(b)

    def carried(self, picked: np.ndarray) -> np.ndarray:
        """``Σ_{i ∈ picked} K_ji a_i`` for each target j (times ``b_j``: the mass carried)."""
        x = np.zeros(self.n)
        x[picked] = self.a[picked]
        return self._to_targets(x)

    def potentials(self) -> np.ndarray:
        """``f``, +inf where a candidate takes no mass."""
        f = self.f.copy()
        f[(self.a <= 0) | ~self.has] = np.inf
        return f


class LocalParts:
    """Parts held in this process: ``call(name, *args)`` runs the method on each part and
    returns the list of results; ``each(name, args)`` gives part p the arguments ``args[p]``."""

    def __init__(self, parts: list[OTPart]):
        self.parts = parts

    def call(self, name: str, *args) -> list:
        return [getattr(p, name)(*args) for p in self.parts]

    def each(self, name: str, args: list) -> list:
        return [getattr(p, name)(*a) for p, a in zip(self.parts, args, strict=True)]


def _total(parts: list[np.ndarray]) -> np.ndarray:
    """Sum of per-target partials, in part order (one part: its array unchanged)."""
    out = parts[0]
    for x in parts[1:]:
        out = out + x
    return out


class SemiRelaxedOT:
    """Warm-startable semi-relaxed OT between N candidates and M targets.

    Args:
        C: (M, K) costs, float32; ``K = N`` when ``idx`` is None (dense).
        idx: (M, K) int64 candidate of each cost entry, or None for a dense cost.
        n: number of candidates N.
        eps: entropic regularisation (> 0), in cost units.
        tau: KL penalty on the candidate marginal (> 0).
        tol: stop when the L1 target-marginal violation is below this.
        max_iter: iteration cap per :meth:`solve`.
        absorb_at: absorb the scalings into the kernel when ``|log u|`` or ``|log v|`` exceeds
            this (keeps the kernel in floating-point range).
        dtype: kernel precision; ``None`` = float64 up to 10⁷ entries, float32 above.
        parts: instead of ``C``/``idx``, candidate parts held elsewhere (an object with
            :class:`LocalParts`' ``call``/``each``, e.g. the sharded backend's actors) and the
            number of targets as ``C``'s place: ``SemiRelaxedOT(None, None, n, m=M, parts=...)``.
        m: number of targets when ``parts`` is given.
    """

    def __init__(self, C: np.ndarray | None, idx: np.ndarray | None, n: int, *, eps: float,
                 tau: float, tol: float = 1e-6, max_iter: int = 5000, absorb_at: float = 30.0,
                 dtype: str | None = None, parts=None, m: int | None = None):
        if eps <= 0 or tau <= 0:
            raise ValueError(f"eps and tau must be positive, got eps={eps}, tau={tau}")
        self.n, self.eps, self.tol, self.max_iter, self.absorb_at = n, eps, tol, max_iter, \
            absorb_at
        if parts is None:
            dtype = dtype or ("float64" if C.size <= 10_000_000 else "float32")
            self.part = OTPart(C, idx, n, eps=eps, tau=tau, dtype=dtype)
            parts, m = LocalParts([self.part]), len(C)
        self.parts, self.m = parts, m
        self.g = np.zeros(m)
        self.started = False
        self.b = np.full(m, 1.0 / m)

    def _log_step(self, log_b: np.ndarray) -> None:
        """One exact g-step and f-step in the log domain (the parts rebuild their kernels)."""
        lse = self.parts.call("lse_targets")
        out = torch.from_numpy(np.array(lse[0]))
        for x in lse[1:]:
            out = torch.logaddexp(out, torch.from_numpy(np.array(x)))
        g = -self.eps * out.numpy()
        self.g = np.where(np.isfinite(g), g, 0.0)
        self.parts.call("log_f", self.g, log_b)

    def _absorb(self, v: np.ndarray) -> None:
        """Fold the scalings into the potentials and rebuild the kernels exactly from C."""
        self.g = self.g + self.eps * np.log(v)  # v = 1/t with t > 0 finite: no inf here
        self.parts.call("absorb", self.g)

    def solve(self, b: np.ndarray, a: np.ndarray | None = None) -> OTResult:
        """Solve for target masses ``b`` (M,) and candidate reference ``a`` (N,), warm-started
        from the potentials of the previous call (``a`` None: the parts keep theirs).

        Candidates with ``a_i = 0`` take no mass; targets with ``b_j = 0`` are left out. Every
        target with mass must reach at least one candidate with ``a_i > 0``.
        """
        on = b > 0
        reach = np.logical_or.reduce(self.parts.call("reference", a))
        if (on & ~reach).any():
            raise ValueError(f"{int((on & ~reach).sum())} targets with mass reach no candidate")
        with np.errstate(divide="ignore"):
            log_b = np.log(b)
        self.b = b
        absorptions = it = 0
        if not self.started:
            self._log_step(log_b)
            self.started = True
            absorptions += 1
        v = np.ones(len(b))
        violation, converged = np.inf, False
        while it < self.max_iter:
            it += 1
            t = _total(self.parts.call("targets_u"))
            ok = np.isfinite(t[on]).all() and (t[on] > 0).all()
            if ok:
                violation = float(np.abs(b * v * t - b)[on].sum())
                v = np.where(on, 1.0 / np.where(on, t, 1.0), 1.0)
                if violation < self.tol:
                    converged = True
                    break
                scaled = self.parts.call("scale", b * v)
                ok = all(s[0] for s in scaled)
            if not ok:  # the kernel left floating-point range: redo the step in the log domain
                self._absorb(v)
                self._log_step(log_b)
                absorptions += 1
                v = np.ones(len(b))
                continue
            log_u = max(s[1] for s in scaled)
            if max(log_u, np.abs(np.log(v)).max()) > self.absorb_at:
                self._absorb(v)
                absorptions += 1
                v = np.ones(len(b))
        self._absorb(v)
        if not converged:
            log.warning("semi-relaxed OT stopped after %d iterations with target-marginal "
                        "violation %.2e (tol %.0e)", it, violation, self.tol)
        marginal_err = float(np.abs(b * _total(self.parts.call("marginal")) - b).sum())
        plan_cost = sum(self.parts.call("plan_cost", b))
        return OTResult(iterations=it, converged=converged, violation=violation,
                        marginal_err=marginal_err, cost=plan_cost, absorptions=absorptions)

    # ---- outputs of the last solve (mass, carried, potentials: local parts only return
    # ---- the whole vector; the sharded backend calls the parts itself) -------------------------
    def plan(self) -> np.ndarray:
        """The dense (N, M) plan π of a local solver (small problems only)."""
        P = self.part.plan_entries(self.b)
        if self.part.idx is None:
            return P.T.astype(np.float64)
        out = np.zeros((self.n, self.m))
        np.add.at(out, (self.part.idx, np.arange(self.m)[:, None]), P)
        return out

    def mass(self) -> np.ndarray:
        """Received mass ``r_i = Σ_j π_ij`` of every candidate, (N,)."""
        return np.concatenate(self.parts.call("mass", self.b))

    def carried(self, picked: np.ndarray) -> np.ndarray:
        """``Σ_{i ∈ picked} π_ij`` for each target j, (M,), for a local solver."""
        return self.b * self.part.carried(picked)

    def potentials(self) -> tuple[np.ndarray, np.ndarray]:
        """Dual potentials ``(f, g)``: POT's ``eps·logu``, ``eps·logv``. Candidates that take no
        mass (``a_i = 0`` or outside every target's list) get ``f_i = +inf``."""
        return np.concatenate(self.parts.call("potentials")), self.g.copy()


def lava_gradient(f: np.ndarray) -> np.ndarray:
    """LAVA's calibrated dual gradient ``(1 + 1/(N−1))·f_i − Σ_l f_l/(N−1)`` (Just et al., 2023).

    Lower means more aligned. Candidates with an infinite potential (no mass) get +inf and are
    left out of the sum; N counts the finite ones.
    """
    finite = np.isfinite(f)
    n = int(finite.sum())
    out = np.full(len(f), np.inf)
    if n < 2:
        out[finite] = 0.0
        return out
    out[finite] = (1 + 1 / (n - 1)) * f[finite] - f[finite].sum() / (n - 1)
    return out
