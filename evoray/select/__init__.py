"""Selectors: EvoSelect and five baselines, as pure functions on feature arrays (no Ray).

``select(G, V, k, method=...)`` is the entry point; see docs/algorithms.md §3-4 for the methods.
"""

try:  # faiss is an extra, not a base dependency: faiss-cpu and faiss-gpu are the same module
    import faiss  # noqa: F401
except ImportError as e:
    raise ImportError("evoray's selectors need faiss: install evoray with exactly one of the "
                      "extras `cpu` (faiss-cpu) or `gpu` (faiss-gpu), e.g. "
                      "pip install -e '.[cpu]'") from e

from evoray.select.api import DRAWS, METHODS, budget, select  # noqa: E402
from evoray.select.baselines import attr_div, attribution, attribution_scores, diversity, random
from evoray.select.evoselect import evoselect
from evoray.select.ot import SemiRelaxedOT, lava_gradient
from evoray.select.selection import Selection, nearest_targets
from evoray.select.tsds import tsds, tsds_probabilities

__all__ = [
    "DRAWS", "METHODS", "Selection", "SemiRelaxedOT", "attr_div", "attribution",
    "attribution_scores", "budget", "diversity", "evoselect", "lava_gradient", "nearest_targets",
    "random", "select", "tsds", "tsds_probabilities",
]
