"""EvoSelect: OT alignment to the targets, interleaved with greedy diversification.

docs/algorithms.md §3 describes this default instantiation (the paper, arXiv 2604.26170, does
not publish its formulas):

0. row-normalise ``G`` and ``V``, centre both by the mean of the normalised candidate rows, and
   normalise again (``center="unit_mean"``);
1. cost ``C_ij = (1 − ⟨ĝ_i, w_j⟩) / 2`` with ``w_j = 0.75 · s_j + 0.25 · v̂_j``, ``s_j`` the mean
   direction of target j's 20 nearest targets (``target_knn``, ``target_mix``);
2. alignment ``a_i`` = mass candidate i receives in the semi-relaxed entropic OT that enforces the
   uniform target marginal (:mod:`evoray.select.ot`), or LAVA's calibrated dual gradient;
3. in ``blocks`` blocks, greedily pick ``argmax (1 − lam)·rank(a_i) + lam·rank(novelty_i)`` with
   ``novelty_i = 1 − max_{s ∈ S} cos(g_i, g_s)`` (cosines of the residuals once the pool's top
   ``novelty_pcs`` principal directions are projected out), ranks among the remaining in [0, 1],
   novelty updated after every pick; after each block, lower each target's mass by what the
   block's picks carried (floored, renormalised) and re-solve the OT, warm-started, without the
   picked candidates.

Why steps 0-1 are what they are (chosen on the quality benchmark's trained-proxy layer, where
the proxy is a model that learned the task; the ablation, one run with every setting changed in
turn, is in the README's "Selection" section with its figures): a trained proxy's gradients are
several times larger on wrong labels and off-task candidates than on right labels, so centring by
the raw mean (``center="mean"``, the previous default) let those few rows make the centre and
most picks went off-task; ``unit_mean`` removes most of that, and the target smoothing, which
aligns to what the targets share rather than to each target's own letter and wording, removes
the rest and brings wrong labels down to attribution's level while keeping duplicates out. With
a label-blind round-1 proxy no setting sees wrong labels, and the default keeps off-task and
duplicate candidates out there as before.

Scale: the cost is dense (M × N, in blocks) up to ``sparse_above`` candidates and kNN-sparse above
(each target's ``ot_knn`` nearest candidates, exact brute force through faiss); novelty is a
dense scan up to ``novelty_dense_max`` candidates and above that updates only the ``novelty_knn``
nearest neighbours of each pick, found in a faiss IVF index. The greedy step never sorts the pool:
ranks are counted from a sorted array of picked positions (alignment order) and a histogram of
quantised novelty values, and only the top of the alignment order is scanned, as far down as a
bound proves the best score cannot lie further.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from evoray.select.geometry import ResidualRows, UnitRows, ivf_index, knn, principal_directions
from evoray.select.ot import SemiRelaxedOT, lava_gradient
from evoray.select.selection import Selection

__all__ = ["evoselect", "Greedy", "TailBest", "novelty_bins", "smooth_targets"]

log = logging.getLogger(__name__)


def novelty_bins(x: np.ndarray, bins: int) -> np.ndarray:
    """The rank bin of novelty values in [0, 2], quantised to ``bins`` bins."""
    return np.minimum((np.clip(x, 0, 2) * (bins / 2)).astype(np.int64), bins - 1)


class Greedy:
    """Greedy rank-combined picking with novelty that only decreases as picks accumulate.

    Args:
        n: number of candidates.
        lam: weight of the novelty rank, in [0, 1].
        similar: ``similar(i) -> (rows, cos)``: candidates whose cosine to candidate ``i`` may
            lower their novelty (all rows for a dense scan, the nearest ones for kNN).
        bins: novelty values in [0, 2] are ranked after quantisation to this many bins
            (resolution 2/bins), which keeps a rank update O(bins) instead of O(n log n).
        redundant_cos: a candidate whose cosine to a pick exceeds this is a near-duplicate and
            is picked only when no other candidate remains (None: no such rule).
    """

    def __init__(self, n: int, lam: float, similar, bins: int = 65536,
                 redundant_cos: float | None = 0.98):
        self.n, self.lam, self.similar, self.bins = n, lam, similar, bins
        self.min_novelty = -np.inf if redundant_cos is None else 1.0 - redundant_cos
        self.alive = np.ones(n, bool)
        self.novelty = np.ones(n, np.float32)  # 1 while nothing is selected
        self.bin = self._bin(self.novelty)
        self.hist = np.bincount(self.bin, minlength=bins)
        self.top = int(np.flatnonzero(self.hist)[-1])  # highest occupied bin: only falls
        self.width = 64  # scan width of the alignment order, adapted pick by pick

    def _bin(self, x: np.ndarray) -> np.ndarray:
        return novelty_bins(x, self.bins)

    def block(self, align: np.ndarray, count: int) -> dict[str, np.ndarray]:
        """Pick ``count`` candidates with alignment scores ``align`` (N,), higher = better.

        Returns per-pick arrays: ``index``, ``alignment``, ``novelty`` (raw values at the time of
        the pick), ``alignment_term`` ``(1 − lam)·rank(a)`` and ``novelty_term``
        ``lam·rank(novelty)`` (ranks in [0, 1] among the remaining), and ``score`` (their sum).
        Ties go to the higher alignment, then the lower index.

        Only the finite part of the alignment order is scanned; the candidates at −inf (most of
        a kNN-sparse pool) all tie at rank 0, so only their best by novelty can win, which
        :class:`TailBest` finds without rescanning them pick by pick (scanning them made the
        greedy O(N) a pick: 94 s of 97 at 200k candidates, k = 20k).
        """
        lam = self.lam
        order = np.lexsort((np.arange(self.n), -align))  # alignment descending
        sorted_a = align[order]
        n_fin = int(np.count_nonzero(sorted_a > -np.inf))
        tie_end = np.searchsorted(-sorted_a[:n_fin], -sorted_a[:n_fin], side="right")
        pos_of = np.empty(self.n, np.int64)
        pos_of[order] = np.arange(self.n)
        alive_at = self.alive[order]
        tail = TailBest(order[n_fin:], self, alive_at[n_fin:])
        dead = np.sort(pos_of[~self.alive])
        out = {k: np.empty(count) for k in ("alignment", "novelty", "alignment_term",
                                            "novelty_term", "score")}
        out["index"] = np.empty(count, np.int64)
        start = 0
        for t in range(count):
            n_alive = self.n - len(dead)
            while start < n_fin and not alive_at[start]:
                start += 1
            below = np.concatenate([[0], np.cumsum(self.hist)])  # alive with a lower bin
            while self.hist[self.top] == 0:  # novelty only falls: so does the top bin
                self.top -= 1
            rn_max = below[self.top]
            width = self.width
            while True:
                end = min(start + width, n_fin)
                pos = start + np.flatnonzero(alive_at[start:end])
                ra = n_alive - (tie_end[pos] - np.searchsorted(dead, tie_end[pos]))
                if end == n_fin:
                    best = tail.best()
                    if best is not None:  # rank 0 in alignment, after every finite one
                        pos, ra = np.append(pos, n_fin + best), np.append(ra, 0)
                cand = order[pos]
                rn = below[self.bin[cand]]
                score = (1 - lam) * ra + lam * rn
                score[self.novelty[cand] < self.min_novelty] -= 2 * self.n  # near-dups last
                j = int(np.argmax(score))
                if end == n_fin:
                    break
                ra_beyond = n_alive - (end - np.searchsorted(dead, end))
                if score[j] >= (1 - lam) * ra_beyond + lam * rn_max:
                    break
                width *= 2
            self.width = max(64, width // 2)
            i, p = int(cand[j]), int(pos[j])
            scale = 1.0 / max(n_alive - 1, 1)
            out["index"][t] = i
            out["alignment"][t] = align[i]
            out["novelty"][t] = self.novelty[i]
            out["alignment_term"][t] = (1 - lam) * ra[j] * scale
            out["novelty_term"][t] = lam * rn[j] * scale
            out["score"][t] = score[j] * scale
            self._remove(i)
            alive_at[p] = False
            dead = np.insert(dead, np.searchsorted(dead, p), p)
        return out

    def _remove(self, i: int) -> None:
        """Mark ``i`` selected and lower the novelty of the candidates similar to it."""
        self.alive[i] = False
        self.hist[self.bin[i]] -= 1
        rows, cos = self.similar(i)
        new = (1.0 - cos).astype(np.float32)
        hit = self.alive[rows] & (new < self.novelty[rows])
        rows, new = rows[hit], new[hit]
        if len(rows):
            self.hist -= np.bincount(self.bin[rows], minlength=self.bins)
            self.novelty[rows] = new
            self.bin[rows] = self._bin(new)
            self.hist += np.bincount(self.bin[rows], minlength=self.bins)


class TailBest:
    """The best candidate of the −inf tail for :meth:`Greedy.block`: alive, not a
    near-duplicate, highest novelty bin, lowest position (the tail is in index order); failing
    that, the same among near-duplicates.

    Novelty only falls and candidates only die, so a candidate passed over once can never be the
    best later: a pointer moves forward through the tail looking for the top bin of the last
    full pass, and a full pass (one vectorised scan) happens only when the pointer runs out.
    ``alive`` is a view of the block's ``alive_at`` tail, updated in place as picks are made.
    ``greedy`` is anything with ``novelty``, ``bin`` (rows' arrays, updated in place) and
    ``min_novelty``: a :class:`Greedy`, or a shard of the sharded backend.
    """

    def __init__(self, rows: np.ndarray, greedy, alive: np.ndarray, chunk: int = 4096):
        self.rows, self.g, self.alive, self.chunk = rows, greedy, alive, chunk
        self.ptr, self.top = len(rows), -1

    def _ok(self, s: int, e: int) -> np.ndarray:
        return self.alive[s:e] & (self.g.novelty[self.rows[s:e]] >= self.g.min_novelty)

    def best(self) -> int | None:
        """The tail position (0-based) of the best candidate, None when the tail is empty."""
        while True:
            while self.ptr < len(self.rows):
                e = min(self.ptr + self.chunk, len(self.rows))
                hit = np.flatnonzero(self._ok(self.ptr, e) &
                                     (self.g.bin[self.rows[self.ptr:e]] == self.top))
                if len(hit):
                    self.ptr += int(hit[0])
                    return self.ptr
                self.ptr = e
            ok = self._ok(0, len(self.rows))
            if not ok.any():  # only near-duplicates (or nothing) left: rare, scan them all
                alive = np.flatnonzero(self.alive)
                if not len(alive):
                    return None
                b = self.g.bin[self.rows[alive]]
                return int(alive[np.flatnonzero(b == b.max())[0]])
            self.top, self.ptr = int(self.g.bin[self.rows[ok]].max()), 0


def smooth_targets(Vh: np.ndarray, knn: int, mix: float) -> np.ndarray:
    """``mix · unit(mean of each target's knn nearest targets) + (1 − mix) · v̂_j`` for unit rows
    ``Vh`` (M, d). Since a candidate's cosine is linear in the target vector, the cost
    ``(1 − w_j·ĝ_i) / 2`` of the result is the same mix of the two costs, and stays in [0, 1]
    (``‖w_j‖ ≤ 1``). Ties among neighbours break by target order."""
    kk = min(knn, len(Vh))
    sims = Vh.astype(np.float64) @ Vh.T.astype(np.float64)
    near = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
    mean = Vh[near].astype(np.float64).mean(axis=1)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), np.finfo(float).tiny)
    return (mix * mean + (1.0 - mix) * Vh).astype(np.float32)


def _block_sizes(k: int, blocks: int) -> list[int]:
    edges = np.round(np.linspace(0, k, min(blocks, k) + 1)).astype(int)
    return [int(x) for x in np.diff(edges)]


def evoselect(G: np.ndarray, V: np.ndarray, k: int, *, seed: int = 0, lam: float = 0.25,
              blocks: int = 10, eps: float = 0.01, tau: float = 0.01, floor: float = 1e-3,
              center: bool | str = "unit_mean", alignment: str = "mass", target_knn: int = 20,
              target_mix: float = 0.75, sparse_above: int = 100_000,
              ot_knn: int = 1000, novelty: str = "auto", novelty_dense_max: int = 20_000,
              novelty_knn: int = 64, nlist: int | None = None, nprobe: int = 8,
              novelty_codec: str = "SQfp16", novelty_pcs: int = 50, bins: int = 65536,
              min_share: float = 0.01,
              redundant_cos: float | None = 0.98, tol: float = 1e-6,
              max_iter: int = 5000) -> Selection:
    """EvoSelect: semi-relaxed OT alignment with blockwise, interleaved diversification.

    Args:
        G: (N, d) candidate features (float32 or float16), no zero rows.
        V: (M, d) target features.
        k: number of candidates to select, 1 <= k <= N.
        seed: seeds the IVF training sample (the rest is deterministic).
        lam: trade-off in [0, 1]: 0 = pure OT alignment, 1 = pure farthest-point diversity.
        blocks: B, number of blocks; the OT is re-solved after each (``min(B, k)`` used).
        eps: entropic regularisation of the OT, in cost units (costs lie in [0, 1]).
        tau: KL penalty on the relaxed candidate marginal.
        floor: lowest target mass after a block, as a fraction of the initial mass 1/M.
        center: the centring before normalising (:class:`~evoray.select.geometry.UnitRows`):
            ``"mean"`` (or True) subtracts the pool's mean feature from G and V;
            ``"unit_mean"`` normalises every row first and subtracts the mean of the normalised
            rows, so that a few large gradients (a trained proxy's wrong labels) do not make
            the centre; ``"none"`` (or False) does not centre (docs/algorithms.md §3.1).
        alignment: ``"mass"`` (received OT mass, higher = better) or ``"lava"`` (LAVA's
            calibrated dual gradient of the candidate potential, lower = better; ranked negated).
        target_knn: smoothing of the targets: each target's cost row becomes ``target_mix``
            times the cost to the mean direction of its ``target_knn`` nearest targets (itself
            included; cosines of the centred targets) plus ``1 − target_mix`` times its own
            (:func:`smooth_targets`; capped at M). 0 = off. A single target's gradient under a
            trained proxy holds its own letter and wording; the neighbourhood mean keeps what the
            targets share, the task's direction, against which a wrong label's gradient points
            away (docs/algorithms.md §3.1).
        target_mix: weight of the smoothed direction in the cost, in [0, 1].
        sparse_above: above this many candidates, OT runs on kNN-sparsified costs.
        ot_knn: candidates kept per target on the sparse path (capped at N).
        novelty: ``"dense"`` (scan all rows after each pick), ``"knn"`` (faiss IVF neighbours)
            or ``"auto"`` (dense up to ``novelty_dense_max`` candidates).
        novelty_knn: neighbours of each pick whose novelty is updated on the kNN path.
        nlist, nprobe, novelty_codec: the novelty IVF index (default nlist = round(sqrt N)).
        novelty_pcs: novelty (and ``redundant_cos``) is measured after projecting the pool's
            top ``novelty_pcs`` principal directions out of the centred, normalised features
            (:class:`~evoray.select.geometry.ResidualRows`; at most ``min(N, d) // 4`` of them,
            from at most 20,000 rows sampled with ``seed``). Those directions are what
            candidates of one template and answer letter share, and they hide near-duplicates:
            a reworded question can be less similar to its original than to other questions of
            the same wording and letter, and removing the directions makes the original its
            nearest neighbour far more often (figures: docs/algorithms.md §3.5). 0 = novelty
            on the features themselves.
        bins: quantisation of novelty for ranking (resolution 2/bins).
        min_share: a candidate receiving less OT mass than this fraction of a uniform share
            (1 / remaining candidates) counts as not aligned at all: its alignment ties at the
            lowest rank. The sparse path gives exactly zero mass to candidates outside every
            target's list; this makes the dense path rank them the same way instead of by
            differences of e^-30-sized masses.
        redundant_cos: near-duplicate threshold: a candidate with cosine above it to a pick is
            picked only once no other candidate remains (None: off).
        tol, max_iter: OT stopping rule (L1 target-marginal violation) and iteration cap.

    Returns:
        :class:`Selection`. ``scores``: ``alignment`` (first solve, (N,)) and ``novelty`` (after
        the last pick). ``explain``: raw ``alignment`` and ``novelty`` at the time of each pick,
        their rank terms ``alignment_term`` and ``novelty_term``, ``score`` and ``block``.
        ``diagnostics``: per-block OT figures and a ``timing`` split (cost, ot, diversification).
    """
    if alignment not in ("mass", "lava"):
        raise ValueError(f"alignment must be 'mass' or 'lava', got {alignment!r}")
    if novelty not in ("auto", "dense", "knn"):
        raise ValueError(f"novelty must be 'auto', 'dense' or 'knn', got {novelty!r}")
    if target_knn < 0 or not 0.0 <= target_mix <= 1.0:
        raise ValueError(f"target_knn must be >= 0 and target_mix in [0, 1], got {target_knn} "
                         f"and {target_mix}")
    timing = {"cost": 0.0, "ot": 0.0, "diversification": 0.0}
    t0 = time.perf_counter()
    n, m = len(G), len(V)
    U = UnitRows(G, center=center)
    Vh = U.targets(V)
    if target_knn > 0:
        Vh = smooth_targets(Vh, target_knn, target_mix)
    sparse = n > sparse_above
    if sparse:
        sims, idx = knn(Vh, U, min(ot_knn, n))
        C = ((1.0 - sims) / 2).astype(np.float32)
    else:
        idx = None
        C = np.empty((m, n), np.float32)
        for s, X in U.iter():
            C[:, s:s + len(X)] = (1.0 - Vh @ X.T) / 2
    timing["cost"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pcs = min(novelty_pcs, min(n, U.dim) // 4)
    novelty_space = ResidualRows(U, principal_directions(U, pcs, seed=seed)) if pcs > 0 else U
    use_dense = novelty == "dense" or (novelty == "auto" and n <= novelty_dense_max)
    if use_dense:
        X = novelty_space.dense()
        rows_all = np.arange(n)

        def similar(i: int) -> tuple[np.ndarray, np.ndarray]:
            return rows_all, X @ X[i]
    else:
        index = ivf_index(novelty_space, nlist=nlist, nprobe=nprobe, codec=novelty_codec, seed=seed)
        kk = min(novelty_knn, n)

        def similar(i: int) -> tuple[np.ndarray, np.ndarray]:
            D, Idx = index.search(novelty_space.take([i]), kk)
            found = Idx[0] >= 0
            return Idx[0][found], D[0][found]
    greedy = Greedy(n, lam, similar, bins=bins, redundant_cos=redundant_cos)
    timing["diversification"] += time.perf_counter() - t0

    solver = SemiRelaxedOT(C, idx, n, eps=eps, tau=tau, tol=tol, max_iter=max_iter)
    b = np.full(m, 1.0 / m)
    a = np.full(n, 1.0 / n)
    reach = np.ones(m, bool)
    picks, ot_log, first_align = [], [], None
    sizes = _block_sizes(k, blocks)
    for block, size in enumerate(sizes):
        t0 = time.perf_counter()
        if reach.any():
            res = solver.solve(b, a)
            mass = solver.mass()
            align = mass if alignment == "mass" else -lava_gradient(solver.potentials()[0])
            align = np.where(mass * np.count_nonzero(a) < min_share, -np.inf, align)
            ot_log.append({"block": block, "iterations": res.iterations,
                           "converged": res.converged, "violation": res.violation,
                           "marginal_err": res.marginal_err, "cost": res.cost,
                           "targets_left": int((b > 0).sum())})
        else:  # every target's candidates are picked: no alignment left, novelty decides
            align = np.full(n, -np.inf)
        timing["ot"] += time.perf_counter() - t0
        first_align = align if first_align is None else first_align

        t0 = time.perf_counter()
        out = greedy.block(align, size)
        out["block"] = np.full(size, block)
        picks.append(out)
        timing["diversification"] += time.perf_counter() - t0
        if block == len(sizes) - 1:
            break
        t0 = time.perf_counter()
        b = np.maximum(b - solver.carried(out["index"]), floor / m)
        a[out["index"]] = 0.0
        a[a > 0] = 1.0 / np.count_nonzero(a)
        if sparse:  # a target whose listed candidates are all picked has nowhere to send mass
            reach = (a[idx] > 0).any(axis=1)
        b = np.where(reach, b, 0.0)
        b /= max(b.sum(), np.finfo(float).tiny)
        timing["ot"] += time.perf_counter() - t0

    explain = {key: np.concatenate([p[key] for p in picks]) for key in picks[0]}
    indices = explain.pop("index")
    timing["total"] = sum(timing.values())
    diagnostics = {
        "ot_cost": ot_log[0]["cost"], "iterations": sum(r["iterations"] for r in ot_log),
        "converged": all(r["converged"] for r in ot_log),
        "target_marginal_err": max(r["marginal_err"] for r in ot_log), "ot": ot_log,
        "sparse": sparse, "novelty": "dense" if use_dense else "knn", "centered": U.center,
        "alignment": alignment, "novelty_pcs": pcs, "target_knn": min(target_knn, m),
        "timing": timing,
    }
    return Selection(indices=indices, scores={"alignment": first_align,
                                              "novelty": greedy.novelty.copy()},
                     explain=explain, diagnostics=diagnostics, method="evoselect")
