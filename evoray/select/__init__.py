"""Selectors: EvoSelect and five baselines, as pure functions on feature arrays (no Ray).

``select(G, V, k, method=...)`` is the entry point; see ALGORITHMS.md §3 for the methods.
"""

from evoray.select.api import METHODS, budget, select
from evoray.select.baselines import attr_div, attribution, attribution_scores, diversity, random
from evoray.select.evoselect import evoselect
from evoray.select.ot import SemiRelaxedOT, lava_gradient
from evoray.select.selection import Selection, nearest_targets
from evoray.select.tsds import tsds, tsds_probabilities

__all__ = [
    "METHODS", "Selection", "SemiRelaxedOT", "attr_div", "attribution", "attribution_scores",
    "budget", "diversity", "evoselect", "lava_gradient", "nearest_targets", "random", "select",
    "tsds", "tsds_probabilities",
]
