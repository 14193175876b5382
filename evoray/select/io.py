"""Selection outputs: ``selected.parquet``, ``summary.json`` and the selected pool records."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from evoray.data.io import detect_format, parse_jsonl, write_records
from evoray.data.records import content_key, validate_records
from evoray.errors import RecordError, SelectError
from evoray.select.selection import Selection
from evoray.storage import atomic_write_bytes, read_bytes

__all__ = ["selection_table", "write_selection", "join_pool", "pool_records", "content_keys",
           "select_features", "select_files", "select_pool", "write_scores"]

log = logging.getLogger(__name__)


def selection_table(sel: Selection, ids: np.ndarray, target_ids: np.ndarray) -> pa.Table:
    """One row per selected candidate, in rank order: ``id``, ``rank`` (1 = best), ``count``,
    ``alignment``, ``novelty``, the method's other per-pick terms, ``nearest_targets`` (3 target
    ids) and ``nearest_cos`` (when the selection read features), then the method's
    per-candidate scores of the selected rows."""
    cols: dict[str, pa.Array] = {
        "id": pa.array(np.asarray(ids)[sel.indices].astype(str), pa.string()),
        "rank": pa.array(np.arange(1, len(sel) + 1, dtype=np.int64)),
    }
    ex = sel.explain
    for name, col in ex.items():
        if name in ("nearest_targets", "nearest_cos"):
            continue
        cols[name] = pa.array(np.asarray(col))
    if "nearest_targets" in ex:  # absent when no features were read (select_pool)
        near = np.asarray(target_ids)[ex["nearest_targets"]].astype(str)
        cols["nearest_targets"] = pa.array(near.tolist(), pa.list_(pa.string()))
        cols["nearest_cos"] = pa.array(ex["nearest_cos"].astype(np.float32).tolist(),
                                       pa.list_(pa.float32()))
    for name, col in sel.scores.items():
        if name not in cols:
            cols[name] = pa.array(np.asarray(col)[sel.indices])
    return pa.table(cols)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write_selection(out: str, sel: Selection, ids: np.ndarray, target_ids: np.ndarray,
                    extra: dict | None = None) -> dict:
    """Write ``OUT/selected.parquet`` and ``OUT/summary.json`` (each atomically); return the
    summary."""
    buf = io.BytesIO()
    pq.write_table(selection_table(sel, ids, target_ids), buf)
    atomic_write_bytes(f"{out}/selected.parquet", buf.getvalue())
    summary = {"method": sel.method, "selected": len(sel),
               "draws": int(sel.explain["count"].sum()), **(extra or {}),
               "diagnostics": sel.diagnostics}
    atomic_write_bytes(f"{out}/summary.json",
                       json.dumps(_jsonable(summary), indent=2).encode())
    return summary


def _pool_rows(path: str, wanted: set[str]) -> tuple[dict[str, dict], dict[str, int]]:
    """The pool records whose id is in ``wanted``, and the content key of every pool id."""
    fmt = detect_format(path)
    found: dict[str, dict] = {}
    keys: dict[str, int] = {}
    if fmt == "jsonl":
        for rec in parse_jsonl(path, read_bytes(path))[0]:
            if not isinstance(rec, dict):
                continue  # a line that is not an object has no id: it cannot be selected
            rid = str(rec.get("id"))
            keys[rid] = content_key(rec.get("prompt"), rec.get("response"))
            if rid in wanted:
                found[rid] = rec
        return found, keys
    table = pq.read_table(path)
    if "id" not in table.column_names:
        raise RecordError(path, "missing column", field="id")
    id_col = pc.cast(table["id"], pa.string())
    content = table.select([c for c in ("prompt", "response") if c in table.column_names])
    for rid, body in zip(id_col.to_pylist(), content.to_pylist(), strict=True):
        keys[rid] = content_key(body.get("prompt"), body.get("response"))
    keep = table.filter(pc.is_in(id_col, value_set=pa.array(sorted(wanted), pa.string())))
    for rec in keep.to_pylist():
        if isinstance(rec.get("meta"), str):
            rec["meta"] = json.loads(rec["meta"])
        rec = {key: value for key, value in rec.items() if value is not None}
        found[str(rec["id"])] = rec
    return found, keys


def _check_ids(pool: str, ids: np.ndarray, pool_ids) -> None:
    missing = [i for i in map(str, ids) if i not in pool_ids]
    if missing:
        raise SelectError(f"{pool}: {len(missing)} feature ids are not in the pool (first: "
                          f"{', '.join(repr(m) for m in missing[:3])}); features and pool must "
                          "come from the same candidates")


def content_keys(pool: str, ids: np.ndarray) -> np.ndarray:
    """(N,) uint64 content keys (a hash of prompt and response) of the pool records with the
    feature ids ``ids``, for :func:`evoray.select.select`'s ``keys``: with them a seeded selector
    picks the same records whatever the order of the pool, its ids and its meta.

    Raises:
        SelectError: when feature ids are missing from the pool (names the first few).
    """
    _, keys = _pool_rows(pool, set())
    _check_ids(pool, ids, keys)
    return np.array([keys[str(i)] for i in ids], np.uint64)


def pool_records(pool: str, sel: Selection, ids: np.ndarray,
                 n_features: int | None = None) -> list[dict]:
    """The selected candidate records of ``pool``, validated, in rank order.

    ``n_features``: the number of candidates with features when ``ids`` holds only some of them
    (the sharded backend passes the picks' ids).

    Raises:
        SelectError: when feature ids are missing from the pool (names the first few). Pool
            records without features are reported with a warning (they could not be selected).
    """
    chosen = [str(x) for x in np.asarray(ids)[sel.indices]]
    found, all_ids = _pool_rows(pool, set(chosen))
    _check_ids(pool, ids, all_ids)
    extra = len(all_ids) - (len(ids) if n_features is None else n_features)
    if extra > 0:
        log.warning("%d pool records have no features and could not be selected", extra)
    return validate_records([found[i] for i in chosen], "candidate", path=pool, unit="row")


def join_pool(pool: str, out: str, sel: Selection, ids: np.ndarray) -> int:
    """Write the selected candidate records, in rank order, to ``OUT/selected.jsonl``."""
    records = pool_records(pool, sel, ids)
    write_records(records, f"{out}/selected.jsonl", "candidate")
    return len(records)


def write_scores(out: str, sel: Selection, ids: np.ndarray) -> None:
    """Write ``OUT/scores.parquet``: one row per candidate, ``id``, ``selected`` and every
    per-candidate score of the selector (for reports: selected against rejected)."""
    ids = np.asarray(ids).astype(str)
    chosen = np.zeros(len(ids), bool)
    chosen[sel.indices] = True
    cols = {"id": pa.array(ids.tolist(), pa.string()), "selected": pa.array(chosen)}
    for name, col in sel.scores.items():
        col = np.asarray(col)
        if col.ndim == 1 and len(col) == len(ids) and np.issubdtype(col.dtype, np.number):
            cols[name] = pa.array(col.astype(np.float64))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    atomic_write_bytes(f"{out}/scores.parquet", buf.getvalue())


def select_features(cfg, feats, tfeats, keys=None) -> tuple[int, Selection]:
    """Select with ``cfg`` (a :class:`evoray.config.SelectConfig`) among the candidate
    :class:`evoray.data.features.Features` ``feats`` for the targets ``tfeats``; ``keys`` are the
    candidates' content keys (:func:`content_keys`), or None to draw over the rows as given.

    Returns:
        ``(k, selection)``: the budget and the :class:`Selection` (rows of ``feats``).
    """
    from evoray.select.api import budget, select

    params = cfg.method_params()
    k = budget(len(feats), k=cfg.k, ratio=cfg.ratio)
    return k, select(feats.X, tfeats.X, k, method=cfg.method, seed=cfg.seed, ids=feats.ids,
                     target_ids=tfeats.ids, keys=keys, **params)


def select_files(cfg, features: str, targets: str, out: str, *, pool: str | None = None,
                 dtype: str | None = None, extra: dict | None = None):
    """Read features, select with ``cfg`` (a :class:`evoray.config.SelectConfig`) and write the
    selection folder ``out`` (``selected.parquet``, ``summary.json``, ``scores.parquet`` and,
    with ``pool``, ``selected.jsonl``). Returns ``(summary, selection, candidate features)``.

    With ``pool``, the seeded selectors draw over the candidates in the order of their content
    (:func:`content_keys`), so the selected records depend on the pool's content only, never on
    its order, ids or meta. Without it they draw over the rows of the feature files.

    ``cfg.backend == "sharded"``: :func:`evoray.select.sharded.select_sharded` (the third value
    is then the sharded pool, whose ``len`` is the number of candidates)."""
    import time

    from evoray.data.features import read_features

    if getattr(cfg, "backend", "local") == "sharded":
        from evoray.select.sharded import select_sharded

        return select_sharded(cfg, features, targets, out, pool=pool, dtype=dtype, extra=extra)
    t0 = time.perf_counter()
    feats = read_features(features, dtype=dtype)
    tfeats = read_features(targets, dtype=dtype)
    keys = content_keys(pool, feats.ids) if pool else None
    read_s = time.perf_counter() - t0
    k, sel = select_features(cfg, feats, tfeats, keys)
    # Every input is read and checked before the first write; summary.json is written last, so
    # a folder without it is an unfinished one.
    records = pool_records(pool, sel, feats.ids) if pool else None
    write_scores(out, sel, feats.ids)
    if records is not None:
        write_records(records, f"{out}/selected.jsonl", "candidate")
        extra = {**(extra or {}), "records": len(records)}
    summary = write_selection(out, sel, feats.ids, tfeats.ids, extra={
        "features": features, "targets": targets, "k": k, "ratio": cfg.ratio, "seed": cfg.seed,
        "read_s": read_s, **(extra or {})})
    return summary, sel, feats


def select_pool(cfg, pool: str, out: str) -> tuple[dict, Selection]:
    """Select with a method that reads no features (:data:`evoray.select.api.FEATURE_FREE`:
    random) straight from the candidate records in ``pool``, and write the folder ``out`` as
    :func:`select_files` does (``nearest_targets`` left out). The draw is the one
    :func:`select_files` makes over the same candidates in content-key order, so random picks
    the same records with features or without, unless the features stage skipped candidates
    (a response longer than ``features.max_length``), which only this path can pick.

    Raises:
        SelectError: a method that needs features, an empty pool, or a budget outside it.
    """
    from evoray.select.api import FEATURE_FREE, budget
    from evoray.select.baselines import random

    if cfg.method not in FEATURE_FREE:
        raise SelectError(f"{cfg.method} reads gradient features; only "
                          f"{', '.join(FEATURE_FREE)} selects from the pool file alone")
    _, keys = _pool_rows(pool, set())
    if not keys:
        raise SelectError(f"{pool}: the pool holds no candidate")
    ids = np.array(list(keys), dtype=object)
    order = np.argsort(np.fromiter(keys.values(), np.uint64, len(keys)), kind="stable")
    k = budget(len(ids), k=cfg.k, ratio=cfg.ratio)
    sel = random(np.empty((len(ids), 0), np.float32), None, k, seed=cfg.seed)
    sel.indices = order[sel.indices]
    sel.diagnostics.update(method=cfg.method, seed=cfg.seed, k=k, n=len(ids), m=0, params={})
    records = pool_records(pool, sel, ids)
    write_scores(out, sel, ids)
    write_records(records, f"{out}/selected.jsonl", "candidate")
    summary = write_selection(out, sel, ids, np.array([], object), extra={
        "features": None, "pool": pool, "k": k, "ratio": cfg.ratio, "seed": cfg.seed,
        "records": len(records)})
    return summary, sel
