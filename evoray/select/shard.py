"""One shard of a sharded selection: the candidates of some features files, held by a Ray actor.

:class:`FeatureShard` is a plain class; :mod:`evoray.select.sharded` runs one per actor
(``ray.remote(FeatureShard)``) and drives them. A shard keeps its candidates' features (as stored,
float16 or float32), their geometry (:class:`~evoray.select.geometry.UnitRows` with the pool's
centre, computed from every shard's sums), its part of a dense OT
(:class:`~evoray.select.ot.OTPart`), its novelty space (a dense matrix or a faiss IVF index over
its own rows) and its side of the greedy state: novelty, alive flags and the order of its alive
candidates by alignment, handed to the driver a chunk at a time. For TSDS it holds the rows the
driver's neighbour searches scan (:meth:`FeatureShard.tsds_index`) and, at the end, the
per-candidate scores the driver computed (:meth:`FeatureShard.keep_scores`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from evoray.select.evoselect import TailBest, novelty_bins
from evoray.select.geometry import ResidualRows, UnitRows, blocks, inverse_norms, knn, sum_rows
from evoray.select.ot import OTPart

__all__ = ["FeatureShard"]


class FeatureShard:
    """The candidates of ``files`` (features Parquet files), rows of zero norm dropped.

    Args:
        features: the features folder (or file), local path or URI.
        files: the shard's files in it (as :func:`evoray.data.features.features_files` names
            them), read into one array.
        dtype: ``"float32"`` or ``"float16"`` to convert while reading (default: as stored).
    """

    def __init__(self, features: str, files: list[str], dtype: str | None = None):
        from evoray.data.features import read_features

        f = read_features(features, dtype=dtype, files=files)
        G, ids, rows = f.X, f.ids, f.rows
        del f
        keep = np.abs(G).max(axis=1) > 0 if len(G) else np.zeros(0, bool)
        self.dropped = int((~keep).sum())
        self.G, self.ids, self.rows = (G, ids, rows) if keep.all() else \
            (G[keep], ids[keep], rows[keep])
        # ids as one Arrow string array: ~15 bytes an id against ~60 for a Python str
        self.ids = pa.array(self.ids.astype(str), pa.string())
        self.part: OTPart | None = None
        self.kept: dict[str, np.ndarray] | None = None  # scores from the driver (TSDS)

    def pool_rows(self, full: bool = False) -> tuple:
        """``(first row, last row, count, dropped, dim)``, or with ``full`` each candidate's
        position in its pool file (its ``row``)."""
        if full:
            return self.rows
        lo, hi = (int(self.rows.min()), int(self.rows.max())) if len(self.rows) else (0, -1)
        return lo, hi, len(self.rows), self.dropped, int(self.G.shape[1])

    def place(self, gpos: np.ndarray | int) -> None:
        """Take each candidate's global position: ``gpos[i]`` for ``pool_rows(True)[i]``, or
        an offset to which the shard's own rank of each row is added (when no other shard's
        rows fall between its first and last row). Local order becomes global order."""
        order = np.argsort(self.rows, kind="stable") if np.isscalar(gpos) else \
            np.argsort(gpos, kind="stable")
        self.gpos = np.arange(gpos, gpos + len(order), dtype=np.int64) if np.isscalar(gpos) \
            else np.asarray(gpos, np.int64)[order]
        if not (order == np.arange(len(order))).all():
            self.G, self.ids, self.rows = self.G[order], self.ids.take(order), self.rows[order]
        n = len(self.G)
        self.alive = np.ones(n, bool)
        self.novelty = np.ones(n, np.float32)
        self.first_align = None
        self.bin, self.tail = None, None  # novelty bins and the −inf tail, for tail_best

    # ---- geometry ------------------------------------------------------------------------------
    def centre_sum(self, center: str) -> np.ndarray:
        """Sum (float64) of the rows the pool's centre averages: raw rows (``mean``) or
        normalised ones (``unit_mean``)."""
        return sum_rows(self.G, inverse_norms(self.G) if center == "unit_mean" else None)

    def geometry(self, center: str, mu: np.ndarray | None) -> None:
        self.U = UnitRows(self.G, center=center, mu=mu)

    def take(self, gpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised rows of the candidates at global positions ``gpos`` held here:
        ``(which of gpos were found, rows)``."""
        found, local = self.locate(gpos)
        return found, self.U.take(local)

    def raw(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, features as stored)`` of local rows."""
        return (self.ids.take(np.asarray(local, np.int64)).to_numpy(zero_copy_only=False),
                np.asarray(self.G[local]))

    # ---- alignment ----------------------------------------------------------------------------
    def attribution_top(self, means: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """The shard's k best LESS scores (``max_t ⟨ĝ_i, mean_t⟩``, no centring), ties by
        global position: ``(scores, gpos, local)``."""
        scores = np.empty(len(self.G), np.float32)
        for s, X in UnitRows(self.G).iter():
            scores[s:s + len(X)] = (X @ means.T).max(axis=1)
        top = np.lexsort((self.gpos, -scores))[:k]
        return scores[top], self.gpos[top], top

    def dense_cost(self, Vh: np.ndarray, n_total: int, eps: float, tau: float,
                   dtype: str) -> None:
        """Hold this shard's columns of the dense cost as an OT part (reference 1/N)."""
        C = np.empty((len(Vh), len(self.G)), np.float32)
        for s, X in self.U.iter():
            C[:, s:s + len(X)] = (1.0 - Vh @ X.T) / 2
        self.part = OTPart(C, None, len(self.G), eps=eps, tau=tau, dtype=dtype)
        self.part.a[:] = 1.0 / n_total

    def knn(self, Vh: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each target's k nearest candidates here: ``(cosines, gpos, local)``, each (M, k')."""
        sims, idx = knn(Vh, self.U, min(k, len(self.G)))
        return sims, self.gpos[idx], idx

    def ot(self, name: str, *args):
        """Call the OT part's method ``name``."""
        return getattr(self.part, name)(*args)

    def set_alignment(self, n_alive: int, min_share: float, b: np.ndarray | None = None,
                      listed: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[int, int]:
        """This block's alignment: the OT mass from the part (``b``: dense) or the driver's
        masses of listed candidates (``listed`` = (local, mass): sparse), −inf below
        ``min_share`` of a uniform share; neither: −inf everywhere (no target left). Returns
        the alive candidates with a finite alignment (handed out by :meth:`chunk`, in order)
        and with −inf (the tail: all tied, :meth:`tail_best` hands out their best)."""
        if b is not None:
            mass = self.part.mass(b)
        else:
            mass = np.zeros(len(self.G))
            if listed is not None:
                mass[listed[0]] = listed[1]
        align = np.where(mass * n_alive < min_share, -np.inf, mass)
        if b is None and listed is None:
            align = np.full(len(self.G), -np.inf)
        if self.first_align is None:
            self.first_align = align
        alive = np.flatnonzero(self.alive & np.isfinite(align))
        self.order = alive[np.lexsort((alive, -align[alive]))]
        self.align, self.cursor, self.tail = align, 0, None
        return len(alive), int(self.alive.sum()) - len(alive)

    def tail_best(self, min_novelty: float, bins: int, pending=None) -> tuple | None:
        """The best alive candidate of alignment −inf by the greedy rule (all tie on
        alignment): not a near-duplicate (novelty ≥ ``min_novelty``) first, then the highest
        novelty bin, then the lowest position. ``(penalised, bin, novelty, gpos, local, row)``,
        ``row`` in the novelty space.

        Found by the local greedy's forward pointer (:class:`~evoray.select.evoselect.TailBest`)
        over this block's tail, instead of a scan of the whole tail a call (at 4M candidates in
        8 shards, the scans made a pick take 14 ms, against 4 ms at 1M in 2)."""
        self.update_novelty(pending)
        if self.bin is None:
            self.bins, self.bin = bins, novelty_bins(self.novelty, bins).astype(np.int32)
        self.min_novelty = min_novelty
        if self.tail is None:
            rows = np.flatnonzero(self.alive & np.isneginf(self.align))
            self.tail = TailBest(rows, self, self.alive[rows])
        t = self.tail.best()
        if t is None:
            return None
        row = int(self.tail.rows[t])
        nov = self.novelty[row]
        return (bool(nov < min_novelty), int(self.bin[row]), float(nov), int(self.gpos[row]),
                row, self.space.take(np.array([row]))[0])

    # ---- TSDS ----------------------------------------------------------------------------------
    def tsds_index(self, trained: bytes | None, subset: np.ndarray | None = None) -> None:
        """Hold the rows TSDS searches here: all of this shard's, or those at the global
        positions ``subset``; added to a copy of the pool's trained IVF index (``trained``,
        ``faiss.serialize_index`` bytes; ids are global positions), or, with None, kept for an
        exact search."""
        import faiss

        self.search_rows = np.arange(len(self.G)) if subset is None else self.locate(subset)[1]
        self.tsds_ivf = None
        if trained is not None:
            self.tsds_ivf = faiss.deserialize_index(trained)
            for s, e in blocks(len(self.search_rows)):
                rows = self.search_rows[s:e]
                self.tsds_ivf.add_with_ids(self.U.take(rows), self.gpos[rows])

    def tsds_search(self, Q: np.ndarray, k: int, nprobe: int,
                    ids: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Each query's k nearest rows of :meth:`tsds_index` by squared Euclidean distance
        (``nprobe`` lists probed when indexed): ``(D, global positions)``, ascending, padded
        with ``(inf, -1)`` where this shard holds fewer; positions None without ``ids``."""
        import faiss

        D = np.full((len(Q), k), np.inf, np.float32)
        Idx = np.full((len(Q), k), -1, np.int64)
        if self.tsds_ivf is not None:
            d, Idx = self.tsds_ivf.search(Q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
            D = np.where(Idx >= 0, d, np.inf).astype(np.float32)
        elif len(self.search_rows):
            kk = min(k, len(self.search_rows))
            D[:, :kk], i = knn(Q, self.U, kk, metric="l2", subset=self.search_rows)
            Idx[:, :kk] = self.gpos[i]
        return D, (Idx if ids else None)

    def keep_scores(self, gpos: np.ndarray, columns: dict, fill: dict,
                    picked: np.ndarray) -> None:
        """Keep the driver's per-candidate scores for :meth:`scores`: ``columns[name][j]`` for
        the candidate at global position ``gpos[j]``, ``fill[name]`` for the others; mark the
        candidates at ``picked`` selected. Frees the TSDS index."""
        found, local = self.locate(gpos)
        self.kept = {}
        for name, col in columns.items():
            self.kept[name] = np.full(len(self.G), fill[name], np.float64)
            self.kept[name][local] = np.asarray(col)[found]
        self.alive[self.locate(picked)[1]] = False
        self.tsds_ivf = self.search_rows = None

    # ---- greedy diversification ---------------------------------------------------------------
    def novelty_space(self, P: np.ndarray | None, dense: bool) -> None:
        """The rows novelty is measured on: residuals of the directions ``P`` (None: the
        normalised rows), held dense (``dense``) or searched in an index (:meth:`add_index`)."""
        self.space = ResidualRows(self.U, P) if P is not None else self.U
        self.X = self.space.dense() if dense else None

    def take_space(self, gpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`take` in the novelty space."""
        found, local = self.locate(gpos)
        return found, self.space.take(local)

    def add_index(self, trained: np.ndarray, nprobe: int) -> None:
        """Add this shard's rows (ids: local rows) to a copy of the pool's trained IVF index
        (``faiss.serialize_index`` bytes)."""
        import faiss

        self.index = faiss.deserialize_index(trained)
        for s, e in blocks(len(self.G)):
            self.index.add_with_ids(self.space.rows(s, e), np.arange(s, e, dtype=np.int64))
        faiss.extract_index_ivf(self.index).nprobe = nprobe

    def update_novelty(self, pending) -> None:
        """The driver's novelty updates ``(local, new)`` from the last pick (None: none)."""
        if pending is not None and len(pending[0]):
            self.novelty[pending[0]] = pending[1]
            if self.bin is not None:
                self.bin[pending[0]] = novelty_bins(pending[1], self.bins)

    def chunk(self, size: int, pending=None) -> tuple[np.ndarray, ...]:
        """The next ``size`` alive candidates in alignment order: ``(align, gpos, local,
        novelty, rows)``, ``rows`` in the novelty space (sent with the chunk, so that a pick
        costs the driver one round trip to the shards, not two); fewer at the end."""
        self.update_novelty(pending)
        sl = self.order[self.cursor:self.cursor + size]
        self.cursor += len(sl)
        return self.align[sl], self.gpos[sl], sl, self.novelty[sl], self.space.take(sl)

    def neighbours(self, x: np.ndarray, picked: int, k: int, pending=None) -> tuple:
        """Mark local row ``picked`` selected (−1: none here), then the candidates whose novelty
        the pick ``x`` may lower: the k nearest here (IVF), or every alive row that it lowers
        (dense). Returns ``(cos, gpos, local, novelty, alive)``."""
        self.update_novelty(pending)
        if picked >= 0:
            self.alive[picked] = False
            if self.tail is not None:
                t = np.searchsorted(self.tail.rows, picked)
                if t < len(self.tail.rows) and self.tail.rows[t] == picked:
                    self.tail.alive[t] = False
        if self.X is not None:
            cos = self.X @ x
            rows = np.flatnonzero(self.alive & ((1.0 - cos).astype(np.float32) < self.novelty))
            cos = cos[rows]
        else:
            D, idx = self.index.search(x[None, :].astype(np.float32), min(k, len(self.G)))
            found = idx[0] >= 0
            rows, cos = idx[0][found], D[0][found]
        return cos, self.gpos[rows], rows, self.novelty[rows], self.alive[rows]

    def scores(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """One row per candidate ``start:stop``: ``id``, ``selected``, ``alignment`` (first
        block), ``novelty`` (after the last pick), for ``scores.parquet``; or, when the driver
        sent scores (:meth:`keep_scores`), those instead of alignment and novelty."""
        sl = slice(start, stop)
        if self.kept is not None:
            return pa.table({"id": self.ids[sl], "selected": pa.array(~self.alive[sl]),
                             **{name: pa.array(col[sl]) for name, col in self.kept.items()}})
        align = self.first_align[sl] if self.first_align is not None else \
            np.full(len(self.G[sl]), np.nan)
        return pa.table({"id": self.ids[sl],
                         "selected": pa.array(~self.alive[sl]),
                         "alignment": pa.array(align.astype(np.float64)),
                         "novelty": pa.array(self.novelty[sl].astype(np.float64))})

    def locate(self, gpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(which of gpos are held here, their local rows)``."""
        if not len(self.gpos):
            return np.zeros(len(gpos), bool), np.empty(0, np.int64)
        local = np.minimum(np.searchsorted(self.gpos, gpos), len(self.gpos) - 1)
        found = self.gpos[local] == gpos
        return found, local[found]
