"""The features stage's batch plan: tokenized candidates, each with its token count and content
key, cut into batches by (length, key) so that a record's batch, and so its feature, depends on
the pool's content only (see :mod:`evoray.features.stage`)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evoray.errors import EvorayError

if TYPE_CHECKING:
    from evoray.config import FeaturesConfig

log = logging.getLogger("evoray.features")

__all__ = ["PASS_1", "PLAN_COLUMNS", "UNIT_ROWS", "actor_memory", "actor_request",
           "batch_tokens", "plan_batch", "plan_batches", "tokenize_assign", "tokenize_batch",
           "unit_batches", "write_block", "write_plan"]


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


PASS_1 = ("id", "length", "key", "status")  # the columns the plan pass brings to the driver


def plan_batch(batch: dict, model: str, max_length: int, cache_dir: str | None) -> pa.Table:
    """Ray Data UDF of pass 1: :func:`tokenize_batch`'s :data:`PASS_1` columns (the tokens are
    dropped). Selected here, not by ``Dataset.select_columns``: Ray Data 2.60 fuses that into
    the task as a step without block shaping, which joins the task's whole output (one JSONL
    file) into one block: the object store then held 45 bytes a candidate at once (2 / 4 / 8
    MiB at 50k / 100k / 200k)."""
    return tokenize_batch(batch, model, max_length, cache_dir).select(list(PASS_1))


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
    """Write a feature actor's rows of one unit to ``folder/part-<first row>.parquet`` (the
    features columns) and return their summary: one row of ``peak_mb`` (max) and
    ``a_skipped`` (all); none for an empty block."""
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
    :func:`tokenize_assign` loads. Give each run's plan a path of its own: a worker process
    keeps the last plan it loaded, by path."""
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: plan[c] for c in PLAN_COLUMNS}), path, filesystem=fs)


# the plan this worker process loaded last: {"path", "ids", "cols"} (not functools.lru_cache:
# a pyarrow FileSystem argument is unhashable)
_PLAN: dict = {}


def _load_plan(path: str, fs) -> dict:
    if _PLAN.get("path") != path:
        import pyarrow.parquet as pq

        t = pq.read_table(path, filesystem=fs)
        _PLAN.clear()  # every value is below N: int32 halves the plan's memory
        narrow = np.int32 if t.num_rows < 2**31 else np.int64
        _PLAN.update(path=path, ids=_utf8(t["id"]),
                     cols={c: t[c].to_numpy().astype(narrow) for c in PLAN_COLUMNS[1:]})
    return _PLAN


def _utf8(ids: pa.Array) -> np.ndarray:
    """Ids as fixed-width UTF-8 bytes (``S``; numpy's ``str`` takes 4 bytes a character), which
    sort in the same order as the driver's ``str`` ids (UTF-8 keeps code-point order)."""
    return np.asarray(ids.cast(pa.binary()).to_numpy(zero_copy_only=False), dtype=bytes)


def tokenize_assign(batch: dict, model: str, max_length: int, cache_dir: str | None,
                    plan: str, fs) -> pa.Table:
    """Ray Data UDF of pass 2: :func:`tokenize_batch`, less the candidates that cannot be
    used, plus each row's ``row``, ``batch``, ``slot`` and ``unit`` from the driver's plan (by
    id; the :func:`write_plan` file at ``plan``, loaded once per worker process).

    One task reads, tokenizes, assigns and writes (Ray Data fuses them), so no block waits in
    the object store between two operators. Measured (``benchmarks/scale.py``, tiny-llama, 2
    CPUs): an assigning actor after the tokenizing tasks let the tasks run ahead, and the store
    held nearly every token of the pool (16 / 32 / 67 MiB at 50k / 100k / 200k). Each worker
    process holds the plan, O(N): 16 bytes a candidate plus its id's UTF-8 bytes (padded to the
    longest id), until it loads another run's plan."""
    t = tokenize_batch(batch, model, max_length, cache_dir)
    t = t.filter(pc.equal(t["status"], ""))
    p = _load_plan(plan, fs)
    ids = _utf8(t["id"])
    pos = np.minimum(np.searchsorted(p["ids"], ids), max(len(p["ids"]) - 1, 0))
    if len(ids) and not np.array_equal(p["ids"][pos], ids):
        new = ids[p["ids"][pos] != ids][0].decode()
        raise EvorayError(f"candidate {new!r} was not in the pool when the features stage read "
                          f"it first: was the file changed?")
    return pa.table({"id": t["id"], "input_ids": t["input_ids"], "n_context": t["n_context"],
                     **{c: x[pos] for c, x in p["cols"].items()}})


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


def actor_request(shape: dict, dim: int, cfg: FeaturesConfig, tokens: int, rows: int) -> int:
    """The feature actor's ``memory`` request (:func:`actor_memory`), at most the cluster's
    memory shared by the actors, so that the request never keeps them from being scheduled."""
    import ray

    want = actor_memory(shape, dim, on_gpu=cfg.num_gpus > 0, proj_cache_mb=cfg.proj_cache_mb,
                        proj_block_mb=cfg.proj_block_mb, tokens=tokens, rows=rows,
                        batch_size=cfg.batch_size, proj_batch_mb=cfg.proj_batch_mb)
    have = ray.cluster_resources().get("memory", 0) / cfg.num_actors
    if have and want > have:
        log.warning("features: each of %d actor(s) may use about %.1f GiB; the cluster has "
                    "%.1f GiB of memory for each; lower features.proj_cache_mb, batch_size or "
                    "num_actors if an actor is killed for memory", cfg.num_actors, want / 2**30,
                    have / 2**30)
        want = int(have)
    return want
