"""Timed reference for TSDS: the authors' algorithm, written here independently of evoray.

    from tsds_reference import reference_probabilities
    p = reference_probabilities(G, V)                # faiss IVF, the authors' settings
    p = reference_probabilities(G, V, exact=True)    # exact neighbours (to check evoray's p)

TSDS (Liu et al. 2024) turns M targets into a sampling distribution over N candidates. This
module follows the authors' procedure step by step, as their released script runs it:

1. Features: candidates and targets row-normalised (float32, Euclidean geometry).
2. Index: a faiss ``IndexIVFFlat`` (L2) over all normalised candidates, with their choices
   ``nlist = int(sqrt(N)) // 2`` lists (trained on every candidate; faiss subsamples) and
   ``nprobe = 10``.
3. Prefetch: each target's ``K = min(max_K, N // 10)`` nearest candidates, sorted by distance
   ``d = sqrt(squared L2)``.
4. KDE: over the union of the prefetched rows only, a second ``IndexIVFFlat`` built by the same
   rules; each row of the union searches its ``min(kde_K, N // 10)`` nearest rows of the union
   (itself included) and its density is ``rho = Σ max(0, 1 − d²/σ²)`` (``sigma = 0``: rho = 1).
5. Assignment, with a heap of events ``(level, k, j)`` in Python (``heapq``): event (j, k) has
   level ``c_jk = Σ_{l≤k} 1/rho_jl``; popping it sets the level s to c_jk and target j's cost
   to ``d_{j,k+1}·c_jk − Σ_{l≤k} d_jl/rho_jl`` (the running total follows); the first event at
   which ``(alpha/C)·total ≥ (1 − alpha)·M`` stops the loop with that s and does not count;
   otherwise k becomes target j's last counted neighbour and (j, k + 1) is pushed while
   ``k < K − 2``. Events are popped one at a time, exactly as the authors' loop does.
6. Probabilities: target j gives ``1/(M·s·rho_jk)`` to its neighbours k ≤ last_j and what is
   left of its 1/M, ``max(0, 1/M − Σ)``, to neighbour last_j + 1 (the result is not rescaled).

Choices that change nothing beyond rounding: the KDE search runs in blocks of queries (the
authors search the whole union at once: same neighbours, less memory); a row's density is
looked up through an array, not a dictionary; the arithmetic after the searches is float64
(the authors' kernel sums are float32 by NumPy's dtype rules). A query whose probed lists
hold fewer than K rows is searched again with ``nprobe`` doubled (the authors' script would
index row -1), as evoray does. ``exact=True``
replaces every IVF index by an exact ``IndexFlatL2``.
"""

from __future__ import annotations

import heapq

import faiss
import numpy as np

KDE_BLOCK = 4096  # KDE queries per faiss search: evoray's block, so exact runs round alike


def _normalised(X: np.ndarray) -> np.ndarray:
    """Row-normalised float32 copy of ``X``, built in blocks (rows of norm zero stay zero)."""
    out = np.empty(X.shape, np.float32)
    for s in range(0, len(X), 65536):
        x = X[s:s + 65536].astype(np.float32)
        x *= 1.0 / np.maximum(np.linalg.norm(x, axis=1), np.finfo(np.float32).tiny)[:, None]
        out[s:s + 65536] = x
    return out


def _index(X: np.ndarray, exact: bool, seed: int) -> faiss.Index:
    """The authors' IVF-Flat index over ``X`` (their nlist and nprobe), or an exact one."""
    d = X.shape[1]
    if exact:
        index = faiss.IndexFlatL2(d)
    else:
        nlist = max(1, int(np.sqrt(len(X))) // 2)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.cp.seed = seed
        index.train(X)
        index.nprobe = 10
    index.add(X)
    return index


def _search(index: faiss.Index, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``; a query whose probed lists hold fewer than ``k`` rows is searched
    again with ``nprobe`` doubled until they do (the authors' script would index row −1: at
    100k × 1024 Gaussian-mixture features their 158 lists, 10 probed, fall short)."""
    D2, idx = index.search(Q, k)
    short = np.flatnonzero((idx < 0).any(axis=1))
    nprobe = getattr(index, "nprobe", 0)
    while len(short) and nprobe and nprobe < index.nlist:
        nprobe = min(2 * nprobe, index.nlist)
        D2[short], idx[short] = index.search(
            Q[short], k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        short = short[(idx[short] < 0).any(axis=1)]
    if len(short):
        raise ValueError(f"fewer than {k} candidates to search for some query")
    return D2, idx


def reference_probabilities(G: np.ndarray, V: np.ndarray, *, alpha: float = 0.5,
                            C: float = 5.0, sigma: float = 0.75, max_K: int = 5000,
                            kde_K: int = 1000, exact: bool = False,
                            seed: int = 0) -> np.ndarray:
    """TSDS probabilities by the authors' procedure (module docstring).

    Args:
        G: (N, d) candidate features (float32 or float16), normalised here.
        V: (M, d) target features, normalised here.
        alpha, C: trade-off and scale constants; sigma: KDE kernel width (0: no KDE).
        max_K, kde_K: neighbours per target and per KDE query, both capped at N // 10.
        exact: exact ``IndexFlatL2`` searches instead of IVF.
        seed: faiss k-means seed of the IVF indexes.

    Returns:
        (N,) float64 probabilities (sum 1 up to rounding).
    """
    dist, idx, rho = reference_inputs(G, V, sigma=sigma, max_K=max_K, kde_K=kde_K,
                                      exact=exact, seed=seed)
    return heap_probabilities(dist, idx, rho, len(G), alpha=alpha, C=C)


def reference_inputs(G: np.ndarray, V: np.ndarray, *, sigma: float = 0.75, max_K: int = 5000,
                     kde_K: int = 1000, exact: bool = False,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-4: ``(dist, idx, rho)``, each (M, K): every target's K nearest candidates
    (ascending Euclidean distance, float64), their rows and their densities."""
    n = len(G)
    K, kde_k = min(max_K, n // 10), min(kde_K, n // 10)
    if K < 2:
        raise ValueError(f"TSDS needs N >= 20 candidates, got N = {n}")
    X = _normalised(G)
    Q = _normalised(V)

    # Prefetch: K nearest candidates of every target, ascending distance.
    D2, idx = _search(_index(X, exact, seed), Q, K)
    order = np.argsort(D2, axis=1, kind="stable")
    dist = np.sqrt(np.take_along_axis(D2, order, axis=1)).astype(np.float64)
    idx = np.take_along_axis(idx, order, axis=1)

    # KDE over the union of the prefetched candidates.
    if sigma == 0:
        return dist, idx, np.ones_like(dist)
    union = np.unique(idx)
    Xu = X[union]
    index = _index(Xu, exact, seed)
    kk = min(kde_k, len(union))
    dens = np.empty(len(union))
    for s in range(0, len(union), KDE_BLOCK):
        Dk, _ = _search(index, Xu[s:s + KDE_BLOCK], kk)
        kern = 1.0 - Dk.astype(np.float64) / sigma ** 2
        dens[s:s + KDE_BLOCK] = (kern * (kern > 0)).sum(axis=1)
    return dist, idx, dens[np.searchsorted(union, idx)]


def heap_probabilities(dist: np.ndarray, idx: np.ndarray, rho: np.ndarray, n: int, *,
                       alpha: float = 0.5, C: float = 5.0) -> np.ndarray:
    """Steps 5-6: the heap assignment of each target's mass over its neighbours
    (``dist``, ``idx``, ``rho`` as :func:`reference_inputs` returns them) -> (N,) p."""
    m, K = dist.shape
    # Heap assignment, one event at a time.
    d_l, rho_l = dist.tolist(), rho.tolist()
    heap = [(1.0 / rho_l[j][0], 0, j) for j in range(m)]
    heapq.heapify(heap)
    weighted = [d_l[j][0] / rho_l[j][0] for j in range(m)]  # Σ_{l≤k} d_jl / rho_jl
    cost = [0.0] * m
    last = [0] * m
    total, s = 0.0, 0.0
    bound = (1 - alpha) * m
    while heap:
        level, k, j = heapq.heappop(heap)
        s = level
        total -= cost[j]
        cost[j] = d_l[j][k + 1] * level - weighted[j]
        total += cost[j]
        if alpha / C * total >= bound:
            break
        last[j] = k
        if k < K - 2:
            r = rho_l[j][k + 1]
            heapq.heappush(heap, (level + 1.0 / r, k + 1, j))
            weighted[j] += d_l[j][k + 1] / r

    # Each target's mass 1/M: 1/(M s rho) up to its last neighbour, the rest to the next one.
    p = np.zeros(n)
    for j in range(m):
        share = 1.0 / m / s / rho[j, :last[j] + 1]
        np.add.at(p, idx[j, :last[j] + 1], share)
        p[idx[j, last[j] + 1]] += max(1.0 / m - share.sum(), 0.0)
    return p
