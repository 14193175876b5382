"""``evoray demo``: two evolve runs on embedded defaults, random and EvoSelect, side by side.

The defaults (:func:`demo_config`) are those of ``jobs/configs/demo.yaml`` (the EvoSelect arm):
SmolLM2-135M on the built-in ``lookup`` task with the ``strong`` simulated generator (off-task,
near-duplicate and some wrong-label candidates), one round of 600 candidates, EvoSelect at
ratio 1/3 (199 picks), LoRA training in-process with the benchmark's recipe cut to 6 epochs, with
bfloat16 autocast, test accuracy on 200 questions: the benchmark's setting where EvoSelect's
picks differ most from random's (README, Results; no selector's gain over random is significant
there). One demo run is one seed, so its figures are an illustration; the benchmark's paired
interval is the result.

:func:`run_demo` runs that loop twice, once per arm (:func:`arms`): random first, which
selects from the pool file and needs no features, then the configured method. Both arms see the
same generated pools (the simulated generator's seed is ``generate.seed + round``) and train with
the same recipe and seed; they run one after the other, each using both cores, on one local Ray.
``--quick`` (``jobs/configs/quick.yaml``) runs the two arms on the tiny random ``tiny-llama``
(weak arithmetic pools of 120, 2 rounds), for tests and a first look in a minute.

It prints each stage as it ends, each arm's per-round table, then the arms side by side: test
accuracy per round and the selection's make-up (shares of clean, wrong-label, off-task and
near-duplicate picks, from the generator's ``meta.kind``, which selectors never read). It writes
``RUN_DIR/<arm>/report.md`` with plots for each arm and ``RUN_DIR/report.md`` with the side-by-side
table.
"""

from __future__ import annotations

import time

from evoray.config import Config, apply_override
from evoray.storage import atomic_write_bytes

__all__ = ["DEMO", "QUICK", "arms", "compare_table", "demo_config", "run_demo"]

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEMO = {
    "model": "smollm2-135m",
    # The benchmark's setting where EvoSelect's picks differ most from random's: lookup, strong
    # generator (README's Results), on a pool of 600 (the evolution benchmark's round size) at
    # ratio 1/3, so that the picks are as many as the benchmark's (ratio 0.1 of 2,000) and the
    # features stage is short.
    "generate.kind": "simulated", "generate.preset": "strong", "generate.pool_size": 600,
    "evolve.task": "lookup", "evolve.rounds": 1, "evolve.run_dir": "runs/demo",
    "evolve.test_size": 200,
    "select.method": "evoselect", "select.ratio": 0.3333,
    # One feature actor on one CPU, so that the other CPU of a 2-core machine is free for Ray
    # Data's tasks; its torch uses 2 threads, since the driver is idle while features run; under
    # bfloat16 autocast, which about halves the stage and moves a feature by 4% (median; cosine
    # to float32's >= 0.998, benchmarks/features.py --bf16).
    "features.num_actors": 1, "features.num_cpus": 1.0, "features.threads": 2,
    "features.max_length": 96, "features.bf16": True,
    # The benchmark's recipe (benchmarks/results/recipe.md) cut to 6 epochs, with bfloat16
    # autocast, which halves a step on a CPU with AVX512-BF16: 6 epochs is what fits 10 minutes
    # on a slow 2-core host. It learns less than 16 (benchmarks/results/demo_recipe.md: dev about
    # .5 at 6 epochs on clean picks, .83 at 10; higher learning rates did not learn in 8 epochs).
    "train.num_workers": 0, "train.max_length": 96, "train.epochs": 6, "train.lr": 1e-3,
    "train.schedule": "constant", "train.warmup_ratio": 0.0, "train.lora_dropout": 0.0,
    "train.lora_r": 16, "train.lora_alpha": 32.0, "train.target_modules": ALL_PROJECTIONS,
    "train.bf16": True,
}
QUICK = {
    # The loop of the first demo (weak arithmetic, 2 rounds, default training) on tiny-llama and
    # pools of 120: a minute, and the reference run of the test suite.
    "model": "tiny-llama", "generate.kind": "simulated", "generate.preset": "weak",
    "generate.pool_size": 120, "evolve.task": "arithmetic", "evolve.rounds": 2,
    "evolve.run_dir": "runs/quick", "select.method": "evoselect", "select.ratio": 0.2,
    "features.num_actors": 1, "features.num_cpus": 1.0, "features.threads": 2,
    "features.max_length": 256, "features.dim": 256,
    "train.num_workers": 0, "train.max_length": 256, "train.epochs": 1,
}


def demo_config(quick: bool = False, **overrides) -> Config:
    """The demo's :class:`Config` (``quick``: tiny-llama, small pools), with ``overrides``
    given as ``{"dotted.key": value}``."""
    cfg = Config()
    for key, value in {**(QUICK if quick else DEMO), **overrides}.items():
        cfg = apply_override(cfg, key, value)
    return cfg


def arms(cfg: Config) -> tuple[str, ...]:
    """The demo's arms: random, then the configured method (random alone if that is random)."""
    return ("random",) if cfg.select.method == "random" else ("random", cfg.select.method)


def run_demo(cfg: Config, *, resume: bool = False, say=print) -> dict:
    """Run the evolve loop once per arm (:func:`arms`) on the same generated pools, each in
    ``<evolve.run_dir>/<method>`` with its own report, then print and write the side-by-side
    table (``<evolve.run_dir>/report.md``). The arms run one after the other, each with both
    cores; they share one local Ray. Returns ``{"run_dir", "report", "arms": {method:
    evolve's result plus its "report"}}``."""
    from evoray.evolve import evolve
    from evoray.models import load_model
    from evoray.ray_utils import init_ray
    from evoray.report import write_report

    t0 = time.perf_counter()
    load_model(cfg.model, cache_dir=cfg.cache_dir)  # converts SmolLM2 once, before the actors
    say(f"[demo] model {cfg.model!r} ready ({time.perf_counter() - t0:.1f} s)")
    root = cfg.evolve.run_dir.rstrip("/")
    started = init_ray()
    results = {}
    try:
        for method in arms(cfg):
            arm = apply_override(apply_override(cfg, "select.method", method),
                                 "evolve.run_dir", f"{root}/{method}")
            say(f"[demo] arm {method}: {arm.evolve.run_dir}")
            base = next(iter(results.values()))["base"] if results else None
            out = evolve(arm, resume=resume, say=say, base=base)
            out["report"] = write_report(out["run_dir"])
            results[method] = out
    finally:
        if started:
            import ray

            ray.shutdown()
    lines = compare_table(results)
    say("\n".join(lines))
    report = f"{root}/report.md"
    atomic_write_bytes(report, "\n".join(_report_lines(cfg, results, lines)).encode("utf-8"))
    say(f"[demo] report: {report} ({time.perf_counter() - t0:.0f} s in all)")
    return {"run_dir": root, "report": report, "arms": results}


def compare_table(results: dict) -> list[str]:
    """The arms side by side, a Markdown table: test accuracy per round per arm (round 0 is
    the base model, the same for every arm) and the selection's make-up by ``meta.kind``."""
    kinds = ("clean", "wrong_label", "off_task", "near_duplicate")
    lines = ["| round | arm | accuracy | picked | " + " | ".join(f"{k} %" for k in kinds) + " |",
             "|---:|---|---:|---:|" + "---:|" * len(kinds)]
    first = next(iter(results.values()))
    if first.get("base"):
        lines.append(f"| 0 | base model | {first['base']['accuracy']:.3f} | – | "
                     + " | ".join("–" for _ in kinds) + " |")
    n_rounds = max(len(out["rounds"]) for out in results.values())
    for r in range(n_rounds):
        for method, out in results.items():
            if r >= len(out["rounds"]):
                continue
            m = out["rounds"][r]
            mix = m.get("mix") or {}
            acc = f"{m['accuracy']:.3f}" if m.get("accuracy") is not None else "–"
            lines.append(f"| {m['round']} | {method} | {acc} | {m.get('n_selected', '–')} | "
                         + " | ".join(f"{100 * mix.get(k, 0.0):.0f}" for k in kinds) + " |")
    return lines


def _report_lines(cfg: Config, results: dict, table: list[str]) -> list[str]:
    links = [f"[{method}]({method}/report.md)" for method in results]
    return ["# evoray demo", "",
            f"{cfg.evolve.rounds} round(s) of {cfg.generate.pool_size} {cfg.generate.preset} "
            f"simulated candidates of the {cfg.evolve.task!r} task, model {cfg.model!r}, "
            f"ratio {cfg.select.ratio}; the arms select from the same generated pools and "
            "train with the same recipe and seed.", "", *table, "",
            "Make-up: share of the selection by the generator's `meta.kind`, which no selector "
            "reads. One seed: the benchmark's paired 5-seed comparison is in the README's "
            "Results.", "", "Each arm's own report: " + ", ".join(links), ""]
