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
             max_points_per_centroid: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (faiss) on ``ĝ``: the cluster of each row and its cosine to the centroid.

    faiss trains on at most ``max_points_per_centroid · n_clusters`` rows (sampled with
    ``seed``); every row is then assigned to its nearest centroid, block by block.

    Returns:
        ``(labels, cos)``, both (N,).
    """
    U = UnitRows(G)
    n = len(U)
    train = min(n, max_points_per_centroid * n_clusters)
    rows = np.arange(n) if train == n else \
        np.sort(np.random.default_rng(seed).choice(n, train, replace=False))
    km = faiss.Kmeans(U.dim, n_clusters, niter=niter, spherical=True, seed=seed,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
                      verbose=False)
    km.train(U.take(rows))
    labels = np.empty(n, np.int64)
    cos = np.empty(n, np.float32)
    for s, e in blocks(n):
        D, Idx = km.index.search(U.rows(s, e), 1)
        labels[s:e], cos[s:e] = Idx[:, 0], D[:, 0]
    return labels, cos


def diversity(G: np.ndarray, V: np.ndarray, k: int, *, seed: int = 0,
              cluster_ratio: float = 0.1, niter: int = 20,
              max_points_per_centroid: int = 256) -> Selection:
    """Prismatic-Synthesis diversity: spherical k-means with ``round(cluster_ratio · N)``
    clusters, then fill the budget from the smallest clusters first (ties by cluster id), within
    a cluster nearest-to-centroid first. Targets are not used.

    Args:
        cluster_ratio: clusters per candidate (0.1, docs/algorithms.md §4).
        niter: k-means iterations (20).
        max_points_per_centroid: faiss subsamples training above this many rows per cluster.
    """
    t0 = time.perf_counter()
    n_clusters = max(1, min(len(G), int(round(cluster_ratio * len(G)))))
    labels, cos = clusters(G, n_clusters, niter=niter, seed=seed,
                           max_points_per_centroid=max_points_per_centroid)
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
             max_points_per_centroid: int = 256) -> Selection:
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
                    max_points_per_centroid=max_points_per_centroid)
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
