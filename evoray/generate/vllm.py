"""The ``vllm`` generator: the ``hf`` generator's few-shot sampling through ``ray.data.llm``.

For GPU clusters (``pip install "evoray[vllm]"``). Same prompts, parser and pool file as
:mod:`evoray.generate.hf` (see :mod:`evoray.generate.fewshot`); the model runs in vLLM engines
that Ray Data schedules (``ray.data.llm.build_processor`` with a
``vLLMEngineProcessorConfig``):

1. :func:`preprocess` (per row): the few-shot ``prompt`` plus ``sampling_params``
   (``temperature``, ``top_p``, ``max_tokens``, a per-row ``seed`` from
   :func:`~evoray.generate.fewshot.row_seed`, ``stop=["\\n###"]`` kept in the output), and
   ``model`` set to the adapter when the run's model is being trained (a vLLM LoRA request).
2. The vLLM engine stage alone: the prompts are plain completion text, so the chat-template,
   tokenize and detokenize stages are off (the engine tokenizes and detokenizes itself, which
   stop strings need).
3. :func:`postprocess` (per row): ``row``, the generated ``text`` and whether it ended by
   itself (``complete``); the driver parses and writes as the ``hf`` generator does.

Settings: ``generate.batch_size`` is the processor's batch size, ``num_actors`` its
``concurrency`` (engine replicas, one GPU each unless ``engine_kwargs`` asks for tensor
parallelism); ``num_gpus``/``num_cpus`` are not used (vLLM places its own workers).
``engine_kwargs`` go to the engine last, over evoray's (``enable_lora``/``max_lora_rank`` when an
adapter is used). vLLM seeds each request, but GPU kernels are not bit-reproducible: the same
seed gives the same pool only up to that.

Models: a local folder or hub id; ``smollm2-135m`` is resolved to its converted folder
(:func:`evoray.models.smollm2_dir`); the ``tiny-*`` test models exist only in memory and are
refused. Adapters: a local folder is sent as is (every engine's node must see that path); a URI
``s3://.../name`` is loaded by Ray through ``dynamic_lora_loading_path`` (its parent) and the
LoRA name ``name``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

from evoray.config import GenerateConfig
from evoray.errors import EvorayError
from evoray.generate import RoundContext
from evoray.generate.fewshot import END, GenerateError, round_prompts, row_seed, write_pool

__all__ = ["VLLMGenerator", "processor_config", "preprocess", "postprocess", "resolve_model",
           "lora_request"]


_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def resolve_model(model: str, cache_dir: str | None = None) -> str:
    """The ``model_source`` vLLM loads for evoray model spec ``model``."""
    if model.startswith("tiny-"):
        raise GenerateError(f"generate (vllm): model {model!r} is an in-memory test model that "
                            f"vLLM cannot load; give a saved model folder, a hub id or "
                            f"'smollm2-135m', or use generate.kind=hf")
    if model == "smollm2-135m":
        from evoray.models import smollm2_dir

        return str(smollm2_dir(cache_dir))
    path = os.path.expanduser(model)
    return path if os.path.isdir(path) else model


def lora_request(adapter: str) -> tuple[str, str | None]:
    """``(name, dynamic_lora_loading_path)`` for an adapter folder or URI: a local folder is its
    own name (no loading path); ``s3://bucket/run/adapter`` is ``("adapter", "s3://bucket/run")``."""
    if "://" in adapter:
        parent, _, name = adapter.rstrip("/").rpartition("/")
        return name, parent
    return os.path.abspath(os.path.expanduser(adapter)), None


def _lora_rank(adapter: str) -> int | None:
    path = os.path.join(os.path.expanduser(adapter), "adapter_config.json")
    if "://" in adapter or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("r")


def processor_config(cfg: GenerateConfig, model: str, *, adapter: str | None = None):
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` of a round (vLLM need not be installed
    to build it).

    Args:
        cfg: generation settings.
        model: the resolved model source (:func:`resolve_model`).
        adapter: LoRA adapter folder or URI sent with every request, or None.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    engine: dict = {}
    loading_path = None
    if adapter:
        engine["enable_lora"] = True
        rank = _lora_rank(adapter)
        if rank:  # vLLM accepts only some ranks: the smallest that fits
            engine["max_lora_rank"] = next((v for v in _LORA_RANKS if v >= rank), rank)
        loading_path = lora_request(adapter)[1]
    engine.update(cfg.engine_kwargs)
    return vLLMEngineProcessorConfig(
        model_source=model, batch_size=cfg.batch_size, concurrency=cfg.num_actors,
        engine_kwargs=engine, dynamic_lora_loading_path=loading_path,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        log_engine_metrics=False)


def preprocess(row: dict, *, seed: int, max_tokens: int, temperature: float, top_p: float,
               lora: str | None = None) -> dict:
    """Ray Data row function: ``{row, prompt}`` → the engine's input (see the module docstring)."""
    out = {"row": int(row["row"]), "prompt": str(row["prompt"]),
           "sampling_params": {"temperature": float(temperature), "top_p": float(top_p),
                               "max_tokens": int(max_tokens),
                               "seed": row_seed(seed, int(row["row"])), "stop": [END],
                               "include_stop_str_in_output": True}}
    if lora:
        out["model"] = lora
    return out


def postprocess(row: dict, *, max_tokens: int) -> dict:
    """Ray Data row function: the engine's output → ``{row, text, complete}``; ``complete`` when
    the text reached the stop string or EOS came before ``max_tokens`` tokens."""
    text = str(row.get("generated_text") or "")
    n = int(row.get("num_generated_tokens") or 0)
    return {"row": int(row["row"]), "text": text, "complete": END in text or n < max_tokens}


class VLLMGenerator:
    """Few-shot generation with vLLM engines on Ray Data (``ray.data.llm``).

    Ray must be running (:func:`evoray.ray_utils.init_ray`); the caller shuts it down.
    """

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg

    def generate(self, ctx: RoundContext, out: str) -> dict:
        """Sample ``pool_size`` generations with vLLM and write the parsed candidates to ``out``.

        Returns:
            ``{"n", "dropped", "generations", "unparsable", "copies"}`` (see
            :func:`evoray.generate.fewshot.write_pool`).

        Raises:
            GenerateError: vLLM is not installed, Ray is not running, the model is a ``tiny-*``
                test model, or no generation parsed.
        """
        if importlib.util.find_spec("vllm") is None:
            raise GenerateError("generate.kind=vllm needs vLLM: pip install 'evoray[vllm]' "
                                "(GPU machines), or use generate.kind=hf")
        import ray
        import ray.data
        from ray.data.llm import build_processor

        from evoray.ray_utils import unwrap_error

        cfg = self.cfg
        if not ray.is_initialized():
            raise GenerateError("generate (vllm): Ray is not running; call "
                                "evoray.ray_utils.init_ray() first")
        spec = cfg.model or ctx.model
        adapter = None if cfg.model else ctx.adapter
        prompts, plan = round_prompts(ctx.targets, cfg.shots, cfg.pool_size, ctx.seed)
        processor = build_processor(
            processor_config(cfg, resolve_model(spec, ctx.cache_dir), adapter=adapter),
            preprocess=functools.partial(
                preprocess, seed=ctx.seed, max_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p,
                lora=lora_request(adapter)[0] if adapter else None),
            postprocess=functools.partial(postprocess, max_tokens=cfg.max_new_tokens))
        ds = ray.data.from_items([{"row": i, "prompt": p} for i, p in enumerate(prompts)])
        try:
            rows = sorted(processor(ds).take_all(), key=lambda r: int(r["row"]))
        except Exception as e:  # Ray wraps a stage's error: surface evoray's own message
            inner = unwrap_error(e)
            if isinstance(inner, EvorayError):
                raise inner from None
            raise
        if [int(r["row"]) for r in rows] != list(range(len(prompts))):
            raise GenerateError(f"generate (vllm): {len(rows)} generations came back for "
                                f"{len(prompts)} prompts")
        return write_pool([{"text": str(r["text"]), "complete": bool(r["complete"])}
                           for r in rows], targets=ctx.targets, plan=plan, round=ctx.round,
                          kind="vllm", model=spec, out=out,
                          meta={"adapter": adapter} if adapter else None)
