"""The features stage's batch plan: tokenized candidates, each with its token count and content
key, cut into batches by (length, key) so that a record's batch, and so its feature, depends on
the pool's content only (see :mod:`evoray.features.stage`)."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from evoray.errors import EvorayError

__all__ = ["plan_batches", "tokenize_batch", "assign_batch"]


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, cache_dir: str | None):
    from evoray.models import load_tokenizer

    return load_tokenizer(model, cache_dir=cache_dir)


def tokenize_batch(batch: dict, model: str, max_length: int, cache_dir: str | None) -> pa.Table:
    """Ray Data UDF: ``(id, prompt, response)`` → ``(id, input_ids, n_context, length, key,
    status)``; ``key`` is the content key, ``status`` is empty, or why the candidate cannot be
    used."""
    from evoray.data.records import content_key
    from evoray.data.tokenize import encode_pair, special_prefix

    tok = _tokenizer(model, cache_dir)
    prefix = special_prefix(tok)
    ids, toks, n_ctx, status, keys = [], [], [], [], []
    for i, p, r in zip(batch["id"], batch["prompt"], batch["response"], strict=True):
        ids.append(str(i))
        keys.append(content_key(p, r))
        try:
            e = encode_pair(tok, p, r, max_length, prefix=prefix)
        except EvorayError as err:
            toks.append([])
            n_ctx.append(0)
            status.append(str(err))
            continue
        toks.append(e.input_ids)
        n_ctx.append(len(e.input_ids) - e.n_response_tokens)
        status.append("" if e.n_response_tokens else "the response is empty after tokenization")
    return pa.table({"id": ids, "input_ids": pa.array(toks, pa.list_(pa.int32())),
                     "n_context": pa.array(n_ctx, pa.int32()),
                     "length": pa.array([len(t) for t in toks], pa.int32()),
                     "key": pa.array(keys, pa.uint64()), "status": status})


def plan_batches(lengths: np.ndarray, keys: np.ndarray,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch plan of candidates with token counts ``lengths`` and content keys ``keys``.

    Returns ``(batch, slot)`` per candidate: its batch number, and its place in the order
    (length, key) that the batches are cut from (rows inside a batch run in slot order). Both
    depend on the multiset of (length, key) only, so a permuted pool gets the permuted plan.
    """
    lengths, keys = np.asarray(lengths), np.asarray(keys, np.uint64)
    order = np.lexsort((keys, lengths))
    slot = np.empty(len(order), np.int64)
    slot[order] = np.arange(len(order))
    return slot // batch_size, slot


def assign_batch(batch: dict, sorted_ids: np.ndarray, rows: np.ndarray, batches: np.ndarray,
                 slots: np.ndarray) -> dict:
    """Ray Data UDF: add ``row``, ``batch`` and ``slot`` from the driver's plan (by id)."""
    ids = batch["id"].astype(str)
    pos = np.searchsorted(sorted_ids, ids)
    return {"id": ids, "input_ids": batch["input_ids"], "n_context": batch["n_context"],
            "row": rows[pos], "batch": batches[pos], "slot": slots[pos]}
