"""Sharded selection on Ray (``select.backend: sharded``): the features stay in actors.

The local backend reads every feature onto the driver (1M × 1024 float16 is 2 GiB; 10M at
d = 8192 fits on no head node). Here each Ray actor holds a shard, whole features files of the
pool (:class:`~evoray.select.shard.FeatureShard`), and the driver holds per-target vectors, the
picks, and O(N) bytes once when the files' rows interleave (the pool positions, to number the
candidates in pool order). The novelty index is trained on a worker, not on the driver:

* **random**: the local draw over pool positions (a permutation of N), picks fetched from their
  shards: the same picks as ``local``.
* **attribution**: each shard's top k, merged exactly (ties by pool position): the same picks.
* **evoselect**: the centre is reduced from the shards' sums and the novelty directions from
  rows they hand over (the same 20,000-row sample as ``local``). Alignment is the semi-relaxed
  OT of :mod:`evoray.select.ot` with the candidate side in the shards: dense costs
  (up to ``sparse_above`` candidates) stay in the shards as :class:`~evoray.select.ot.OTPart`
  columns, and each iteration reduces their per-target partial sums; above, each target's
  ``ot_knn`` nearest candidates over all shards are merged on the driver (O(M·K)) and solved
  there. The greedy step scans the top of the global alignment order, which the driver merges
  from the shards' sorted chunks as far as the scan needs; ranks come from counts (positions in
  that order) and from a global novelty histogram. After each pick every shard returns the
  candidates the pick may lower (kNN: its ``novelty_knn`` nearest in its own IVF index, merged
  to the global nearest; dense: every one it lowers), and the driver's updates go back with the
  next call. Dense novelty gives the local backend's picks; kNN novelty searches one index a
  shard instead of one over the pool, which changes some neighbours (docs/algorithms.md §3.8).

* **tsds**: every neighbour search runs in the shards and is merged on the driver (one IVF index
  trained as the local one is, each shard adding its rows), which then holds the targets' lists
  (M × K) and computes the probabilities over the listed candidates only: the local picks up to
  ties between equidistant candidates (:mod:`evoray.select.sharded_tsds`).

Diversity and attr_div cluster the whole pool (k-means with k up to N/10 centroids) and are not
sharded: the config refuses them with ``backend: sharded``. ``alignment: lava`` is refused too
(its calibration sums every candidate's potential).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow.parquet as pq

from evoray.select.geometry import unit
from evoray.select.selection import Selection

__all__ = ["PER_SHARD", "RemoteParts", "ShardedPool", "plan_shards", "select_sharded",
           "shard_cpus"]

PER_SHARD = 500_000  # candidates a shard by default
SCORE_ROWS = 250_000  # rows of scores.parquet fetched from a shard at a time


def shard_cpus(free: float, shards: int) -> float:
    """CPUs each of ``shards`` actors reserves when ``free`` CPUs are free: at most one, rounded
    down to 0.01 (Ray refuses a fraction finer than 0.0001; a leftover 0.00015 CPU once gave
    5e-05), so 0 when next to nothing is free."""
    return min(1.0, math.floor(free / shards * 100) / 100)


def plan_shards(sizes: list[int], shards: int | None = None) -> list[list[int]]:
    """Group files (their row counts ``sizes``, in order) into ``shards`` contiguous groups of
    about equal rows (default: one per :data:`PER_SHARD` rows); never more groups than files."""
    total = sum(sizes)
    count = max(1, min(len(sizes), shards or -(-total // PER_SHARD)))
    edges = np.searchsorted(np.cumsum(sizes), np.linspace(0, total, count + 1)[1:-1], "right")
    groups = np.split(np.arange(len(sizes)), edges)
    return [g.tolist() for g in groups if len(g)]


class RemoteParts:
    """The shards' OT parts, for :class:`~evoray.select.ot.SemiRelaxedOT`."""

    def __init__(self, handles):
        self.handles = handles

    def call(self, name: str, *args) -> list:
        import ray

        return ray.get([h.ot.remote(name, *args) for h in self.handles])

    def each(self, name: str, args: list) -> list:
        import ray

        return ray.get([h.ot.remote(name, *a) for h, a in zip(self.handles, args, strict=True)])


class ShardedPool:
    """A features folder spread over Ray actors, one shard each (files kept whole).

    Args:
        features: features folder (or one file), local path or URI.
        shards: number of actors (default one per :data:`PER_SHARD` candidates, at most one a
            file).
        dtype: convert features while reading.
        num_cpus: CPUs reserved per actor; default ``min(1, free CPUs / shards)`` rounded down
            to 0.01 (0 when none is free), so that every shard is placed at once: the driver
            waits on all of them.
            Shards are spread over the cluster's nodes.
    """

    def __init__(self, features: str, shards: int | None = None, dtype: str | None = None,
                 num_cpus: float | None = None):
        import ray

        from evoray.data.features import features_files
        from evoray.select.shard import FeatureShard

        fs, files = features_files(features)
        sizes = [pq.read_metadata(f, filesystem=fs).num_rows for f in files]
        groups = plan_shards(sizes, shards)
        if num_cpus is None:  # what is free now, so that every shard is placed at once
            num_cpus = shard_cpus(ray.available_resources().get("CPU", 0.0), len(groups))
        actor = ray.remote(num_cpus=num_cpus, scheduling_strategy="SPREAD")(FeatureShard)
        self.handles = [actor.remote(features, [files[i] for i in g], dtype) for g in groups]
        info = self.call("pool_rows")
        self.counts = [i[2] for i in info]  # candidates of each shard
        self.n, self.dim = sum(self.counts), info[0][4]
        self.dropped = sum(i[3] for i in info)
        by_first = sorted(range(len(info)), key=lambda s: info[s][0])
        ranges = [info[s][:2] for s in by_first if info[s][2]]
        if all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False)):
            offset, offsets = 0, {}
            for s in by_first:  # shards hold disjoint row ranges: O(1) on the driver
                offsets[s], offset = offset, offset + info[s][2]
            self.call_each("place", [(offsets[s],) for s in range(len(info))])
        else:  # interleaved files: number every row once (a permutation of N on the driver)
            rows = self.call("pool_rows", True)
            flat = np.concatenate(rows)
            gpos = np.empty(len(flat), np.int64)
            gpos[np.argsort(flat, kind="stable")] = np.arange(len(flat))
            cuts = np.cumsum([0] + [len(r) for r in rows])
            del flat, rows
            self.call_each("place", [(gpos[s:e],) for s, e in zip(cuts[:-1], cuts[1:],
                                                                   strict=True)])

    def __len__(self) -> int:
        return self.n

    def call(self, name: str, *args) -> list:
        """Run ``FeatureShard.name(*args)`` on every shard; the results in shard order."""
        import ray

        return ray.get([getattr(h, name).remote(*args) for h in self.handles])

    def call_each(self, name: str, args: list) -> list:
        """Run ``FeatureShard.name(*args[s])`` on shard s; the results in shard order."""
        import ray

        return ray.get([getattr(h, name).remote(*a)
                        for h, a in zip(self.handles, args, strict=True)])

    def take(self, gpos: np.ndarray) -> np.ndarray:
        """Normalised rows at global positions ``gpos`` (in that order), gathered from the
        shards (the view :func:`~evoray.select.geometry.principal_directions` reads)."""
        gpos = np.asarray(gpos, np.int64)
        out = np.empty((len(gpos), self.dim), np.float32)
        for found, rows in self.call("take", gpos):
            out[found] = rows
        return out

    def train_ivf(self, nlist: int | None, codec: str, seed: int, *, metric: str = "ip",
                  train_rows: int = 64, subset: np.ndarray | None = None,
                  space: bool = True) -> bytes:
        """An IVF index trained as the local backend trains it (the same
        :func:`~evoray.select.geometry.ivf_sample`, over the pool or the global positions
        ``subset``), on a Ray worker that gathers the sample from the shards: the driver never
        holds it (at 4M candidates, 128k rows of the 2,000 lists; the driver's peak RSS rose
        0.71 → 0.93 GiB from 1M to 4M while it trained there). Rows of the novelty space
        (``space``) or the normalised ones. Returns ``faiss.serialize_index`` bytes for
        :meth:`FeatureShard.add_index` or :meth:`FeatureShard.tsds_index`."""
        import ray

        from evoray.select.geometry import ivf_sample

        n = self.n if subset is None else len(subset)
        nlist, sample = ivf_sample(n, nlist=nlist, train_rows=train_rows, seed=seed)
        sample = sample if subset is None else np.asarray(subset)[sample]
        parts = [(h.take_space if space else h.take).remote(sample) for h in self.handles]
        task = ray.remote(num_cpus=0)(_train_ivf)  # the shards hold the CPUs; the driver waits
        return ray.get(task.remote(len(sample), self.dim, nlist, codec, metric, seed, *parts))

    def picked(self, where: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, features as stored)`` of the picks at ``(shard, local row)``, in order."""
        import ray

        where = np.asarray(where, np.int64).reshape(-1, 2)
        ids = np.empty(len(where), object)
        X = None
        for s, h in enumerate(self.handles):
            mine = np.flatnonzero(where[:, 0] == s)
            if len(mine):
                i, x = ray.get(h.raw.remote(where[mine, 1]))
                X = np.empty((len(where), x.shape[1]), x.dtype) if X is None else X
                ids[mine], X[mine] = i, x
        return ids, X

    def locate(self, gpos: np.ndarray) -> list[tuple[int, int]]:
        """``(shard, local row)`` of each global position."""
        out = {}
        for s, (found, local) in enumerate(self.call("locate", np.asarray(gpos, np.int64))):
            for g, row in zip(np.asarray(gpos)[found], local, strict=True):
                out[int(g)] = (s, int(row))
        return [out[int(g)] for g in gpos]

    def random(self, k: int, seed: int = 0) -> tuple[Selection, list]:
        """``random``: the local draw, ``permutation(N)[:k]`` of the pool positions."""
        t0 = time.perf_counter()
        picks = np.random.default_rng(seed).permutation(self.n)[:k]
        return Selection(indices=picks, method="random", diagnostics={
            "timing": {"total": time.perf_counter() - t0}}), self.locate(picks)

    def attribution(self, V: np.ndarray, k: int, subtasks=None) -> tuple[Selection, list]:
        """``attribution``: each shard's top k of the LESS score, merged (ties by position)."""
        t0 = time.perf_counter()
        Vh = unit(V)
        labels = np.zeros(len(V), np.int64) if subtasks is None else \
            np.unique(np.asarray(subtasks), return_inverse=True)[1]
        means = np.stack([Vh[labels == t].mean(axis=0) for t in range(labels.max() + 1)])
        tops = self.call("attribution_top", means, k)
        scores = np.concatenate([t[0] for t in tops])
        gpos = np.concatenate([t[1] for t in tops])
        where = [(s, int(r)) for s, t in enumerate(tops) for r in t[2]]
        best = np.lexsort((gpos, -scores))[:k]
        return Selection(indices=gpos[best], method="attribution",
                         explain={"alignment": scores[best].astype(np.float64)},
                         diagnostics={"timing": {"total": time.perf_counter() - t0}}), \
            [where[i] for i in best]


def _train_ivf(n: int, dim: int, nlist: int, codec: str, metric: str, seed: int,
               *parts) -> bytes:
    """:meth:`ShardedPool.train_ivf`'s worker: the shards' ``(found, rows)`` of the sample,
    assembled in sample order, train the index."""
    import faiss

    from evoray.select.geometry import ivf_train

    X = np.empty((n, dim), np.float32)
    for found, rows in parts:
        X[found] = rows
    return faiss.serialize_index(ivf_train(X, nlist, codec=codec, metric=metric, seed=seed))


def select_sharded(cfg, features: str, targets: str, out: str, *, pool: str | None = None,
                   dtype: str | None = None, extra: dict | None = None):
    """:func:`evoray.select.io.select_files` with ``cfg.backend == "sharded"``: the same
    folder (``selected.parquet``, ``summary.json``, ``scores.parquet`` written shard by shard,
    ``selected.jsonl`` with ``pool``), from :class:`ShardedPool` actors that are released
    after. ``random`` and ``tsds`` draw over the pool positions (the features' ``row``), not the
    content order the local backend uses with ``pool``. Returns ``(summary, selection, pool)``."""
    import ray

    from evoray.data.features import read_features
    from evoray.data.io import write_records
    from evoray.errors import SelectError
    from evoray.ray_utils import init_ray
    from evoray.select.api import budget
    from evoray.select.io import pool_records, write_selection
    from evoray.select.selection import nearest_in
    from evoray.select.sharded_evoselect import evoselect_sharded
    from evoray.select.sharded_tsds import tsds_sharded
    from evoray.storage import atomic_write

    t0 = time.perf_counter()
    tfeats = read_features(targets, dtype=dtype)
    keep = np.abs(tfeats.X.astype(np.float32)).max(axis=1) > 0
    if not keep.any():
        raise SelectError("every target feature has zero norm; the target set is empty")
    V, target_ids = tfeats.X[keep], tfeats.ids[keep]
    started = init_ray()
    sp = ShardedPool(features, cfg.shards, dtype)
    try:
        read_s = time.perf_counter() - t0
        k = budget(len(sp), k=cfg.k, ratio=cfg.ratio)
        if cfg.method == "random":
            sel, where = sp.random(k, cfg.seed)
        elif cfg.method == "attribution":
            sel, where = sp.attribution(V, k)
        else:
            fn = tsds_sharded if cfg.method == "tsds" else evoselect_sharded
            try:
                sel, where = fn(sp, V, k, seed=cfg.seed, **cfg.method_params())
            except ValueError as e:
                raise SelectError(f"{cfg.method}: {e}") from None
        if "nearest_targets" not in sel.explain:
            sp.call("geometry", "none", None)
            sel.explain["nearest_targets"], sel.explain["nearest_cos"] = nearest_in(
                sp, unit(V), sel.indices)
        sel.explain["nearest_targets"] = np.flatnonzero(keep)[sel.explain["nearest_targets"]]
        ids, _ = sp.picked(where)
        sel.diagnostics.update(method=cfg.method, seed=cfg.seed, k=k, n=len(sp), m=len(V),
                               backend="sharded", shards=len(sp.handles), dropped={
                                   "candidates": sp.dropped, "targets": int((~keep).sum())})
        view = Selection(indices=np.arange(len(sel.indices)), explain=sel.explain,
                         diagnostics=sel.diagnostics, method=cfg.method)
        records = pool_records(pool, view, ids, n_features=len(sp)) if pool else None

        def scores(f) -> None:
            writer = None
            for h, count in zip(sp.handles, sp.counts, strict=True):  # a slice at a time
                for start in range(0, count, SCORE_ROWS):
                    table = ray.get(h.scores.remote(start, start + SCORE_ROWS))
                    writer = writer or pq.ParquetWriter(f, table.schema)
                    writer.write_table(table)
            writer.close()

        atomic_write(f"{out}/scores.parquet", scores)
        if records is not None:
            write_records(records, f"{out}/selected.jsonl", "candidate")
            extra = {**(extra or {}), "records": len(records)}
        summary = write_selection(out, view, ids, target_ids, extra={
            "features": features, "targets": targets, "k": k, "ratio": cfg.ratio,
            "seed": cfg.seed, "read_s": read_s, **(extra or {})})
    finally:
        for h in sp.handles:
            ray.kill(h)
        if started:
            ray.shutdown()
    return summary, sel, sp
