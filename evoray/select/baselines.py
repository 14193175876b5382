"""Baseline selectors: Random, Attribution (LESS), Diversity (Prismatic Synthesis), Attr-Div.

References: Xia et al. 2024, LESS (princeton-nlp/LESS, ``matching.py``); Jung et al. 2025,
Prismatic Synthesis (arXiv 2505.20161). Definitions: docs/algorithms.md §4; every score uses
row-normalised features ``ĝ = g / ‖g‖`` (no centring).
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from evoray.select.geometry import UnitRows, blocks, unit
from evoray.select.selection import Selection

__all__ = ["random", "attribution", "attribution_scores", "diversity", "attr_div", "clusters"]


def random(G: np.ndarray, V: np.ndarray, k: int, *, seed: int = 0) -> Selection:
    """Uniform sample of k of the N candidates without replacement, in draw order.

    Uses ``numpy.random.default_rng(seed).permutation(N)[:k]``; G and V are only counted.
    """
    t0 = time.perf_counter()
    picks = np.random.default_rng(seed).permutation(len(G))[:k]
    return Selection(indices=picks, method="random",
                     diagnostics={"timing": {"total": time.perf_counter() - t0}})


def attribution_scores(G: np.ndarray, V: np.ndarray, subtasks=None) -> np.ndarray:
    """LESS scores ``s_i = max_t ⟨ĝ_i, mean_{j ∈ t} v̂_j⟩``, (N,) float32.

    Args:
        G: (N, d) candidates; V: (M, d) targets.
        subtasks: (M,) labels of the targets; None = one subtask (the plain LESS mean).
    """
    Vh = unit(V)
    labels = np.zeros(len(V), np.int64) if subtasks is None else \
        np.unique(np.asarray(subtasks), return_inverse=True)[1]
    means = np.stack([Vh[labels == t].mean(axis=0) for t in range(labels.max() + 1)])
    U = UnitRows(G)
    scores = np.empty(len(G), np.float32)
    for s, X in U.iter():
        scores[s:s + len(X)] = (X @ means.T).max(axis=1)
    return scores


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first, ties by lower index."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


def attribution(G: np.ndarray, V: np.ndarray, k: int, *, seed: int = 0,
                subtasks=None) -> Selection:
    """LESS: top-k of ``s_i = ⟨ĝ_i, mean_j v̂_j⟩`` (the max over subtask means when
    ``subtasks`` (M,) labels the targets). Deterministic; ``seed`` is unused."""
    t0 = time.perf_counter()
    scores = attribution_scores(G, V, subtasks)
    picks = _top(scores, k)
    return Selection(indices=picks, scores={"attribution": scores},
                     explain={"alignment": scores[picks].astype(np.float64)}, method="attribution",
                     diagnostics={"timing": {"total": time.perf_counter() - t0}})


def clusters(G: np.ndarray, n_clusters: int, *, niter: int = 20, seed: int = 0,
             max_points_per_centroid: int = 256,
             two_level_above: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (faiss) on ``ĝ``: the cluster of each row and its cosine to the centroid.

    Up to ``two_level_above`` clusters, one k-means: faiss trains on at most
    ``max_points_per_centroid · n_clusters`` rows (sampled with ``seed``), then every row is
    assigned to its nearest centroid, block by block. Above, two levels (:func:`_two_level`):
    one k-means assigns N rows to N·K flops per iteration, which at 1M candidates and the
    default 100,000 clusters is about 1e14 a pass (a projected 311 min on 2 cores, against
    94 s at 100k).

    Returns:
        ``(labels, cos)``, both (N,).
    """
    U = UnitRows(G)
    if n_clusters > two_level_above:
        return _two_level(U, n_clusters, niter=niter, seed=seed,
                          max_points_per_centroid=max_points_per_centroid)
    km = _kmeans(U, np.arange(len(U)), n_clusters, niter, seed, max_points_per_centroid)
    labels = np.empty(len(U), np.int64)
    cos = np.empty(len(U), np.float32)
    for s, e in blocks(len(U)):
        D, Idx = km.index.search(U.rows(s, e), 1)
        labels[s:e], cos[s:e] = Idx[:, 0], D[:, 0]
    return labels, cos


def _kmeans(U: UnitRows, rows: np.ndarray, k: int, niter: int, seed: int,
            max_points_per_centroid: int) -> faiss.Kmeans:
    """A spherical faiss k-means with ``k`` centroids trained on (a sample of) ``U[rows]``."""
    train = min(len(rows), max_points_per_centroid * k)
    if train < len(rows):
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), train, replace=False))]
    km = faiss.Kmeans(U.dim, k, niter=niter, spherical=True, seed=seed,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
                      verbose=False)
    km.train(U.take(rows))
    return km


def _two_level(U: UnitRows, n_clusters: int, *, niter: int, seed: int,
               max_points_per_centroid: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-level spherical k-means, as faiss's ``contrib.clustering.two_level_clustering``
    (which needs every row in memory as float32, 4 GiB at 1M × 1024, and leaves the assignment
    to the caller): ``round(√K)`` coarse clusters, then each coarse cluster split by its own
    k-means into a share of the K clusters proportional to its size, its rows assigned to the
    nearest of its own centroids. Cost per iteration about N·2√K·d instead of N·K·d."""
    n = len(U)
    nc1 = max(1, int(round(np.sqrt(n_clusters))))
    coarse = _kmeans(U, np.arange(n), nc1, niter, seed, max_points_per_centroid)
    top = np.empty(n, np.int64)
    for s, e in blocks(n):
        top[s:e] = coarse.index.search(U.rows(s, e), 1)[1][:, 0]
    size = np.bincount(top, minlength=nc1)
    edges = np.cumsum(size) * n_clusters // n  # fine clusters up to each coarse one
    share = np.minimum(np.maximum(np.diff(edges, prepend=0), size > 0), size)
    order = np.argsort(top, kind="stable")
    labels = np.empty(n, np.int64)
    cos = np.empty(n, np.float32)
    first, offset = 0, 0
    for c in range(nc1):
        rows = order[first:first + size[c]]
        first += size[c]
        if not len(rows):
            continue
        km = _kmeans(U, rows, int(share[c]), niter, seed + 1 + c, max_points_per_centroid)
        D, Idx = km.index.search(U.take(rows), 1)
        labels[rows], cos[rows] = offset + Idx[:, 0], D[:, 0]
        offset += int(share[c])
    return labels, cos


def diversity(G: np.ndarray, V: np.ndarray, k: int, *, seed: int = 0,
              cluster_ratio: float = 0.1, niter: int = 20,
              max_points_per_centroid: int = 256, two_level_above: int = 4096) -> Selection:
    """Prismatic-Synthesis diversity: spherical k-means with ``round(cluster_ratio · N)``
    clusters, then fill the budget from the smallest clusters first (ties by cluster id), within
    a cluster nearest-to-centroid first. Targets are not used.

    Args:
        cluster_ratio: clusters per candidate (0.1, docs/algorithms.md §4).
        niter: k-means iterations (20).
        max_points_per_centroid: faiss subsamples training above this many rows per cluster.
        two_level_above: above this many clusters, two-level k-means (:func:`clusters`).
    """
    t0 = time.perf_counter()
    n_clusters = max(1, min(len(G), int(round(cluster_ratio * len(G)))))
    labels, cos = clusters(G, n_clusters, niter=niter, seed=seed,
                           max_points_per_centroid=max_points_per_centroid,
                           two_level_above=two_level_above)
    size = np.bincount(labels, minlength=n_clusters)
    # sort rows by (cluster size, cluster id, -cos, index)
    order = np.lexsort((np.arange(len(G)), -cos, labels, size[labels]))
    picks = order[:k]
    return Selection(indices=picks, scores={"cluster": labels, "cluster_size": size[labels],
                                            "centroid_cos": cos},
                     explain={"novelty": 1.0 / size[labels[picks]]}, method="diversity",
                     diagnostics={"clusters": n_clusters,
                                  "timing": {"total": time.perf_counter() - t0}})


def attr_div(G: np.ndarray, V: np.ndarray, k: int, *, seed: int = 0, drop: float = 0.25,
             subtasks=None, cluster_ratio: float = 0.1, niter: int = 20,
             max_points_per_centroid: int = 256, two_level_above: int = 4096) -> Selection:
    """Attr-Div: drop the bottom ``drop`` share of candidates by Attribution score, then
    Diversity on the rest (``round(cluster_ratio · N_kept)`` clusters).

    Raises:
        ValueError: when k exceeds the candidates kept.
    """
    t0 = time.perf_counter()
    scores = attribution_scores(G, V, subtasks)
    n_keep = len(G) - int(np.floor(drop * len(G)))
    if k > n_keep:
        raise ValueError(f"attr_div keeps {n_keep} of {len(G)} candidates after dropping the "
                         f"bottom {drop:.0%}; k={k} is larger (lower k or the 'drop' parameter)")
    kept = np.sort(_top(scores, n_keep))
    sub = diversity(G[kept] if n_keep < len(G) else G, V, k, seed=seed,
                    cluster_ratio=cluster_ratio, niter=niter,
                    max_points_per_centroid=max_points_per_centroid,
                    two_level_above=two_level_above)
    picks = kept[sub.indices]
    table = {"attribution": scores}
    for name, col in sub.scores.items():
        full = np.full(len(G), -1, col.dtype)
        full[kept] = col
        table[name] = full
    return Selection(indices=picks, scores=table,
                     explain={"alignment": scores[picks].astype(np.float64),
                              "novelty": sub.explain["novelty"]},
                     method="attr_div",
                     diagnostics={"kept": n_keep, "clusters": sub.diagnostics["clusters"],
                                  "timing": {"total": time.perf_counter() - t0}})
