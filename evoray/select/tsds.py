"""TSDS (Liu et al. 2024): kNN-sparsified OT with KDE down-weighting of near-duplicates.

Code-faithful to the authors' ``tsds.py`` (ZifanL/TSDS): Euclidean distances between
row-normalised features; each target j looks at its ``K = min(max_K, N // 10)`` nearest
candidates; a candidate's density ``rho = Σ_{kde_K nbrs} max(0, 1 − d²/σ²)`` is counted among
the candidates that appear in some target's list (self included, so ``rho ≥ 1``). Each target
spreads its mass 1/M over its nearest candidates with weights ∝ 1/rho up to a common level s,
raised until ``(alpha/C)·Σ_j cost_j ≥ (1 − alpha)·M``. The authors raise s with a heap, one
event (target j, neighbour k) at a time; the events come out in the order of the cumulative
weights ``c_jk = Σ_{l≤k} 1/rho_jl`` (increasing in k), so :func:`tsds_probabilities` sorts them
once and finds the stopping event with a cumulative sum. Exact kNN for small pools, faiss IVF
(the authors' ``nlist = sqrt(n) // 2``, ``nprobe = 10``) for large ones.
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from evoray.select.geometry import UnitRows, blocks, ivf_index, knn
from evoray.select.selection import Selection

__all__ = ["ivf_lists", "kde_density", "tsds", "tsds_draw", "tsds_neighbours",
           "tsds_probabilities"]


def tsds_probabilities(dists: np.ndarray, idx: np.ndarray, kde: np.ndarray, n: int, *,
                       alpha: float = 0.5, C: float = 5.0) -> np.ndarray:
    """The authors' closed-form candidate probabilities.

    Args:
        dists: (M, K) Euclidean distances of each target's K nearest candidates, ascending.
        idx: (M, K) their candidate rows.
        kde: (M, K) their densities rho (>= 1).
        n: number of candidates N.
        alpha, C: trade-off and scale constants of TSDS.

    Returns:
        (N,) probabilities ``p`` (sum 1).
    """
    m, K = dists.shape
    if K < 2:
        raise ValueError("TSDS needs at least 2 neighbours per target")
    w = 1.0 / kde
    c = np.cumsum(w, axis=1)[:, :K - 1]  # level at which event (j, k) pops
    dws = np.cumsum(dists * w, axis=1)[:, :K - 1]
    cost = dists[:, 1:] * c - dws  # cost_j once event (j, k) has popped
    delta = cost - np.hstack([np.zeros((m, 1)), cost[:, :-1]])
    ks, js = np.meshgrid(np.arange(K - 1), np.arange(m))
    order = np.lexsort((js.ravel(), ks.ravel(), c.ravel()))  # heap order (count, k, j)
    total = np.cumsum(delta.ravel()[order])
    hit = np.flatnonzero(alpha / C * total >= (1 - alpha) * m)
    if len(hit):
        stop = int(hit[0])
        s = c.ravel()[order[stop]]
        popped = np.bincount(js.ravel()[order[:stop]], minlength=m)
        last = np.maximum(popped - 1, 0)
    else:
        s = c.ravel()[order[-1]]
        last = np.full(m, K - 2)
    inside = np.arange(K)[None, :] <= last[:, None]
    mass = np.where(inside, w / (m * s), 0.0)
    rest = np.maximum(1.0 / m - mass.sum(axis=1), 0.0)
    p = np.bincount(idx.ravel(), mass.ravel(), minlength=n)
    p += np.bincount(idx[np.arange(m), last + 1], rest, minlength=n)
    return p / p.sum()


def tsds_neighbours(n: int, max_K: int, kde_K: int) -> tuple[int, int]:
    """``(K, kde_K)``: neighbours per target and per KDE query, both capped at ``n // 10``."""
    K = min(max_K, n // 10)
    if K < 2:
        raise ValueError(f"TSDS needs at least 20 candidates (max_K = min({max_K}, N // 10) "
                         f"must be >= 2), got N = {n}")
    return K, min(kde_K, n // 10)


def ivf_lists(n: int) -> int:
    """The authors' IVF list count for n rows, ``sqrt(n) // 2`` (at least 1)."""
    return max(1, int(np.sqrt(n)) // 2)


def kde_density(D2: np.ndarray, sigma: float) -> np.ndarray:
    """Each query's density ``rho = Σ max(0, 1 − d²/σ²)`` from its neighbours' squared
    distances ``D2`` (q, kde_K)."""
    kern = 1.0 - D2.astype(np.float64) / sigma ** 2
    return (kern * (kern > 0)).sum(axis=1)


def tsds_draw(p: np.ndarray, k: int, seed: int, replace: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(picks, count)``: k seeded draws with probabilities ``p``; with ``replace``,
    ``multinomial(k, p)``'s distinct candidates, most drawn first (then by p, then index),
    else k distinct ones."""
    rng = np.random.default_rng(seed)
    if replace:
        counts = rng.multinomial(k, p)
        drawn = np.flatnonzero(counts)
        order = np.lexsort((drawn, -p[drawn], -counts[drawn]))
        return drawn[order], counts[drawn[order]]
    support = int((p > 0).sum())
    if support < k:
        raise ValueError(f"only {support} candidates have a nonzero TSDS probability; "
                         f"k={k} distinct draws need replace=True or a smaller k")
    return rng.choice(len(p), size=k, replace=False, p=p), np.ones(k, np.int64)


def _searcher(U: UnitRows, exact: bool, seed: int, subset: np.ndarray | None = None):
    """``search(Q, k) -> (squared distances, rows)``, ascending, over (a subset of) ``U``:
    exact brute force, or one faiss IVF index built here (the authors' settings: they train
    on every row, which faiss samples down to 256 a list)."""
    if exact:
        return lambda Q, k: knn(Q, U, k, metric="l2", subset=subset)
    n = len(U) if subset is None else len(subset)
    index = ivf_index(U, nlist=ivf_lists(n), nprobe=10, codec="Flat",
                      metric="l2", seed=seed, subset=subset, train_rows=256)  # faiss's cap

    ivf = faiss.extract_index_ivf(index)

    def search(Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D = np.empty((len(Q), k), np.float32)
        Idx = np.empty((len(Q), k), np.int64)
        for s, e in blocks(len(Q), 1024):
            D[s:e], Idx[s:e] = index.search(np.ascontiguousarray(Q[s:e]), k)
        # a query whose probed lists hold fewer than k rows: again with nprobe doubled until
        # they do (at 100k × 1024 mixture features, 158 lists with 10 probed fell short)
        short, nprobe = np.flatnonzero((Idx < 0).any(axis=1)), ivf.nprobe
        while len(short) and nprobe < ivf.nlist:
            nprobe = min(2 * nprobe, ivf.nlist)
            D[short], Idx[short] = index.search(np.ascontiguousarray(Q[short]), k,
                                                params=faiss.SearchParametersIVF(nprobe=nprobe))
            short = short[(Idx[short] < 0).any(axis=1)]
        if subset is not None:
            Idx = np.where(Idx >= 0, subset[np.maximum(Idx, 0)], -1)
        return D, Idx

    return search


def tsds(G: np.ndarray, V: np.ndarray, k: int, *, seed: int = 0, alpha: float = 0.5,
         C: float = 5.0, sigma: float = 0.75, max_K: int = 5000, kde_K: int = 1000,
         replace: bool = True, exact_max: int = 20_000) -> Selection:
    """TSDS selection: probabilities from the authors' closed form, then sampling.

    Args:
        G: (N, d) candidates (N >= 20); V: (M, d) targets; k: draws.
        seed: seeds ``numpy.random.default_rng`` for the draw (and IVF training).
        alpha: alignment/diversity trade-off (0.5); C: scale constant (5.0);
        sigma: KDE kernel width on unit-norm features (0.75; 0 turns KDE off);
        max_K, kde_K: neighbours per target and per KDE query, both capped at N // 10.
        replace: draw ``multinomial(k, p)`` with replacement (the authors' way); False draws k
            distinct candidates with probabilities p.
        exact_max: exact brute-force kNN up to this many candidates, faiss IVF above. 20,000:
            side by side with the authors' algorithm (``benchmarks/tsds_reference.py``, IVF at
            every size) at 20k × 256, evoray's exact path took 1.3× the reference's time and
            its IVF path 0.7× (a busy 2-core machine). The authors use IVF at every size.

    Returns:
        :class:`Selection` of the distinct drawn candidates, most drawn first (then by p);
        ``explain["count"]`` holds the draws of each, ``alignment`` its p and ``novelty`` its
        KDE weight 1/rho. ``scores``: ``probability`` and ``kde`` (N,).
    """
    t0 = time.perf_counter()
    n = len(G)
    K, kde_k = tsds_neighbours(n, max_K, kde_K)
    U = UnitRows(G)
    Vh = U.targets(V)
    exact = n <= exact_max
    D2, idx = _searcher(U, exact, seed)(Vh, K)
    if (idx < 0).any():
        raise ValueError("the IVF index returned fewer neighbours than max_K, every list probed")
    dists = np.sqrt(np.maximum(D2, 0)).astype(np.float64)
    kde_rows = np.full(n, np.nan)
    if sigma == 0:
        kde = np.ones_like(dists)
    else:
        top = np.unique(idx)
        kde_top = np.empty(len(top))
        kk = min(kde_k, len(top))
        search = _searcher(U, exact, seed, subset=top)
        for s, e in blocks(len(top), 4096):
            kde_top[s:e] = kde_density(search(U.take(top[s:e]), kk)[0], sigma)
        kde_rows[top] = kde_top
        kde = kde_rows[idx]
    p = tsds_probabilities(dists, idx, kde, n, alpha=alpha, C=C)
    picks, count = tsds_draw(p, k, seed, replace)
    return Selection(indices=picks, scores={"probability": p, "kde": kde_rows},
                     explain={"count": count, "alignment": p[picks],
                              "novelty": 1.0 / kde_rows[picks]},
                     method="tsds",
                     diagnostics={"max_K": K, "kde_K": kde_k, "exact_knn": exact,
                                  "support": int((p > 0).sum()),
                                  "timing": {"total": time.perf_counter() - t0}})
