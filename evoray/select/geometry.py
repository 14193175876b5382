"""Cosine geometry of feature matrices, computed block by block so that no N×N (or, for large
pools, no N×M) matrix ever exists.

:class:`UnitRows` is a read-only, row-normalised (optionally centred) view of a candidate matrix
``G``: it keeps ``G`` as given (float32 or float16, never copied) plus one float32 norm per row,
and hands out normalised float32 blocks on demand. Every selector reads candidates through it.
Nearest-neighbour searches use faiss: exact brute force (``faiss.knn``, merged over blocks with
``faiss.ResultHeap``) or an IVF index for large pools.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np

__all__ = ["BLOCK_ROWS", "CENTERINGS", "ResidualRows", "UnitRows", "blocks", "centering",
           "inverse_norms", "ivf_index", "ivf_sample", "ivf_train", "ivf_trained", "knn",
           "mean_rows", "principal_directions", "sum_rows", "unit"]

BLOCK_ROWS = 8192  # rows per block: 32 MiB of float32 at d = 1024


def blocks(n: int, size: int = BLOCK_ROWS) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(n)`` in steps of ``size``."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def unit(X: np.ndarray, mu: np.ndarray | None = None) -> np.ndarray:
    """Row-normalised float32 copy of ``X`` (n, d), centred by ``mu`` (d,) first if given.

    Rows of norm zero stay zero.
    """
    X = np.asarray(X, dtype=np.float32)
    if mu is not None:
        X = X - mu
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.finfo(np.float32).tiny)


class UnitRows:
    """Row-normalised view ``ĝ_i = (g_i − mu) / ‖g_i − mu‖`` of ``G`` (N, d), by blocks.

    Args:
        G: (N, d) float32 or float16 candidate features, kept by reference.
        center: ``"mean"`` (or True): ``mu`` is the pool's mean feature (float64 sum);
            ``"unit_mean"``: every row is normalised first and ``mu`` is the mean of the
            normalised rows, so that each candidate counts once in it whatever its gradient
            norm; ``"none"`` (or False): no centring.
        mu: the centre to use instead of ``G``'s own (a shard centres by its pool's centre).
    """

    def __init__(self, G: np.ndarray, *, center: bool | str = False,
                 mu: np.ndarray | None = None):
        self.G = G
        self.center = centering(center)
        self.inv_pre = None  # unit_mean: 1 / ‖g_i‖, applied before centring
        if self.center == "unit_mean":
            self.inv_pre = inverse_norms(G)
        self.mu = None
        if self.center != "none":
            self.mu = mean_rows(G, self.inv_pre) if mu is None else np.asarray(mu, np.float32)
        self.inv_norm = np.empty(len(G), np.float32)
        for s, e in blocks(len(G)):
            x = self._raw(s, e)
            self.inv_norm[s:e] = 1.0 / np.maximum(np.linalg.norm(x, axis=1),
                                                  np.finfo(np.float32).tiny)

    def __len__(self) -> int:
        return len(self.G)

    @property
    def dim(self) -> int:
        return self.G.shape[1]

    def _raw(self, s: int, e: int) -> np.ndarray:
        return self._centred(self.G[s:e].astype(np.float32), slice(s, e))

    def _centred(self, x: np.ndarray, rows) -> np.ndarray:
        if self.inv_pre is not None:
            x *= self.inv_pre[rows, None]
        if self.mu is not None:
            x -= self.mu
        return x

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Normalised rows ``start:stop`` as a new (stop − start, d) float32 array."""
        x = self._raw(start, stop)
        x *= self.inv_norm[start:stop, None]
        return x

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Normalised rows ``idx`` (any order) as a new (len(idx), d) float32 array."""
        idx = np.asarray(idx, dtype=np.int64)
        x = self._centred(self.G[idx].astype(np.float32), idx)
        x *= self.inv_norm[idx, None]
        return x

    def dense(self) -> np.ndarray:
        """All normalised rows, (N, d) float32 (small pools only)."""
        return self.rows(0, len(self))

    def targets(self, V: np.ndarray) -> np.ndarray:
        """Targets (M, d) normalised in the same geometry (same centring), float32."""
        return unit(unit(V) if self.inv_pre is not None else V, self.mu)

    def iter(self, size: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, normalised block)`` pairs over all rows."""
        for s, e in blocks(len(self), size):
            yield s, self.rows(s, e)


def principal_directions(base: UnitRows, m: int, *, sample: int = 20000,
                         seed: int = 0) -> np.ndarray:
    """The top ``m`` principal directions of ``base``'s normalised rows, (m, d) float32.

    Eigenvectors of the second-moment matrix ``XᵀX`` (the rows are centred already when
    ``base`` centres) of at most ``sample`` rows drawn with ``seed``, in float64; for fewer
    sampled rows than dimensions the Gram matrix ``XXᵀ`` is decomposed instead.
    """
    n = len(base)
    rows = np.arange(n) if n <= sample else np.sort(
        np.random.default_rng(seed).choice(n, size=sample, replace=False))
    X = base.take(rows).astype(np.float64)
    m = min(m, len(X), X.shape[1])
    if len(X) < X.shape[1]:
        w, U = np.linalg.eigh(X @ X.T)
        top = U[:, ::-1][:, :m]
        P = (X.T @ top) / np.sqrt(np.maximum(w[::-1][:m], np.finfo(float).tiny))
        return np.ascontiguousarray(P.T, dtype=np.float32)
    _, V = np.linalg.eigh(X.T @ X)
    return np.ascontiguousarray(V[:, ::-1][:, :m].T, dtype=np.float32)


class ResidualRows:
    """``base``'s normalised rows with the directions ``P`` (m, d, orthonormal) projected out,
    renormalised: ``r_i = (ĝ_i − PᵀPĝ_i) / ‖·‖``. Same block interface as :class:`UnitRows`.

    With ``P`` = the pool's top principal directions, what the pool's candidates share (in
    gradient features of MCQ data: the wording of a template and the answer letter) is removed,
    and what tells one question from another remains.
    """

    def __init__(self, base: UnitRows, P: np.ndarray):
        self.base, self.P = base, np.ascontiguousarray(P, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def dim(self) -> int:
        return self.base.dim

    def _residual(self, x: np.ndarray) -> np.ndarray:
        x = x - (x @ self.P.T) @ self.P
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self._residual(self.base.rows(start, stop))

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self._residual(self.base.take(idx))

    def dense(self) -> np.ndarray:
        return self.rows(0, len(self))

    def iter(self, size: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        for s, e in blocks(len(self), size):
            yield s, self.rows(s, e)


CENTERINGS = ("mean", "unit_mean", "none")


def centering(center: bool | str) -> str:
    """The centring mode of ``center``: True = ``"mean"``, False = ``"none"``, or one of
    :data:`CENTERINGS`."""
    if center is True or center is False:
        return "mean" if center else "none"
    if center not in CENTERINGS:
        raise ValueError(f"center must be one of {', '.join(CENTERINGS)} (or a bool), "
                         f"got {center!r}")
    return center


def inverse_norms(G: np.ndarray) -> np.ndarray:
    """``1 / ‖g_i‖`` of every row of ``G``, float32, by blocks (a zero row gives a huge value
    and stays zero when scaled)."""
    out = np.empty(len(G), np.float32)
    for s, e in blocks(len(G)):
        norms = np.linalg.norm(G[s:e].astype(np.float32), axis=1)
        out[s:e] = 1.0 / np.maximum(norms, np.finfo(np.float32).tiny)
    return out


def sum_rows(G: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Sum of the rows of ``G`` (N, d), each multiplied by ``scale[i]`` first when given,
    accumulated in float64 by blocks."""
    total = np.zeros(G.shape[1], np.float64)
    for s, e in blocks(len(G)):
        if scale is None:
            total += G[s:e].sum(axis=0, dtype=np.float64)
        else:
            total += (G[s:e].astype(np.float64) * scale[s:e, None]).sum(axis=0)
    return total


def mean_rows(G: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Mean row of ``G`` (N, d) (:func:`sum_rows` over N), returned as float32."""
    return (sum_rows(G, scale) / len(G)).astype(np.float32)


def knn(Q: np.ndarray, base: UnitRows, k: int, *, metric: str = "ip",
        subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``base`` for each query, by brute force over blocks.

    Args:
        Q: (m, d) float32 queries, normalised in ``base``'s geometry.
        base: the rows searched.
        k: neighbours per query (at most the number of rows searched).
        metric: ``"ip"`` (largest inner product = cosine first) or ``"l2"`` (smallest squared
            Euclidean distance first).
        subset: search only these rows of ``base`` (returned indices still index ``base``).

    Returns:
        ``(D, I)``, both (m, k): similarities (ip) or squared distances (l2), best first, and
        row indices into ``base``.
    """
    ip = metric == "ip"
    faiss_metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    rows = np.arange(len(base)) if subset is None else np.asarray(subset, np.int64)
    heap = faiss.ResultHeap(len(Q), k, keep_max=ip)
    for s, e in blocks(len(rows)):
        part = rows[s:e]
        X = base.rows(int(part[0]), int(part[-1]) + 1) if subset is None else base.take(part)
        D, Idx = faiss.knn(Q, X, min(k, len(part)), metric=faiss_metric)
        if D.shape[1] < k:  # a short last block: pad with results that never win
            pad = np.full((len(Q), k - D.shape[1]), -np.inf if ip else np.inf, np.float32)
            D = np.hstack([D, pad])
            Idx = np.hstack([Idx, np.full(pad.shape, -1, np.int64)])
        found = Idx >= 0
        heap.add_result(np.ascontiguousarray(D, np.float32),
                        np.ascontiguousarray(np.where(found, part[np.maximum(Idx, 0)], -1)))
    heap.finalize()
    return heap.D, heap.I


def ivf_index(base: UnitRows, *, nlist: int | None = None, nprobe: int = 8,
              codec: str = "SQfp16", metric: str = "ip", train_rows: int = 64,
              seed: int = 0, subset: np.ndarray | None = None) -> faiss.Index:
    """An IVF index over (a subset of) ``base``'s normalised rows, built block by block.

    Args:
        nlist: inverted lists; default ``round(sqrt(n))``.
        nprobe: lists scanned per query.
        codec: faiss storage codec: ``"Flat"`` (float32), ``"SQfp16"`` (half the memory) or
            ``"SQ8"`` (a quarter).
        metric: ``"ip"`` or ``"l2"``.
        train_rows: training rows per list (sampled with ``seed``), as faiss recommends 30-256.
        subset: index only these rows (ids in the index are then positions in ``subset``).
    """
    rows = np.arange(len(base)) if subset is None else np.asarray(subset, np.int64)
    index = ivf_trained(base, rows, nlist=nlist, codec=codec, metric=metric,
                        train_rows=train_rows, seed=seed)
    for s, e in blocks(len(rows)):
        index.add(base.take(rows[s:e]))
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index


def ivf_sample(n: int, *, nlist: int | None = None, train_rows: int = 64,
               seed: int = 0) -> tuple[int, np.ndarray]:
    """``(nlist, rows)``: the list count (default ``round(sqrt(n))``) and the sorted rows of
    ``range(n)`` an IVF index is trained on (``train_rows`` a list, drawn with ``seed``)."""
    nlist = nlist or max(1, int(round(np.sqrt(n))))
    rng = np.random.default_rng(seed)
    return nlist, np.sort(rng.choice(n, size=min(n, train_rows * nlist), replace=False))


def ivf_train(X: np.ndarray, nlist: int, *, codec: str = "SQfp16", metric: str = "ip",
              seed: int = 0) -> faiss.Index:
    """An empty IVF index (``nlist`` lists, ``codec``) trained on the rows ``X``."""
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(X.shape[1], f"IVF{nlist},{codec}", faiss_metric)
    faiss.extract_index_ivf(index).cp.seed = seed
    index.train(X)
    return index


def ivf_trained(base, rows: np.ndarray | int, *, nlist: int | None = None,
                codec: str = "SQfp16", metric: str = "ip", train_rows: int = 64,
                seed: int = 0) -> faiss.Index:
    """The empty, trained IVF index of :func:`ivf_index` over ``base``'s ``rows`` (an int n:
    the first n; ``base`` needs ``take``). A sharded pool trains the same index from the same
    :func:`ivf_sample` on a worker, and every shard adds its own rows to a copy, so that a
    search probes the same lists in every shard."""
    n = rows if isinstance(rows, int) else len(rows)
    nlist, sample = ivf_sample(n, nlist=nlist, train_rows=train_rows, seed=seed)
    X = base.take(sample if isinstance(rows, int) else rows[sample])
    return ivf_train(X, nlist, codec=codec, metric=metric, seed=seed)
