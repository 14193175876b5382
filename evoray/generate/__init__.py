"""Candidate generators for the round loop, behind one interface.

A generator writes round ``r``'s candidate records (``id``, ``prompt``, ``response``, optional
``source``/``meta``) to a file and returns counts::

    gen = make_generator(cfg.generate, task=cfg.evolve.task)
    stats = gen.generate(RoundContext(round=1, seed=cfg.generate.seed + 1, targets=targets,
                                      model=cfg.model, adapter=None), "run/round_01/pool.jsonl")
    # stats: {"n": written, "dropped": unusable generations (hf/vllm), ...}

Candidate ids carry the round (``r01-...``) so that ids never collide across rounds.

=============  ===============================================================================
kind           what
=============  ===============================================================================
``simulated``  the built-in task's noisy generator (``weak``/``strong`` preset), new questions
               each round (seed + round), never a question of ``val``/``dev``/``test``
``pool``       a pre-generated pool: one file per round (``path`` with ``{round}``), or one big
               file sampled per round without replacement (a candidate is offered once)
``hf``         a local transformers model on Ray Data actors, few-shot prompted with targets
``vllm``       the same through ``ray.data.llm`` with vLLM (GPU clusters; optional extra)
=============  ===============================================================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from evoray.config import GenerateConfig
from evoray.data.io import read_records, write_records
from evoray.errors import ConfigError

__all__ = ["RoundContext", "Generator", "make_generator", "SimulatedGenerator", "PoolGenerator"]


@dataclass
class RoundContext:
    """What a generator may use in one round.

    Attributes:
        round: 1-based round number.
        seed: the generator's seed for this round (``generate.seed + round``).
        targets: the target (validation) records, for few-shot prompting.
        model: base model spec of the run (the ``hf``/``vllm`` default generator model).
        adapter: the latest adapter folder, or None in round 1.
        cache_dir: model cache.
        exclude_ids: candidate ids offered in earlier rounds (the ``pool`` generator skips them).
    """

    round: int
    seed: int
    targets: list[dict] = field(default_factory=list)
    model: str = "smollm2-135m"
    adapter: str | None = None
    cache_dir: str | None = None
    exclude_ids: set[str] = field(default_factory=set)


class Generator(Protocol):
    def generate(self, ctx: RoundContext, out: str) -> dict:
        """Write this round's candidates to ``out`` (JSONL/Parquet path or URI); return
        ``{"n": written, "dropped": discarded generations, ...}``."""
        ...


class SimulatedGenerator:
    """The built-in task's simulated generator (see :mod:`evoray.tasks.simulate`)."""

    def __init__(self, task: str, preset: str, pool_size: int, split_seed: int = 0):
        from evoray.tasks import make_splits

        self.preset, self.pool_size = preset, pool_size
        self.splits = make_splits(task, split_seed)

    def generate(self, ctx: RoundContext, out: str) -> dict:
        from evoray.tasks import simulate_pool

        pool = simulate_pool(self.splits, self.pool_size, self.preset, ctx.seed,
                             id_prefix=f"r{ctx.round:02d}-{self.splits.family}-{self.preset}")
        write_records(pool, out, "candidate")
        return {"n": len(pool), "dropped": 0}


class PoolGenerator:
    """A pre-generated pool. ``path`` with ``{round}`` (e.g. ``pools/round_{round}.jsonl``) names
    one file per round, used whole; otherwise each round samples ``pool_size`` records of the one
    file, seeded, never offering a candidate twice (``ctx.exclude_ids``)."""

    def __init__(self, path: str, pool_size: int):
        self.path, self.pool_size = path, pool_size

    def generate(self, ctx: RoundContext, out: str) -> dict:
        if "{round}" in self.path:
            records = read_records(self.path.format(round=ctx.round), "candidate")
        else:
            fresh = [r for r in read_records(self.path, "candidate")
                     if str(r["id"]) not in ctx.exclude_ids]
            if not fresh:
                raise ConfigError(f"generate.path: {self.path} has no candidate left for round "
                                  f"{ctx.round} (every one was offered in an earlier round)")
            records = random.Random(ctx.seed).sample(fresh, min(self.pool_size, len(fresh)))
        write_records(records, out, "candidate")
        return {"n": len(records), "dropped": 0}


def make_generator(cfg: GenerateConfig, *, task: str | None = None,
                   split_seed: int = 0) -> Generator:
    """The generator named by ``cfg.kind``; ``task`` is the built-in task of the run and
    ``split_seed`` the seed of its splits (the simulated generator avoids their questions)."""
    if cfg.kind == "simulated":
        return SimulatedGenerator(task or cfg.task, cfg.preset, cfg.pool_size, split_seed)
    if cfg.kind == "pool":
        return PoolGenerator(cfg.path, cfg.pool_size)
    if cfg.kind == "hf":
        from evoray.generate.hf import HFGenerator

        return HFGenerator(cfg)
    if cfg.kind == "vllm":
        from evoray.generate.vllm import VLLMGenerator

        return VLLMGenerator(cfg)
    raise ConfigError(f"generate.kind: {cfg.kind!r} is not a generator")
