"""EvoSelect over a :class:`~evoray.select.sharded.ShardedPool`: the local algorithm
(:func:`evoray.select.evoselect.evoselect`, same parameters and defaults), with the candidate
side of every step in the shards; see :mod:`evoray.select.sharded` for what stays where."""

from __future__ import annotations

import time

import numpy as np

from evoray.select.evoselect import _block_sizes, smooth_targets
from evoray.select.geometry import centering, principal_directions, unit
from evoray.select.ot import SemiRelaxedOT
from evoray.select.selection import Selection, nearest_in
from evoray.select.sharded import RemoteParts
from evoray.select.sharded_greedy import ShardedGreedy

__all__ = ["evoselect_sharded"]


def _sparse_costs(pool, Vh: np.ndarray, k: int):
    """Each target's k nearest candidates over every shard, merged shard by shard (the driver
    holds two shards' lists at most, whatever the number of shards): costs (M, k), their
    compact index (M, k) into the listed candidates, and each listed one's (shard, local)."""
    import ray

    refs = [h.knn.remote(Vh, k) for h in pool.handles]
    best = None
    for s, ref in enumerate(refs):
        sims, gpos, local = ray.get(ref)
        mine = (sims, gpos, local, np.full(gpos.shape, s))
        best = mine if best is None else tuple(np.hstack(x) for x in zip(best, mine,
                                                                          strict=True))
        top = np.lexsort((best[1], -best[0]))[:, :k]
        best = tuple(np.take_along_axis(x, top, 1) for x in best)
    sims, gpos, local, shard = best
    listed, first, idx = np.unique(gpos, return_index=True, return_inverse=True)
    C = ((1.0 - sims) / 2).astype(np.float32)
    return C, idx.reshape(gpos.shape), shard.ravel()[first], local.ravel()[first]


def evoselect_sharded(pool, V: np.ndarray, k: int, *, seed: int = 0, lam: float = 0.25,
                      blocks: int = 10, eps: float = 0.01, tau: float = 0.01,
                      floor: float = 1e-3, center: bool | str = "unit_mean",
                      alignment: str = "mass", target_knn: int = 20, target_mix: float = 0.75,
                      sparse_above: int = 100_000, ot_knn: int = 1000, novelty: str = "auto",
                      novelty_dense_max: int = 20_000, novelty_knn: int = 64,
                      nlist: int | None = None, nprobe: int = 8, novelty_codec: str = "SQfp16",
                      novelty_pcs: int = 50, bins: int = 65536, min_share: float = 0.01,
                      redundant_cos: float | None = 0.98, tol: float = 1e-6,
                      max_iter: int = 5000) -> tuple[Selection, list]:
    """EvoSelect on the shards of ``pool`` for the targets ``V`` (M, d); k picks.

    kNN novelty: the IVF index is trained once (``nlist``, default ``round(sqrt(N))``, on the
    local backend's sample) and every shard adds its rows to a copy, so that a search probes the
    same lists in every shard and the merged neighbours are the local index's. Returns the
    :class:`Selection` (``indices`` are pool positions; ``scores`` stay in the shards) and each
    pick's ``(shard, local row)``.
    """
    if alignment != "mass":
        raise ValueError("the sharded backend aligns by OT mass only (alignment: lava sums "
                         "every candidate's potential); use backend: local for lava")
    if novelty not in ("auto", "dense", "knn"):
        raise ValueError(f"novelty must be 'auto', 'dense' or 'knn', got {novelty!r}")
    timing = {"setup": 0.0, "cost": 0.0, "ot": 0.0, "diversification": 0.0}
    t0 = time.perf_counter()
    n, m = len(pool), len(V)
    center = centering(center)
    mu = None
    if center != "none":
        total = pool.call("centre_sum", center)
        mu = (np.sum(total, axis=0) / n).astype(np.float32)
    pool.call("geometry", center, mu)
    plain = unit(unit(V) if center == "unit_mean" else V, mu)  # UnitRows.targets
    Vh = smooth_targets(plain, target_knn, target_mix) if target_knn > 0 else plain
    timing["setup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sparse = n > sparse_above
    if sparse:
        C, idx, owner, owner_local = _sparse_costs(pool, Vh, min(ot_knn, n))
        solver = SemiRelaxedOT(C, idx, len(owner), eps=eps, tau=tau, tol=tol,
                               max_iter=max_iter)
        a = np.full(len(owner), 1.0 / n)
    else:
        pool.call("dense_cost", Vh, n, eps, tau,
                  "float64" if m * n <= 10_000_000 else "float32")
        parts = RemoteParts(pool.handles)
        solver = SemiRelaxedOT(None, None, n, m=m, eps=eps, tau=tau, tol=tol,
                               max_iter=max_iter, parts=parts)
    timing["cost"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pcs = min(novelty_pcs, min(n, pool.dim) // 4)
    P = principal_directions(pool, pcs, seed=seed) if pcs > 0 else None
    dense = novelty == "dense" or (novelty == "auto" and n <= novelty_dense_max)
    pool.call("novelty_space", P, dense)
    if not dense:  # one index trained as the local one is, each shard adding its rows
        pool.call("add_index", pool.train_ivf(nlist, novelty_codec, seed), nprobe)
    greedy = ShardedGreedy(pool.handles, n, lam, bins=bins, redundant_cos=redundant_cos,
                           knn=min(novelty_knn, n), dense=dense)
    timing["diversification"] += time.perf_counter() - t0

    b, reach, n_alive = np.full(m, 1.0 / m), np.ones(m, bool), n
    picks, where, ot_log = [], [], []
    sizes = _block_sizes(k, blocks)
    for block, size in enumerate(sizes):
        t0 = time.perf_counter()
        if reach.any():
            res = solver.solve(b, a if sparse else None)
            if sparse:
                mass = solver.mass()
                counts = pool.call_each("set_alignment", [
                    (n_alive, min_share, None, (owner_local[owner == s], mass[owner == s]))
                    for s in range(len(pool.handles))])
            else:
                counts = pool.call("set_alignment", n_alive, min_share, b)
            ot_log.append({"block": block, "iterations": res.iterations,
                           "converged": res.converged, "violation": res.violation,
                           "marginal_err": res.marginal_err, "cost": res.cost,
                           "targets_left": int((b > 0).sum())})
        else:  # every target's candidates are picked: no alignment left, novelty decides
            counts = pool.call("set_alignment", n_alive, min_share)
        timing["ot"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        out, at = greedy.block(size, *np.sum(counts, axis=0).tolist())
        out["block"] = np.full(size, block)
        picks.append(out)
        where += at
        n_alive -= size
        timing["diversification"] += time.perf_counter() - t0
        if block == len(sizes) - 1:
            break
        t0 = time.perf_counter()
        at = np.asarray(at, np.int64)
        if sparse:
            spot = {(int(s), int(r)): i for i, (s, r) in enumerate(zip(owner, owner_local,
                                                                        strict=True))}
            listed = np.array([spot[x] for x in map(tuple, at.tolist()) if x in spot], np.int64)
            b = np.maximum(b - solver.carried(listed), floor / m)
            a[listed] = 0.0
            a[a > 0] = 1.0 / n_alive
            reach = (a[idx] > 0).any(axis=1)
        else:
            mine = [at[at[:, 0] == s, 1] for s in range(len(pool.handles))]
            carried = parts.each("carried", [(x,) for x in mine])
            b = np.maximum(b - b * np.sum(carried, axis=0), floor / m)
            parts.each("drop", [(x, 1.0 / n_alive) for x in mine])
        b = np.where(reach, b, 0.0)
        b /= max(b.sum(), np.finfo(float).tiny)
        timing["ot"] += time.perf_counter() - t0

    pool.call_each("update_novelty", [(p,) for p in greedy.pending])  # the last pick's
    explain = {key: np.concatenate([p[key] for p in picks]) for key in picks[0]}
    indices = explain.pop("index")
    near, cos = nearest_in(pool, plain, indices)
    explain["nearest_targets"], explain["nearest_cos"] = near, cos
    timing["total"] = sum(timing.values())
    diagnostics = {
        "ot_cost": ot_log[0]["cost"], "iterations": sum(r["iterations"] for r in ot_log),
        "converged": all(r["converged"] for r in ot_log),
        "target_marginal_err": max(r["marginal_err"] for r in ot_log), "ot": ot_log,
        "sparse": sparse, "novelty": "dense" if dense else "knn", "centered": center,
        "alignment": alignment, "novelty_pcs": pcs, "target_knn": min(target_knn, m),
        "shards": len(pool.handles), "timing": timing,
    }
    return Selection(indices=indices, explain=explain, diagnostics=diagnostics,
                     method="evoselect"), where
