"""The features stage's batch plan: tokenized candidates, each with its token count and content
key, cut into batches by (length, key) so that a record's batch, and so its feature, depends on
the pool's content only (see :mod:`evoray.features.stage`)."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from evoray.errors import EvorayError

__all__ = ["AssignBatch", "PLAN_COLUMNS", "UNIT_ROWS", "actor_memory", "batch_tokens",
           "plan_batches", "tokenize_batch", "unit_batches", "write_block", "write_plan"]


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


PLAN_COLUMNS = ("id", "row", "batch", "slot", "unit")
UNIT_ROWS = 4096  # rows of a unit of work: 16 MiB of float32 features at dim 1024


def unit_batches(n_batches: int, batch_size: int, num_actors: int) -> int:
    """Planned batches per unit, the actors' unit of work: about ``UNIT_ROWS`` rows (a block
    in flight stays the same size whatever the pool's size), fewer when that would leave
    fewer than 4 units per actor (every actor gets work; a restarted actor redoes one unit)."""
    return max(1, min(-(-n_batches // (4 * num_actors)), UNIT_ROWS // batch_size))


def write_block(block: pa.Table, folder: str, fs) -> pa.Table:
    """Write one block of the actors' output to ``folder/part-<first row>.parquet`` (the
    features columns) and return its summary: one row of ``peak_mb`` (max) and ``a_skipped``
    (all); none for an empty block."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if block.num_rows == 0:
        return pa.table({"peak_mb": pa.array([], pa.int32()),
                         "a_skipped": pa.array([], pa.bool_())})
    first = pc.min(block["row"]).as_py()
    pq.write_table(block.drop_columns(["peak_mb", "a_skipped"]),
                   f"{folder}/part-{first:012d}.parquet", filesystem=fs)
    return pa.table({"peak_mb": [pc.max(block["peak_mb"]).as_py()],
                     "a_skipped": [pc.all(block["a_skipped"]).as_py()]})


def write_plan(path: str, fs, plan: dict) -> None:
    """Write the plan (:data:`PLAN_COLUMNS`, rows sorted by ``id``) to a Parquet file that
    :class:`AssignBatch` loads."""
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: plan[c] for c in PLAN_COLUMNS}), path, filesystem=fs)


class AssignBatch:
    """Ray Data UDF (an actor; pyarrow batches, so that ``input_ids`` stays a plain list column
    in the Parquet files it goes to): add ``row``, ``batch``, ``slot`` and ``unit`` from the
    driver's plan (by id), loaded once from :func:`write_plan`'s file. The plan is O(N): held
    in the actor's memory, not passed as task arguments, which the object store pins while the
    pass runs (6.3 MiB at 50k candidates: the store's peak then grew with the pool, 20 / 28 /
    32 MiB at 50k / 100k / 200k)."""

    def __init__(self, path: str, fs):
        import pyarrow.parquet as pq

        t = pq.read_table(path, filesystem=fs)
        self.ids = np.asarray(t["id"].to_pylist(), dtype=str)
        self.cols = {c: t[c].to_numpy() for c in PLAN_COLUMNS[1:]}

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = np.asarray(batch["id"].to_pylist(), dtype=str)
        pos = np.searchsorted(self.ids, ids)
        return pa.table({"id": ids, "input_ids": batch["input_ids"],
                         "n_context": batch["n_context"],
                         **{c: x[pos] for c, x in self.cols.items()}})


def batch_tokens(lengths: np.ndarray, batches: np.ndarray) -> int:
    """The most token slots one planned batch takes: its row count times its longest row (rows
    are padded to it)."""
    if not len(lengths):
        return 0
    n = np.bincount(batches)
    longest = np.zeros(len(n), np.int64)
    np.maximum.at(longest, batches, lengths)
    return int((n * longest).max())


def actor_memory(shape: dict, dim: int, *, on_gpu: bool, proj_cache_mb: float,
                 proj_block_mb: float, tokens: int, rows: int, batch_size: int,
                 proj_batch_mb: float = 0.0) -> int:
    """Bytes of host memory to declare to Ray as a feature actor's ``memory`` (a reservation the
    scheduler counts, not a limit): 1.25 times the expected peak, the headroom by which Ray Data
    judges a declaration (below it, it warns every 30 s while the actor runs, and at the end).

    ``shape`` has the proxy's ``params``, ``lora_params`` and ``vocab``; ``tokens`` is the
    largest planned batch's padded token slots, ``rows`` the rows of one block. The peak: 1.25
    GiB for the worker process (Python, torch, Ray, tokenizer), the float32 weights, and on CPU the
    cached projection blocks (``4 · lora_params · dim`` bytes, at most ``proj_cache_mb``) plus
    one block, the per-sample LoRA gradients of a projection pass (``4 · lora_params`` a row,
    at most ``proj_batch_mb`` in all but at least a batch), its
    activations kept for the backward (``12 · vocab`` bytes a token slot: sized for the full
    logits with their log-softmax and gradient, which the gradients no longer compute since
    :func:`evoray.models.response_logits` asks for response positions only; the term, kept
    because the peaks below were measured against it, now also covers the layers'
    activations, about 1 MB a slot for SmolLM2's 30 layers), and 100 KB a
    row of the block (found, not derived: the actor's memory grows
    with the rows of a block far beyond their features' bytes). On a GPU the projection and the
    activations live on the device. Peaks measured by Ray Data (2 cores, dim 1024; SmolLM2-135M
    with r 8 on 4 projections): SmolLM2 on 400 lookup candidates, 112 rows a block, 3.6 GiB
    (this declares 5.5 GiB); SmolLM2 in ``evoray demo`` (584 arithmetic candidates), 4.0 GiB
    in round 1 and 4.2 GiB in round 2, whose proxy is the trained round-1 adapter (gradients of
    both A and B; a fresh LoRA's A gradients are zero and skipped): a process share of 0.6 GiB
    and no gradient term declared 4.6 and 4.5 GiB there, short of Ray Data's 4.9 and 5.2; this
    declares about 5.5 and 5.4; tiny-llama on 100,000 candidates, 2 actors, 12,512 rows a block,
    1.7 GiB (this declares 3.1 GiB). The last two are computed, not yet rerun."""
    gib, mib = 2 ** 30, 2 ** 20
    peak = 1.25 * gib + 4 * shape["params"] + 100_000 * rows
    if not on_gpu:
        peak += min(proj_cache_mb * mib, 4 * shape["lora_params"] * dim) + proj_block_mb * mib
        held = max(4 * shape["lora_params"] * batch_size, min(proj_batch_mb * mib,
                   4 * shape["lora_params"] * max(batch_size, rows)))
        peak += 12 * shape["vocab"] * tokens + held
    return int(1.25 * peak)
