"""Each selector's own settings as typed config sections: ``select.evoselect.*``, ``select.tsds.*``,
``select.diversity.*`` and ``select.attr_div.*`` (docs/algorithms.md §3-4). Their defaults are the
keyword defaults of the selector functions in :mod:`evoray.select` (a unit test keeps the two
equal), so a sweep can vary any of them (``select.tsds.kde_K: {grid: [100, 1000]}``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from evoray.config.fields import _f, _Stage

__all__ = ["EvoSelectSettings", "TsdsSettings", "DiversitySettings", "AttrDivSettings",
           "SELECTOR_SETTINGS"]


@dataclass
class EvoSelectSettings(_Stage):
    """EvoSelect beyond ``select.lam``, ``blocks``, ``eps`` and ``tau``."""

    section: ClassVar[str] = "select.evoselect"
    floor: float = _f(1e-3, "lowest target mass after a block, as a fraction of 1/M")
    center: bool | Literal["mean", "unit_mean", "none"] = _f(
        "unit_mean", "centring before normalising: true/mean = subtract the pool's mean feature; "
        "unit_mean = normalise, then subtract the mean of the normalised rows; false/none = "
        "none")
    alignment: Literal["mass", "lava"] = _f("mass", "alignment score: received OT mass, or "
                                            "LAVA's calibrated dual gradient")
    target_knn: int = _f(20, "each target's cost is mixed with that of the mean direction of its "
                         "target_knn nearest targets; 0 = off")
    target_mix: float = _f(0.75, "weight of the smoothed target direction in the cost, in [0, 1]")
    sparse_above: int = _f(100_000, "above this many candidates, OT on kNN-sparse costs")
    ot_knn: int = _f(1000, "candidates kept per target on the sparse OT path")
    novelty: Literal["auto", "dense", "knn"] = _f("auto", "novelty updates: scan every row, "
                                                  "faiss IVF neighbours, or auto by pool size")
    novelty_dense_max: int = _f(20_000, "auto: dense novelty up to this many candidates")
    novelty_knn: int = _f(64, "neighbours of each pick updated on the kNN novelty path")
    nlist: int | None = _f(None, "IVF lists of the novelty index; null = round(sqrt N)")
    nprobe: int = _f(8, "IVF lists probed per novelty query")
    novelty_codec: str = _f("SQfp16", "faiss codec of the novelty index")
    novelty_pcs: int = _f(50, "principal directions projected out before novelty; 0 = none")
    bins: int = _f(65536, "quantisation of novelty for ranking")
    min_share: float = _f(0.01, "OT mass below this share of uniform counts as not aligned")
    redundant_cos: float | None = _f(0.98, "near-duplicate cosine threshold; null = off")
    tol: float = _f(1e-6, "OT stopping rule: L1 target-marginal violation")
    max_iter: int = _f(5000, "OT iteration cap")

    def _check(self) -> None:
        self._require(self.floor >= 0, "floor", "must be >= 0")
        for name in ("sparse_above", "ot_knn", "novelty_dense_max", "novelty_knn", "nprobe",
                     "bins", "max_iter"):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(self.nlist is None or self.nlist > 0, "nlist", "must be positive")
        self._require(self.novelty_pcs >= 0, "novelty_pcs", "must be >= 0")
        self._require(self.target_knn >= 0, "target_knn", "must be >= 0")
        self._require(0 <= self.target_mix <= 1, "target_mix", "must be in [0, 1]")
        self._require(self.min_share >= 0, "min_share", "must be >= 0")
        self._require(self.redundant_cos is None or -1 <= self.redundant_cos <= 1,
                      "redundant_cos", "must be in [-1, 1]")
        self._require(self.tol > 0, "tol", "must be positive")


@dataclass
class TsdsSettings(_Stage):
    """TSDS (the authors' closed form; docs/algorithms.md §4)."""

    section: ClassVar[str] = "select.tsds"
    alpha: float = _f(0.5, "alignment/diversity trade-off")
    C: float = _f(5.0, "scale constant")
    sigma: float = _f(0.75, "KDE kernel width on unit features; 0 turns KDE off")
    max_K: int = _f(5000, "neighbours per target (capped at N // 10)")
    kde_K: int = _f(1000, "neighbours per KDE query (capped at N // 10)")
    replace: bool = _f(True, "draw with replacement (the authors' way); false = k distinct")
    exact_max: int = _f(20_000, "exact kNN up to this many candidates, faiss IVF above (the "
                        "authors' settings)")

    def _check(self) -> None:
        self._require(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        self._require(self.C > 0, "C", "must be positive")
        self._require(self.sigma >= 0, "sigma", "must be >= 0")
        for name in ("max_K", "kde_K", "exact_max"):
            self._require(getattr(self, name) > 0, name, "must be positive")


@dataclass
class DiversitySettings(_Stage):
    """Diversity: spherical k-means, smallest clusters first."""

    section: ClassVar[str] = "select.diversity"
    cluster_ratio: float = _f(0.1, "clusters per candidate")
    niter: int = _f(20, "k-means iterations")
    max_points_per_centroid: int = _f(256, "faiss subsamples k-means training above this")
    two_level_above: int = _f(4096, "above this many clusters, two-level k-means (√K coarse "
                              "clusters, each split by its own k-means)")

    def _check(self) -> None:
        self._require(0.0 < self.cluster_ratio <= 1.0, "cluster_ratio", "must be in (0, 1]")
        self._require(self.two_level_above >= 0, "two_level_above", "must be >= 0")
        self._require(self.niter > 0, "niter", "must be positive")
        self._require(self.max_points_per_centroid > 0, "max_points_per_centroid",
                      "must be positive")


@dataclass
class AttrDivSettings(DiversitySettings):
    """Attr-Div: drop the lowest-attribution share, then diversity on the rest."""

    section: ClassVar[str] = "select.attr_div"
    drop: float = _f(0.25, "share of candidates dropped by attribution score")

    def _check(self) -> None:
        super()._check()
        self._require(0.0 <= self.drop < 1.0, "drop", "must be in [0, 1)")


# method -> its settings' field name in SelectConfig (methods not listed have none)
SELECTOR_SETTINGS = {"evoselect": "evoselect", "tsds": "tsds", "diversity": "diversity",
                     "attr_div": "attr_div"}
