"""The features stage on Ray Data: pool file in, features folder out.

Plan of a run (``featurize``):

1. **Plan pass**: Ray Data tasks tokenize the pool (order preserved, so each candidate gets
   its row, its position in the file) and only each candidate's token count, content key and
   status reach the driver; the tokens are dropped.
2. **Check** on the driver: a candidate whose response does not fit ``max_length`` (the prompt is
   cut from the left first; see :mod:`evoray.data.tokenize`) fails the run naming its line/row,
   or with ``on_bad="skip"`` is left out and counted (log and ``meta.json``).
3. **Plan batches** on the driver (:mod:`evoray.features.plan`) from each candidate's token
   count and content key (a hash of its prompt and response,
   :func:`evoray.data.records.content_key`): candidates sorted by (length, key), cut into
   batches of ``batch_size``, rows inside a batch in the same order. Sorting by length keeps
   padding small; since the plan depends only on the records' content, never on their order in
   the file, their ids or their meta, a record is computed in the same batch, at the same place,
   with the same padding whatever the pool's order and the number of actors or blocks: its
   feature is byte-identical. (Records of identical content are interchangeable, so their ties
   need no other order.) Consecutive batches form *units* of about ``plan.UNIT_ROWS`` rows (at
   least 4 units per actor), the actors' unit of work.
4. **File the tokens**: a second pass tokenizes again, adds each row's unit from the plan (a
   Parquet file each worker process loads once, :func:`~evoray.features.plan.tokenize_assign`)
   and writes each row to Parquet under its unit (``write_parquet(partition_cols=["unit"])``)
   in the output's temporary folder, all in one fused task. Nothing of size N goes through the
   object store (a sort held every token there, the plan as task arguments was pinned, and an
   assigning actor let the tokens pile up before it: docs/algorithms.md §1).
5. **Extract**: ``map_batches(FeatureActor, compute=ActorPoolStrategy(size=n))`` over the
   unit numbers, each actor reading its unit's rows back, one planned
   batch a forward/backward, ``num_gpus`` and ``num_cpus`` per actor from the config, and
   ``memory`` estimated from the model's size, the projection cache and the largest planned
   batch (:func:`evoray.features.plan.actor_memory`). Each actor loads the model once.
6. **Write** Parquet under a temporary name, streamed: each actor writes the unit it finished
   as ``part-<first row>.parquet`` (:func:`~evoray.features.plan.write_block`) and only its
   summary reaches the driver, so no feature goes through the object store; then the token
   files are deleted, ``meta.json`` written, and the folder renamed to its final name.

If the output folder already holds features whose ``input_hash`` (pool bytes, model, adapter,
Adam state and every setting that changes a feature; :mod:`evoray.features.key`) matches, they
are reused and nothing runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from uuid import uuid4

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from evoray import __version__
from evoray.config import FeaturesConfig, config_to_dict
from evoray.data.features import META_FILE, features_table, read_features_meta
from evoray.data.io import detect_format
from evoray.errors import EvorayError, ModelError, RecordError
from evoray.features.key import FEATURES_VERSION, input_hash
from evoray.features.plan import (
    PASS_1,
    actor_request,
    batch_tokens,
    plan_batch,
    plan_batches,
    tokenize_assign,
    unit_batches,
    write_block,
    write_plan,
)
from evoray.ray_utils import unwrap_error
from evoray.storage import exists

log = logging.getLogger("evoray.features")

__all__ = ["featurize"]

STREAM_BLOCK = 4 << 20  # bytes: the largest block the stage's Ray Data operators make
PLAN_BLOCK = 256 << 10  # bytes: pass 1's blocks to the driver (about 5,900 candidates each)
TOKENS_DIR = "_tokens"  # pass 2's token files, inside the output's temporary folder
PLAN_FILE = "_plan-{}.parquet"  # the batch plan pass 2 files rows by (a run's own name), there too

class FeatureActor:
    """Ray Data actor: one :class:`FeatureExtractor` (model loaded once), one unit of whole
    planned batches a call, read by the actor from ``folder/unit=<u>/`` (read there, not by an
    upstream task, since Ray Data may split a task's output block, and with it a batch);
    writes the unit's rows in the features schema to ``out/part-<first row>.parquet``
    (:func:`~evoray.features.plan.write_block`) and returns their summary only, so no block of
    features goes through the object store (a retried unit rewrites the same file)."""

    def __init__(self, model: str, cfg: dict, adapter: str | None, adam_state: str | None,
                 cache_dir: str | None, pad_token_id: int, folder: str, out: str,
                 fs: pafs.FileSystem):
        import torch

        from evoray.features.extract import FeatureExtractor
        from evoray.models import load_model

        self.cfg = FeaturesConfig(**cfg)
        device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if device == "cpu":  # a fixed thread count, so kernels (and bits) do not vary by actor
            torch.set_num_threads(self.cfg.threads or max(1, round(self.cfg.num_cpus)))
        base, tok = load_model(model, cache_dir=cache_dir)
        self.extractor = FeatureExtractor(base, tok, self.cfg, adapter=adapter,
                                          adam_state=adam_state, device=device)
        self.pad, self.folder, self.out, self.fs = pad_token_id, folder, out, fs

    def __call__(self, units: dict) -> pa.Table:
        """Write the features of the rows of ``units["unit"]`` (one unit, as planned); return
        their summary (:func:`~evoray.features.plan.write_block`)."""
        import pyarrow.parquet as pq

        tables = []
        for u in units["unit"]:
            t = pq.read_table(f"{self.folder}/unit={u}", filesystem=self.fs)
            tables.append(self.features({k: t[k].to_numpy() for k in t.column_names}))
        return write_block(pa.concat_tables(tables), self.out, self.fs)

    def features(self, block: dict) -> pa.Table:
        """The features of a block's rows: whole planned batches, one forward/backward each,
        projected in passes of several batches (:meth:`FeatureExtractor.many`)."""
        if not len(block["batch"]):  # an empty block: nothing to compute
            dtype = np.float16 if self.cfg.dtype == "float16" else np.float32
            return self._table([], [], np.zeros((0, self.extractor.dim), dtype), [], [])
        order = np.argsort(block["batch"], kind="stable")  # one pass, not a mask per batch
        block = {k: v[order] for k, v in block.items()}
        cuts = np.flatnonzero(np.diff(block["batch"])) + 1
        groups = [self._batch({k: v[a:b] for k, v in block.items()})
                  for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
        results = self.extractor.many((batch, ids) for batch, ids, _ in groups)
        tables = []
        for (_, ids, rows), (feats, norms, losses) in zip(groups, results, strict=True):
            if self.cfg.dtype == "float16":
                feats = feats.astype(np.float16)
            tables.append(self._table(ids, rows, feats, norms, losses))
        return pa.concat_tables(tables)

    def _batch(self, group: dict):
        """One planned batch as model inputs: ``(batch, ids, rows)``."""
        import torch

        order = np.argsort(group["slot"], kind="stable")  # within-batch order fixed by content
        rows, ids = group["row"][order], group["id"][order]
        seqs = [np.asarray(group["input_ids"][i], np.int64) for i in order]
        n_ctx = group["n_context"][order]
        T = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        for n, s in enumerate(seqs):
            input_ids[n, :len(s)] = torch.from_numpy(s)
            mask[n, :len(s)] = 1
            labels[n, n_ctx[n]:len(s)] = torch.from_numpy(s[n_ctx[n]:])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}, ids, rows

    def _table(self, ids, rows, feats, norms, losses) -> pa.Table:
        table = features_table(ids, rows, feats, norms, losses)
        info = self.extractor.info()  # per-row copies of two numbers, summarised by the driver
        table = table.append_column("peak_mb", pa.array(
            np.full(len(ids), info["projection_peak_mb"], np.int32)))
        return table.append_column("a_skipped", pa.array(np.full(len(ids), info["a_skipped"])))


def featurize(pool_path: str, model_spec: str, adapter: str | None = None,
              cfg: FeaturesConfig | None = None, *, out: str | None = None,
              kind: str = "candidate", adam_state: str | None = None,
              cache_dir: str | None = None, progress: bool = False) -> str:
    """Compute the features of every candidate of ``pool_path`` on Ray Data.

    Args:
        pool_path: JSONL or Parquet records (candidates, or targets with ``kind="target"``).
        model_spec: base model (see :func:`evoray.models.load_model`).
        adapter: LoRA adapter folder for the proxy; None = a fresh LoRA.
        cfg: features settings (``batch_size`` must be an int: it is Ray's batch size).
        out: output folder (default: ``<pool without extension>.features``).
        kind: record kind of the file.
        adam_state: Adam moments (:func:`evoray.lora.save_adam_state`) to
            precondition with; refused for targets (docs/algorithms.md §1).
        cache_dir: model cache.
        progress: show Ray Data's progress bars.

    Returns:
        The features folder (see :mod:`evoray.data.features`).
    """
    import ray
    import ray.data

    from evoray.data.features import write_folder_atomically
    from evoray.data.io import read_dataset
    from evoray.features.extract import default_dim
    from evoray.models import load_tokenizer
    from evoray.ray_utils import init_ray

    cfg = cfg or FeaturesConfig()
    if adam_state and kind != "candidate":
        raise EvorayError("Adam preconditioning is for candidates only: target features use "
                          "plain gradients")
    fmt = detect_format(pool_path)
    if not exists(pool_path):
        raise RecordError(pool_path, "no such file")
    out = out or os.path.splitext(pool_path.rstrip("/"))[0] + ".features"
    dim = default_dim(cfg, "cuda" if cfg.num_gpus > 0 else "cpu")
    layers, shape = _proxy_shape(model_spec, cfg, adapter, cache_dir)  # fails fast on a bad model
    digest = input_hash(pool_path, model_spec, adapter, adam_state, cfg, dim)
    if read_features_meta(out).get("input_hash") == digest:
        log.info("features of %s reused from %s", pool_path, out)
        return out

    started = init_ray(quiet=not progress)
    t0 = time.perf_counter()
    total = ray.cluster_resources().get("CPU", 0)
    if cfg.num_actors * cfg.num_cpus > total - 1:  # an autoscaling cluster may still grow
        log.warning("features: %d actor(s) x %.1g CPU leave less than 1 of the cluster's %g "
                    "CPUs for Ray Data's read and write tasks, which then wait forever unless "
                    "the cluster grows; lower features.num_cpus (e.g. 0.5) or num_actors",
                    cfg.num_actors, cfg.num_cpus, total)
    ctx = ray.data.DataContext.get_current()
    # A UDF's own error (a RecordError naming file, line and field) instead of Ray Data's
    # UserCodeException, whose cause does not survive the trip back to the driver.
    raise_original = ctx.raise_original_map_exception
    ctx.raise_original_map_exception = True
    # Blocks of a bounded size (Ray Data's default is 128 MiB), so that a large pool streams
    # through the object store in many small blocks instead of a few that grow with it.
    block_bytes = ctx.target_max_block_size
    stream_block = min(block_bytes or STREAM_BLOCK, STREAM_BLOCK)
    ctx.target_max_block_size = stream_block
    try:
        preserve = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True
        # pass 1's output (about 45 bytes a candidate) leaves in small blocks: the one task
        # reading a JSONL file runs a few blocks ahead of the driver, so the store's peak is a
        # few blocks (2 MiB at 50k and 4 MiB at 200k candidates with 1 MiB blocks, 1 MiB at
        # both with these)
        ctx.target_max_block_size = min(ctx.target_max_block_size, PLAN_BLOCK)
        try:  # pass 1, streamed: each candidate's length, key and status; the tokens are dropped
            records = read_dataset(pool_path, kind, columns=["id", "prompt", "response"])
            plan_rows = records.map_batches(
                plan_batch, fn_kwargs={"model": model_spec, "max_length": cfg.max_length,
                                       "cache_dir": cache_dir},
                batch_size=256, batch_format="numpy")
            # streamed to the driver a block at a time: to_pandas() held every block in the
            # object store at once (about 60 bytes a candidate)
            parts = [{c: b.column(c).to_numpy(zero_copy_only=False).copy() for c in PASS_1}
                     for b in plan_rows.iter_batches(batch_size=None, batch_format="pyarrow")]
            plan = {c: np.concatenate([p[c] for p in parts]) if parts else np.empty(0)
                    for c in PASS_1}
            del parts
        except Exception as e:  # a bad record, found by the tasks that read it
            inner = unwrap_error(e)
            if isinstance(inner, EvorayError):
                raise inner from None
            raise
        finally:
            ctx.execution_options.preserve_order = preserve
            ctx.target_max_block_size = stream_block
        ids = plan["id"].astype(str)
        by_id = np.argsort(ids, kind="stable")
        in_order = ids[by_id]
        dup = np.flatnonzero(in_order[1:] == in_order[:-1])
        if len(dup):  # JSONL is checked per file; a Parquet folder's files only here
            r = int(by_id[dup + 1].min())  # the first row whose id came before
            raise RecordError(pool_path, f"duplicate id {str(ids[r])!r} (rows "
                              f"{int(np.flatnonzero(ids == ids[r])[0]) + 1} and "
                              f"{r + 1}); ids must be unique", field="id")
        bad = np.flatnonzero(plan["status"] != "")
        if len(bad) and cfg.on_bad == "error":
            r = int(bad[0])
            where = {"line": r + 1} if fmt == "jsonl" else {"row": r + 1}
            raise RecordError(pool_path, f"candidate {str(ids[r])!r}: {plan['status'][r]} "
                              f"({len(bad)} such candidate(s); features.on_bad=skip leaves "
                              f"them out)", field="response", **where)
        if len(bad):
            log.warning("features: %d candidate(s) skipped (response does not fit "
                        "max_length=%d)", len(bad), cfg.max_length)
        keep = np.flatnonzero(plan["status"] == "")
        batch_of = np.zeros(len(ids), np.int64)
        slot_of = np.zeros(len(ids), np.int64)
        lengths = plan["length"][keep]
        batch_of[keep], slot_of[keep] = plan_batches(lengths, plan["key"][keep],
                                                     cfg.batch_size)
        n_batches = max(1, -(-len(keep) // cfg.batch_size))
        per_unit = unit_batches(n_batches, cfg.batch_size, cfg.num_actors)
        n_units = -(-n_batches // per_unit)
        pad = load_tokenizer(model_spec, cache_dir=cache_dir).pad_token_id
        del plan

        # pass 2 tokenizes again (cheaper than keeping every token in the object store) and
        # files each row under its unit, a run of whole planned batches
        assignment = {"id": ids[by_id], "row": by_id.astype(np.int64), "batch": batch_of[by_id],
                      "slot": slot_of[by_id], "unit": (batch_of // per_unit)[by_id]}
        memory = actor_request(shape, dim, cfg, batch_tokens(lengths, batch_of[keep]),
                               per_unit * cfg.batch_size)  # rows: of a unit

        def fill(tmp: str, fs: pafs.FileSystem) -> None:
            # Streamed end to end (steps 4-6), in the output's own temporary folder (every node
            # of a cluster can read it): the object store holds blocks in flight, never the pool.
            scratch, plan_path = f"{tmp}/{TOKENS_DIR}", f"{tmp}/{PLAN_FILE.format(uuid4().hex)}"
            write_plan(plan_path, fs, assignment)
            read_dataset(pool_path, kind, columns=["id", "prompt", "response"]).map_batches(
                tokenize_assign, batch_size=256, batch_format="numpy",
                fn_kwargs={"model": model_spec, "max_length": cfg.max_length,
                           "cache_dir": cache_dir, "plan": plan_path, "fs": fs}
            ).write_parquet(scratch, filesystem=fs, partition_cols=["unit"])
            fs.delete_file(plan_path)
            units = ray.data.from_items([{"unit": u} for u in range(n_units)],
                                        override_num_blocks=n_units)
            feats = units.map_batches(
                FeatureActor, batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, memory=memory,
                fn_constructor_kwargs={"model": model_spec, "cfg": config_to_dict(cfg),
                                       "adapter": adapter, "adam_state": adam_state,
                                       "cache_dir": cache_dir, "pad_token_id": pad,
                                       "folder": scratch, "out": tmp, "fs": fs})
            stats = feats.to_pandas()
            fs.delete_dir(scratch)
            meta = {
                "model": model_spec, "adapter": adapter, "adam_state": adam_state,
                "kind": kind, "pool": pool_path, "input_hash": digest, "dim": dim,
                "seed": cfg.seed,
                "dtype": cfg.dtype, "evoray_version": __version__,
                "features_version": FEATURES_VERSION, "count": len(keep), "skipped": len(bad),
                "skipped_ids": [str(ids[i]) for i in bad[:100]],
                "settings": config_to_dict(cfg),
                "projection_peak_mb": int(stats["peak_mb"].max()) if len(stats) else 0,
                "a_skipped": bool(stats["a_skipped"].all()) if len(stats) else None,
                "layers": layers,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            with fs.open_output_stream(f"{tmp}/{META_FILE}") as f:
                f.write(json.dumps(meta, indent=2, sort_keys=True).encode())

        try:
            write_folder_atomically(out, fill)
        except Exception as e:  # Ray wraps a UDF's error: surface evoray's own message
            inner = unwrap_error(e)
            if isinstance(inner, EvorayError):
                raise inner from None
            raise
    finally:
        ctx.raise_original_map_exception = raise_original
        ctx.target_max_block_size = block_bytes
        if started:
            ray.shutdown()
    log.info("features of %d candidates written to %s in %.1f s", len(keep), out,
             time.perf_counter() - t0)
    return out


def _proxy_shape(model: str, cfg: FeaturesConfig, adapter: str | None,
                 cache_dir: str | None) -> tuple[list[str], dict]:
    """Names of the proxy's LoRA-adapted modules, and its size (``params``, ``lora_params``,
    ``vocab``: :func:`evoray.features.plan.actor_memory`), from an empty (meta-device) copy of
    the model."""
    import torch
    from peft import PeftConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from evoray.lora import check_adapter, localize, lora_config, lora_pairs
    from evoray.models import BUILTIN_MODELS, load_model, remote_code_allowed, smollm2_dir

    # the one-time GGUF conversion loads real weights, so it runs before the meta device is set
    source = str(smollm2_dir(cache_dir)) if model == "smollm2-135m" else model
    with torch.device("meta"):
        if model.startswith("tiny-"):
            base, _ = load_model(model)
        else:
            try:
                base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
                    os.path.expanduser(source), trust_remote_code=remote_code_allowed()))
            except (OSError, ValueError) as e:
                raise ModelError(f"model {model!r} could not be loaded ({str(e).splitlines()[0]})"
                                 f"; give a folder written by save_pretrained, a reachable hub "
                                 f"id, or one of {', '.join(BUILTIN_MODELS)}") from None
        config = lora_config(base, r=cfg.lora_r, alpha=cfg.lora_alpha,
                             target_modules=cfg.target_modules)
        if adapter:  # missing, or trained on another base: say so before any Ray work
            local, handle = localize(adapter)
            try:
                check_adapter(base, local, name=adapter, spec=model)
                config = PeftConfig.from_pretrained(local)
            finally:
                if handle is not None:
                    handle.cleanup()
        vocab = base.get_input_embeddings().num_embeddings
        params = sum(p.numel() for p in base.parameters())
        peft = get_peft_model(base, config)
        lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
        return ([p.name for p in lora_pairs(peft)],
                {"params": params, "lora_params": lora, "vocab": vocab})
