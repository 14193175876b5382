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

__all__ = ["OTResult", "SemiRelaxedOT", "lava_gradient"]

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
    """

    def __init__(self, C: np.ndarray, idx: np.ndarray | None, n: int, *, eps: float,
                 tau: float, tol: float = 1e-6, max_iter: int = 5000, absorb_at: float = 30.0,
                 dtype: str | None = None):
        if eps <= 0 or tau <= 0:
            raise ValueError(f"eps and tau must be positive, got eps={eps}, tau={tau}")
        self.C, self.idx, self.n = C, idx, n
        self.eps, self.tau, self.tol, self.max_iter, self.absorb_at = eps, tau, tol, max_iter, \
            absorb_at
        self.dtype = np.dtype(dtype or ("float64" if C.size <= 10_000_000 else "float32"))
        self.fi = tau / (tau + eps)
        self.f = np.zeros(n)
        self.g = np.zeros(len(C))
        self.K: np.ndarray | None = None
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
        """``Σ_i K_ji x_i`` for each target j: (N,) -> (M,)."""
        if self.idx is None:
            return self.K @ x.astype(self.dtype)
        return (self.K * x[self.idx]).sum(axis=1)

    def _to_candidates(self, y: np.ndarray) -> np.ndarray:
        """``Σ_j K_ji y_j`` for each candidate i: (M,) -> (N,)."""
        if self.idx is None:
            return y.astype(self.dtype) @ self.K
        return np.bincount(self.idx.ravel(), (self.K * y[:, None]).ravel(), minlength=self.n)

    def _lse_targets(self, f: np.ndarray) -> np.ndarray:
        """``log Σ_i exp((f_i − C_ij)/eps)`` for each target j."""
        out = torch.full((len(self.C),), -torch.inf, dtype=torch.float64)
        zero = np.zeros(len(self.C))
        for cols in self._cols():
            out = torch.logaddexp(out, torch.logsumexp(self._exponent(f, zero, cols), dim=1))
        return out.numpy()

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

    def _log_step(self, log_a: np.ndarray, log_b: np.ndarray) -> None:
        """One exact g-step and f-step in the log domain, then rebuild the kernel from C."""
        eps = self.eps
        g = -eps * self._lse_targets(self.f + eps * log_a)
        self.g = np.where(np.isfinite(g), g, 0.0)
        with np.errstate(invalid="ignore"):
            lse = self._lse_candidates(self.g + eps * log_b)
        self.f = np.where(np.isfinite(lse), -self.fi * eps * lse, 0.0)
        self._rebuild()

    def _rebuild(self) -> None:
        """``K = exp((f ⊕ g − C)/eps)`` at the stored entries."""
        if self.K is None:
            self.K = np.empty(self.C.shape, self.dtype)
        for cols in self._cols():
            self.K[:, cols] = torch.exp(self._exponent(self.f, self.g, cols)).numpy()

    def solve(self, b: np.ndarray, a: np.ndarray) -> OTResult:
        """Solve for target masses ``b`` (M,) and candidate reference ``a`` (N,), warm-started
        from the potentials of the previous call.

        Candidates with ``a_i = 0`` take no mass; targets with ``b_j = 0`` are left out. Every
        target with mass must reach at least one candidate with ``a_i > 0``.
        """
        eps, fi = self.eps, self.fi
        on = b > 0
        live = (a > 0) & self.has
        reach = live[self.idx].any(axis=1) if self.idx is not None else np.full(len(b), live.any())
        if (on & ~reach).any():
            raise ValueError(f"{int((on & ~reach).sum())} targets with mass reach no candidate")
        with np.errstate(divide="ignore"):
            log_a, log_b = np.log(a), np.log(b)
        self.a, self.b = a, b
        absorptions = it = 0
        if self.K is None:
            self._log_step(log_a, log_b)
            absorptions += 1
        u, v = np.ones(self.n), np.ones(len(b))
        violation, converged = np.inf, False
        while it < self.max_iter:
            it += 1
            t = self._to_targets(a * u)
            ok = np.isfinite(t[on]).all() and (t[on] > 0).all()
            if ok:
                violation = float(np.abs(b * v * t - b)[on].sum())
                v = np.where(on, 1.0 / np.where(on, t, 1.0), 1.0)
                if violation < self.tol:
                    converged = True
                    break
                s = self._to_candidates(b * v)
                ok = np.isfinite(s[live]).all() and (s[live] > 0).all()
            if not ok:  # the kernel left floating-point range: redo the step in the log domain
                self._absorb(u, v)
                self._log_step(log_a, log_b)
                absorptions += 1
                u, v = np.ones(self.n), np.ones(len(b))
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                log_u = np.where(live, -fi * np.log(s) - (1 - fi) * self.f / eps, 0.0)
            u = np.exp(log_u)
            if max(np.abs(log_u).max(), np.abs(np.log(v)).max()) > self.absorb_at:
                self._absorb(u, v)
                absorptions += 1
                u, v = np.ones(self.n), np.ones(len(b))
        self._absorb(u, v)
        if not converged:
            log.warning("semi-relaxed OT stopped after %d iterations with target-marginal "
                        "violation %.2e (tol %.0e)", it, violation, self.tol)
        marginal_err = float(np.abs(b * self._to_targets(a) - b).sum())
        if self.idx is None:
            plan_cost = sum(float(b @ ((self.K[:, c] * self.C[:, c]) @ a[c]))
                            for c in self._cols())
        else:
            plan_cost = float((self._plan_entries() * self.C).sum())
        return OTResult(iterations=it, converged=converged, violation=violation,
                        marginal_err=marginal_err, cost=plan_cost, absorptions=absorptions)

    def _absorb(self, u: np.ndarray, v: np.ndarray) -> None:
        """Fold the scalings into the potentials and rebuild the kernel exactly from C."""
        if np.all(u == 1.0) and np.all(v == 1.0):
            return
        with np.errstate(divide="ignore"):
            self.f = self.f + self.eps * np.log(u)
            self.g = self.g + self.eps * np.log(v)
        self.f = np.where(np.isfinite(self.f), self.f, 0.0)
        self._rebuild()

    # ---- outputs of the last solve --------------------------------------------------------------
    def _plan_entries(self) -> np.ndarray:
        """π at the stored entries, (M, K) (dense: the full (M, N) plan)."""
        ai = self.a if self.idx is None else self.a[self.idx]
        return self.K * ai * self.b[:, None]

    def plan(self) -> np.ndarray:
        """The dense (N, M) plan π (small problems only)."""
        out = np.zeros((self.n, len(self.b)))
        P = self._plan_entries()
        if self.idx is None:
            return P.T.astype(np.float64)
        np.add.at(out, (self.idx, np.arange(len(self.b))[:, None]), P)
        return out

    def mass(self) -> np.ndarray:
        """Received mass ``r_i = Σ_j π_ij`` of every candidate, (N,)."""
        return self.a * self._to_candidates(self.b)

    def carried(self, picked: np.ndarray) -> np.ndarray:
        """``Σ_{i ∈ picked} π_ij`` for each target j, (M,)."""
        x = np.zeros(self.n)
        x[picked] = self.a[picked]
        return self.b * self._to_targets(x)

    def potentials(self) -> tuple[np.ndarray, np.ndarray]:
        """Dual potentials ``(f, g)``: POT's ``eps·logu``, ``eps·logv``. Candidates that take no
        mass (``a_i = 0`` or outside every target's list) get ``f_i = +inf``."""
        f = self.f.copy()
        f[(self.a <= 0) | ~self.has] = np.inf
        return f, self.g.copy()


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
