"""TSDS over a :class:`~evoray.select.sharded.ShardedPool`: the local algorithm
(:func:`evoray.select.tsds.tsds`, same parameters and defaults) with every neighbour search in
the shards.

Both of TSDS's searches (each target's ``max_K`` nearest candidates, then each listed candidate's
``kde_K`` nearest among the listed ones) run in every shard and are merged on the driver. With
faiss IVF (above ``exact_max`` candidates) the index is trained once, on the local backend's
sample, and every shard adds its own rows to a copy: a query probes the same lists in every
shard, so the merged neighbours are the local index's, and so is the fallback for a query whose
probed lists hold too few rows (probed again, ``nprobe`` doubled, when the merged result is
short). The driver then holds the targets' lists (M × K), the listed candidates' positions and
densities, and, one block of 2,048 at a time, the KDE queries' rows; the probabilities are
computed over the listed candidates only (every other candidate's is 0), and the seeded draw
over them is the draw the local backend makes over all N (numpy's multinomial and choice spend
no random number on a zero probability), so the picks are the local ones up to ties between
equidistant candidates.
"""

from __future__ import annotations

import time

import numpy as np

from evoray.select.geometry import blocks, unit
from evoray.select.selection import Selection
from evoray.select.tsds import (
    ivf_lists,
    kde_density,
    tsds_draw,
    tsds_neighbours,
    tsds_probabilities,
)

__all__ = ["tsds_sharded"]

KDE_BLOCK = 2048  # KDE queries a round trip: 8 MiB of rows at d = 1024, 16 MiB of distances


def _merge(refs: list, k: int, ids: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Each query's k smallest distances over the shards' ``(D, positions)`` results, merged
    as they arrive (two shards' lists at a time); with ``ids``, the k kept ascending, ties by
    position, else in no order (the KDE sums them). Which of several equidistant rows at the
    k-th place is kept is ``argpartition``'s choice (deterministic). A partition, then a sort
    of the k kept: sorting both lists whole took 54 of the 94 s of a 100k × 256 TSDS over 4
    shards on 2 cores (now 41 s; 29 s with 2 shards, the local backend's 28 s)."""
    import ray

    best = None
    for ref in refs:
        D, Idx = ray.get(ref)
        if best is not None:
            D = np.hstack([best[0], D])
            Idx = np.hstack([best[1], Idx]) if ids else None
        if D.shape[1] > k:
            keep = np.argpartition(D, k - 1, axis=1)[:, :k]
            D = np.take_along_axis(D, keep, 1)
            Idx = np.take_along_axis(Idx, keep, 1) if ids else None
        best = D, Idx
    if ids:
        order = np.lexsort((best[1], best[0]))
        best = np.take_along_axis(best[0], order, 1), np.take_along_axis(best[1], order, 1)
    return best


def _searcher(pool, exact: bool, seed: int, subset: np.ndarray | None = None):
    """:func:`evoray.select.tsds._searcher` over the shards: ``search(Q, k) -> (squared
    distances, positions)`` over the pool (or the positions ``subset``)."""
    import ray

    nlist = trained = None
    if not exact:
        nlist = ivf_lists(len(pool) if subset is None else len(subset))
        trained = pool.train_ivf(nlist, "Flat", seed, metric="l2", train_rows=256,
                                 subset=subset, space=False)
    pool.call("tsds_index", ray.put(trained), None if subset is None else ray.put(subset))

    def search(Q: np.ndarray, k: int, ids: bool = True) -> tuple:
        Q = np.ascontiguousarray(Q, np.float32)
        ref = ray.put(Q)
        D, Idx = _merge([h.tsds_search.remote(ref, k, 10, ids) for h in pool.handles], k, ids)
        short, nprobe = np.flatnonzero(np.isinf(D).any(axis=1)), 10  # fewer than k found
        while len(short) and nlist is not None and nprobe < nlist:
            nprobe = min(2 * nprobe, nlist)
            ref = ray.put(np.ascontiguousarray(Q[short]))
            d, i = _merge([h.tsds_search.remote(ref, k, nprobe, ids) for h in pool.handles],
                          k, ids)
            D[short] = d
            if ids:
                Idx[short] = i
            short = short[np.isinf(D[short]).any(axis=1)]
        return D, Idx

    return search


def tsds_sharded(pool, V: np.ndarray, k: int, *, seed: int = 0, alpha: float = 0.5,
                 C: float = 5.0, sigma: float = 0.75, max_K: int = 5000, kde_K: int = 1000,
                 replace: bool = True, exact_max: int = 20_000) -> tuple[Selection, list]:
    """TSDS on the shards of ``pool`` for the targets ``V`` (M, d); k draws. Returns the
    :class:`Selection` (``indices`` are pool positions; ``scores``, ``probability`` and
    ``kde``, stay in the shards for ``scores.parquet``) and each pick's ``(shard, local
    row)``."""
    import ray

    t0 = time.perf_counter()
    n = len(pool)
    K, kde_k = tsds_neighbours(n, max_K, kde_K)
    pool.call("geometry", "none", None)
    exact = n <= exact_max
    D2, idx = _searcher(pool, exact, seed)(unit(V), K)
    if np.isinf(D2).any():
        raise ValueError("the IVF index returned fewer neighbours than max_K, every list probed")
    dists = np.sqrt(np.maximum(D2, 0)).astype(np.float64)
    top, inv = np.unique(idx, return_inverse=True)  # the listed candidates, by position
    inv = inv.reshape(idx.shape)
    kde_top = np.full(len(top), np.nan)
    if sigma > 0:
        kk = min(kde_k, len(top))
        search = _searcher(pool, exact, seed, subset=top)
        for s, e in blocks(len(top), KDE_BLOCK):
            kde_top[s:e] = kde_density(search(pool.take(top[s:e]), kk, ids=False)[0], sigma)
    kde = np.ones_like(dists) if sigma == 0 else kde_top[inv]
    p = tsds_probabilities(dists, inv, kde, len(top), alpha=alpha, C=C)
    picks, count = tsds_draw(p, k, seed, replace)
    columns = ray.put({"probability": p, "kde": kde_top})
    pool.call("keep_scores", ray.put(top), columns, {"probability": 0.0, "kde": np.nan},
              top[picks])
    return Selection(indices=top[picks],
                     explain={"count": count, "alignment": p[picks],
                              "novelty": 1.0 / kde_top[picks]},
                     method="tsds",
                     diagnostics={"max_K": K, "kde_K": kde_k, "exact_knn": exact,
                                  "support": int((p > 0).sum()), "shards": len(pool.handles),
                                  "timing": {"total": time.perf_counter() - t0}}), \
        pool.locate(top[picks])
