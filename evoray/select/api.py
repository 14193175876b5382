"""The selection dispatcher: ``select(G, V, k, method=...)`` checks the inputs once, routes to
one pure function per method, and adds each pick's explanation (its nearest targets)."""

from __future__ import annotations

import inspect
import logging
import time

import numpy as np

from evoray.errors import SelectError, did_you_mean
from evoray.select.baselines import attr_div, attribution, diversity, random
from evoray.select.evoselect import evoselect
from evoray.select.geometry import blocks
from evoray.select.selection import Selection, nearest_targets
from evoray.select.tsds import tsds

__all__ = ["DRAWS", "FEATURE_FREE", "METHODS", "budget", "select"]

log = logging.getLogger(__name__)

METHODS = {"evoselect": evoselect, "random": random, "attribution": attribution,
           "diversity": diversity, "attr_div": attr_div, "tsds": tsds}
# The methods whose picks come from a seeded draw over rows (a sample, k-means' initial
# centroids, TSDS's multinomial): with ``keys`` they see the rows sorted by key. attribution and
# evoselect score each row by its own features, so the order of the rows does not change them.
DRAWS = ("random", "diversity", "attr_div", "tsds")
# The methods that read no feature (random only counts the rows): a loop or a demo can select
# with them straight from the pool file (:func:`evoray.select.io.select_pool`), with no
# features stage.
FEATURE_FREE = ("random",)


def budget(n: int, *, k: int | None = None, ratio: float | None = None) -> int:
    """The number of picks: ``k`` if given, else ``round(ratio · n)`` (at least 1).

    Raises:
        SelectError: ratio outside (0, 1], or k outside [1, n].
    """
    if k is None:
        if ratio is None or not 0 < ratio <= 1:
            raise SelectError(f"ratio must be in (0, 1], got {ratio}")
        k = max(1, int(round(ratio * n)))
    if not 1 <= k <= n:
        raise SelectError(f"k must be between 1 and the number of usable candidates ({n}), "
                          f"got {k}")
    return k


def _name(i: int, ids) -> str:
    return f"row {i}" + (f" (id {ids[i]!r})" if ids is not None else "")


def _check_rows(X: np.ndarray, what: str, ids) -> np.ndarray:
    """Raise on NaN/inf rows; return the boolean mask of rows with a nonzero norm."""
    if X.ndim != 2 or X.dtype.kind != "f":
        raise SelectError(f"{what} must be a 2-D float array, got {X.dtype} {X.shape}")
    nonzero = np.empty(len(X), bool)
    for s, e in blocks(len(X)):
        x = X[s:e].astype(np.float32)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            i = s + int(np.flatnonzero(bad)[0])
            raise SelectError(f"{what}: {_name(i, ids)} has a NaN or infinite value "
                              f"({int(bad.sum())} such rows in rows {s}..{e - 1})")
        nonzero[s:e] = np.abs(x).max(axis=1) > 0
    return nonzero


def select(G: np.ndarray, V: np.ndarray, k: int, *, method: str = "evoselect", seed: int = 0,
           ids=None, target_ids=None, keys=None, **params) -> Selection:
    """Select k of the N candidates ``G`` for the targets ``V`` with one of :data:`METHODS`.

    Args:
        G: (N, d) candidate features, float32 or float16 (not copied unless rows are dropped).
        V: (M, d) target features.
        k: budget, 1 <= k <= N (after dropping zero rows).
        method: ``evoselect``, ``random``, ``attribution``, ``diversity``, ``attr_div``, ``tsds``.
        seed: makes every method deterministic.
        ids, target_ids: optional (N,) and (M,) ids, used in error messages only.
        keys: optional (N,) sortable content keys of the candidates (e.g.
            :func:`evoray.select.io.content_keys`, a hash of each record's prompt and response).
            The methods in :data:`DRAWS` then draw over the rows sorted by key (ties in the given
            order), so the same pool in another order gives the same selected records. Without
            keys they draw over the rows as given.
        **params: the method's own parameters (see each function; e.g. ``lam``, ``subtasks``).

    Returns:
        :class:`Selection` whose indices are rows of the ``G`` given, and whose ``explain`` has
        ``nearest_targets`` (rows of the ``V`` given) and ``nearest_cos``, (k', 3).

    Raises:
        SelectError: unknown method or parameter; mismatched dims; empty target set; NaN or
            infinite rows (naming the first); k outside [1, N]; a method's own refusal. Rows of
            zero norm carry no direction: they are dropped, with a warning giving their count.
    """
    if method not in METHODS:
        raise SelectError(f"unknown selection method {method!r}{did_you_mean(method, METHODS)}")
    fn = METHODS[method]
    accepted = set(inspect.signature(fn).parameters) - {"G", "V", "k", "seed"}
    for name in params:
        if name not in accepted:
            raise SelectError(f"{method}: unknown parameter {name!r}"
                              f"{did_you_mean(name, accepted) if accepted else '; it takes none'}")
    G, V = np.asarray(G), np.asarray(V)
    if V.ndim != 2 or len(V) == 0:
        raise SelectError(f"the target set is empty (shape {V.shape}); selection needs at "
                          "least one target feature")
    if G.ndim != 2 or len(G) == 0:
        raise SelectError(f"the candidate pool is empty (shape {G.shape})")
    if G.shape[1] != V.shape[1]:
        raise SelectError(f"candidate features have dim {G.shape[1]} but target features have "
                          f"dim {V.shape[1]}; both must come from the same projection")
    t0 = time.perf_counter()
    keep_g = _check_rows(G, "candidate features", ids)
    keep_v = _check_rows(V, "target features", target_ids)
    dropped = {"candidates": int((~keep_g).sum()), "targets": int((~keep_v).sum())}
    if dropped["candidates"]:
        log.warning("dropped %d candidate rows of zero norm (no gradient direction)",
                    dropped["candidates"])
    if dropped["targets"]:
        log.warning("dropped %d target rows of zero norm", dropped["targets"])
    if not keep_v.any():
        raise SelectError("every target feature has zero norm; the target set is empty")
    rows_g = np.flatnonzero(keep_g)
    rows_v = np.flatnonzero(keep_v)
    if keys is not None:
        keys = np.asarray(keys)
        if keys.shape != (len(G),):
            raise SelectError(f"keys must hold one entry per candidate row ({len(G)}), got "
                              f"shape {keys.shape}")
        if method in DRAWS:
            rows_g = rows_g[np.argsort(keys[rows_g], kind="stable")]
    as_given = len(rows_g) == len(G) and bool((rows_g == np.arange(len(G))).all())
    Gk = G if as_given else G[rows_g]
    Vk = V if dropped["targets"] == 0 else V[rows_v]
    if "subtasks" in params and params["subtasks"] is not None:
        params["subtasks"] = np.asarray(params["subtasks"])[rows_v]
    k = budget(len(Gk), k=k)
    checked = time.perf_counter() - t0
    try:
        sel = fn(Gk, Vk, k, seed=seed, **params)
    except ValueError as e:
        raise SelectError(f"{method}: {e}") from None
    t0 = time.perf_counter()
    center = sel.diagnostics["centered"] if method == "evoselect" else False
    near, cos = nearest_targets(Gk, Vk, sel.indices, center=center)
    sel.indices = rows_g[sel.indices]
    sel.explain["nearest_targets"] = rows_v[near]
    sel.explain["nearest_cos"] = cos
    if not as_given:
        for name, col in sel.scores.items():
            full = np.full(len(G), np.nan if col.dtype.kind == "f" else -1, col.dtype)
            full[rows_g] = col
            sel.scores[name] = full
    timing = sel.diagnostics.setdefault("timing", {})
    timing["checks"] = checked
    timing["explain"] = time.perf_counter() - t0
    sel.diagnostics.update(method=method, seed=seed, k=k, n=len(G), m=len(V), dropped=dropped,
                           params={n: v for n, v in params.items() if n != "subtasks"})
    sel.method = method
    return sel
