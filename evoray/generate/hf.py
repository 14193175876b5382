"""The ``hf`` generator: a local transformers model samples candidates on Ray Data actors.

Plan of a round (:meth:`HFGenerator.generate`):

1. **Prompts** on the driver: ``pool_size`` few-shot prompts, each showing ``shots`` target
   examples drawn with a seeded RNG (format and parser rules: :mod:`evoray.generate.fewshot`).
2. **Generate** with ``ray.data.from_items(rows).map_batches(GenActor,
   compute=ActorPoolStrategy(size=num_actors), batch_size=..., num_cpus=..., num_gpus=...)``.
   Each actor loads the model once (``generate.model``, or the run's model plus the latest
   adapter, merged) and samples up to ``max_new_tokens`` per prompt, stopping at ``"\\n###"``
   or EOS. Prompts longer than the model's context minus ``max_new_tokens`` lose their oldest
   tokens (counted as ``truncated``).
3. **Parse and write** on the driver: unparsable outputs and copies are dropped and counted;
   the rest are written as candidates ``r{round:02d}-hf-{i:06d}``.

Determinism: every generation draws its tokens from its own ``torch.Generator`` seeded with
:func:`~evoray.generate.fewshot.row_seed` (the round's seed and the row index), applied by a
logits processor (:class:`RowSampler`: temperature, top-p, then one draw) under greedy decoding.
A row's tokens therefore do not depend on which actor or batch it lands in, or on the others'
draws; on CPU, with a fixed thread count per actor, the same seed and cluster give identical
files. Batch padding can still change a row's logits by float rounding when the batch
composition changes (e.g. another ``batch_size``), and GPU kernels are not bit-reproducible.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from evoray.config import GenerateConfig
from evoray.errors import EvorayError, ModelError
from evoray.generate import RoundContext
from evoray.generate.fewshot import END, GenerateError, round_prompts, row_seed, write_pool

__all__ = ["HFGenerator", "GenActor", "RowSampler"]

log = logging.getLogger("evoray.generate")


class RowSampler:
    """Logits processor that samples each row with its own generator (temperature, then top-p)
    and leaves only the drawn token finite, so greedy decoding emits it.

    Args:
        seeds: one seed per batch row.
        temperature: 0 = argmax.
        top_p: nucleus mass in (0, 1].
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        import torch

        logits = scores.detach().float().cpu()
        if self.temperature == 0:
            pick = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
            sorted_p[sorted_p.cumsum(-1) - sorted_p >= self.top_p] = 0.0  # keeps the top token
            pick = torch.stack([order[i, torch.multinomial(sorted_p[i], 1, generator=g)[0]]
                                for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(pick)), pick.to(scores.device)] = 0.0
        return out


class _StopAtEnd:
    """Stopping criterion: a row is done once its new text contains ``END``."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        tails = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:][:, -16:],
                                            skip_special_tokens=True)
        return torch.tensor([END in t for t in tails], device=input_ids.device)


def _context_length(config, tokenizer) -> int:
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n or tokenizer.model_max_length)


def _preflight(model: str, adapter: str | None, cache_dir: str | None,
               max_new_tokens: int) -> None:
    """Check the model, the adapter and the context on the driver: an actor's constructor error
    reaches the driver only as the text of Ray's ``ActorDiedError``."""
    import types

    from transformers import AutoConfig

    from evoray.lora import META_FILE, fingerprint, read_meta
    from evoray.models import load_model, load_tokenizer, remote_code_allowed, smollm2_dir

    if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise ModelError(f"model {model!r}: no such directory; give a folder written by "
                         f"save_pretrained, a hub id, or a built-in model name")
    tok = load_tokenizer(model, cache_dir=cache_dir)
    if model.startswith("tiny-"):
        config = load_model(model)[0].config
    else:
        source = str(smollm2_dir(cache_dir)) if model == "smollm2-135m" else model
        try:
            config = AutoConfig.from_pretrained(os.path.expanduser(source),
                                                trust_remote_code=remote_code_allowed())
        except (OSError, ValueError) as e:
            raise ModelError(f"model {model!r}: its config could not be loaded "
                             f"({str(e).splitlines()[0]})") from None
    n = _context_length(config, tok)
    if max_new_tokens >= n:
        raise GenerateError(f"generate.max_new_tokens={max_new_tokens} leaves no room for a "
                            f"prompt in the {n}-token context of model {model!r}")
    if adapter and "://" not in adapter:
        folder = os.path.expanduser(adapter)
        if not os.path.exists(os.path.join(folder, "adapter_config.json")):
            raise ModelError(f"adapter {adapter!r}: no adapter_config.json there (not a LoRA "
                             f"adapter folder)")
        saved = read_meta(folder).get("fingerprint")
        if saved and saved != fingerprint(types.SimpleNamespace(config=config)):
            raise ModelError(f"adapter {adapter!r} was trained on a base model "
                             f"({saved}, see {META_FILE}) that does not match {model!r}")


class GenActor:
    """Ray Data actor: loads the generator model once; maps a batch of ``(row, prompt)`` to
    ``(row, text, complete, truncated)``."""

    def __init__(self, model: str, adapter: str | None, cache_dir: str | None,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 num_cpus: float, num_gpus: float):
        import torch

        from evoray.lora import load_with_adapter

        self.device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":  # a fixed thread count, so kernels (and bits) do not vary
            torch.set_num_threads(max(1, round(num_cpus)))
        base, tok = load_with_adapter(model, adapter, cache_dir=cache_dir)
        if adapter:
            base = base.merge_and_unload()
        tok.padding_side = "left"  # decoder-only generation continues the last real token
        self.model, self.tok = base.to(self.device).eval(), tok
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed = seed
        self.limit = _context_length(base.config, tok) - max_new_tokens  # >= 1: _preflight

    def __call__(self, batch: dict) -> dict:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        rows = [int(r) for r in batch["row"]]
        prompts = [str(p) for p in batch["prompt"]]
        lengths = [len(ids) for ids in self.tok(prompts)["input_ids"]]
        enc = self.tok(prompts, padding=True, truncation=True, max_length=self.limit,
                       return_tensors="pt").to(self.device)
        n_prompt = enc["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(
                **enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
                logits_processor=LogitsProcessorList(
                    [RowSampler([row_seed(self.seed, r) for r in rows], self.temperature,
                                self.top_p)]),
                stopping_criteria=StoppingCriteriaList([_StopAtEnd(self.tok, n_prompt)]))
        texts, complete = [], []
        for ids in out[:, n_prompt:].tolist():
            ended = self.tok.eos_token_id in ids
            if ended:
                ids = ids[:ids.index(self.tok.eos_token_id)]
            text = self.tok.decode(ids, skip_special_tokens=True)
            texts.append(text)
            complete.append(ended or END in text or len(ids) < self.max_new_tokens)
        return {"row": np.asarray(rows, np.int64), "text": np.asarray(texts, dtype=object),
                "complete": np.asarray(complete, bool),
                "truncated": np.asarray([n > self.limit for n in lengths], bool)}


class HFGenerator:
    """Few-shot generation with a local transformers model on Ray Data actors.

    Ray must be running (:func:`evoray.ray_utils.init_ray`); the caller shuts it down.
    """

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg

    def generate(self, ctx: RoundContext, out: str) -> dict:
        """Sample ``pool_size`` generations, write the parsed candidates to ``out``.

        Returns:
            ``{"n", "dropped", "generations", "unparsable", "copies", "truncated"}`` (see
            :func:`evoray.generate.fewshot.write_pool`); ``truncated`` counts prompts cut to fit.

        Raises:
            GenerateError: no generation parsed (one raw output is shown), Ray is not running,
                the prompts need targets that the round lacks, or ``max_new_tokens`` fills the
                model's context.
            ModelError: the model or adapter cannot be loaded, or the adapter was trained on
                another base model (checked on the driver before any actor starts).
        """
        import ray
        import ray.data

        from evoray.ray_utils import unwrap_error

        cfg = self.cfg
        if not ray.is_initialized():
            raise GenerateError("generate (hf): Ray is not running; call "
                                "evoray.ray_utils.init_ray() first")
        model = cfg.model or ctx.model
        adapter = None if cfg.model else ctx.adapter
        prompts, plan = round_prompts(ctx.targets, cfg.shots, cfg.pool_size, ctx.seed)
        _preflight(model, adapter, ctx.cache_dir, cfg.max_new_tokens)
        ds = ray.data.from_items([{"row": i, "prompt": p} for i, p in enumerate(prompts)])
        gens = ds.map_batches(
            GenActor, batch_format="numpy", batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
            fn_constructor_kwargs={"model": model, "adapter": adapter,
                                   "cache_dir": ctx.cache_dir,
                                   "max_new_tokens": cfg.max_new_tokens,
                                   "temperature": cfg.temperature, "top_p": cfg.top_p,
                                   "seed": ctx.seed, "num_cpus": cfg.num_cpus,
                                   "num_gpus": cfg.num_gpus})
        try:
            rows = sorted(gens.take_all(), key=lambda r: int(r["row"]))
        except Exception as e:  # Ray wraps an actor's error: surface evoray's own message
            inner = unwrap_error(e)
            if isinstance(inner, EvorayError):
                raise inner from None
            raise
        if [int(r["row"]) for r in rows] != list(range(len(prompts))):
            raise GenerateError(f"generate (hf): {len(rows)} generations came back for "
                                f"{len(prompts)} prompts")
        truncated = sum(bool(r["truncated"]) for r in rows)
        if truncated:
            log.warning("generate (hf): %d of %d few-shot prompts were longer than the context "
                        "of %s allows and lost their first tokens; lower generate.shots or "
                        "max_new_tokens", truncated, len(rows), model)
        stats = write_pool([{"text": str(r["text"]), "complete": bool(r["complete"])}
                            for r in rows], targets=ctx.targets, plan=plan, round=ctx.round,
                           kind="hf", model=model, out=out,
                           meta={"adapter": adapter} if adapter else None)
        return {**stats, "truncated": truncated}
