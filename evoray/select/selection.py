"""The result of every selector, and the explanation of each pick."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evoray.select.geometry import UnitRows, blocks

__all__ = ["Selection", "nearest_in", "nearest_targets"]


@dataclass
class Selection:
    """Selected candidates, best first, with the scores that chose them.

    Attributes:
        indices: (k',) int64 rows of ``G`` in rank order (k' = k, or fewer distinct rows when a
            sampler draws with replacement; see ``counts``).
        scores: per-candidate table, name -> (N,) array (e.g. the OT mass of every candidate).
        explain: per-pick table aligned with ``indices``, name -> (k',) or (k', 3) array:
            ``alignment`` and ``novelty`` (the two terms of the pick, NaN where a method has no
            such term), ``count`` and, once :func:`evoray.select.select` has run,
            ``nearest_targets`` (rows of ``V``) and ``nearest_cos``.
        diagnostics: method-specific figures: OT cost, iterations, convergence, target-marginal
            error, and ``timing`` in seconds (``cost``, ``ot``, ``diversification``, ``total``).
        method: the selector's name.
    """

    indices: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    explain: dict[str, np.ndarray] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    method: str = ""

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.explain.setdefault("count", np.ones(len(self.indices), np.int64))
        for name in ("alignment", "novelty"):
            self.explain.setdefault(name, np.full(len(self.indices), np.nan))

    def __len__(self) -> int:
        return len(self.indices)


def nearest_targets(G: np.ndarray, V: np.ndarray, picks: np.ndarray, *, n: int = 3,
                    center: bool | str = False) -> tuple[np.ndarray, np.ndarray]:
    """For each pick, its ``n`` most cosine-similar targets, most similar first.

    Args:
        G: (N, d) candidates; V: (M, d) targets; picks: (k,) rows of ``G``.
        center: measure cosines in EvoSelect's centred geometry (see
            :class:`~evoray.select.geometry.UnitRows`: ``"mean"``/True, ``"unit_mean"``,
            ``"none"``/False).

    Returns:
        ``(rows, cos)``, both (k, min(n, M)): target rows and their cosines.
    """
    U = UnitRows(G, center=center)
    return nearest_in(U, U.targets(V), picks, n=n)


def nearest_in(U, Vh: np.ndarray, picks: np.ndarray, *, n: int = 3
               ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_targets` for rows read through ``U.take`` (a
    :class:`~evoray.select.geometry.UnitRows` or a sharded pool) and targets ``Vh`` already in
    the same geometry."""
    n = min(n, len(Vh))
    rows = np.empty((len(picks), n), np.int64)
    cos = np.empty((len(picks), n), np.float32)
    for s, e in blocks(len(picks)):
        S = U.take(picks[s:e]) @ Vh.T
        top = np.argpartition(-S, n - 1, axis=1)[:, :n] if n < len(Vh) else \
            np.tile(np.arange(n), (e - s, 1))
        sims = np.take_along_axis(S, top, 1)
        order = np.lexsort((top, -sims), axis=1)
        rows[s:e] = np.take_along_axis(top, order, 1)
        cos[s:e] = np.take_along_axis(sims, order, 1)
    return rows, cos
