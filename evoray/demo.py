"""``evoray demo``: an evolve run on embedded defaults, on a local Ray, then its report.

The defaults (:func:`demo_config`) are those of ``jobs/configs/demo.yaml``: SmolLM2-135M, a
built-in task with the ``weak`` simulated generator (noisy: wrong labels, off-task and
near-duplicate candidates), 2 rounds of 600 candidates, EvoSelect at ratio 0.2 (120 picks a round),
LoRA training in-process. ``--quick`` (``jobs/configs/quick.yaml``) is the same loop on the tiny
random ``tiny-llama`` with small pools, for tests and a first look in a minute.

It prints each stage as it ends, then the per-round table: test accuracy and the selection's
make-up (shares of clean, wrong-label, off-task and near-duplicate picks, from the generator's
``meta.kind``, which selectors never read), and writes ``RUN_DIR/report.md`` with plots.
"""

from __future__ import annotations

import time

from evoray.config import Config, apply_override

__all__ = ["DEMO", "QUICK", "demo_config", "run_demo"]

DEMO = {
    "model": "smollm2-135m",
    "generate.kind": "simulated", "generate.preset": "weak", "generate.pool_size": 600,
    "evolve.task": "arithmetic", "evolve.rounds": 2, "evolve.run_dir": "runs/demo",
    "select.method": "evoselect", "select.ratio": 0.2,
    # One feature actor on one CPU, so that the other CPU of a 2-core machine is free for Ray
    # Data's tasks; its torch uses 2 threads, since the driver is idle while features run.
    "features.num_actors": 1, "features.num_cpus": 1.0, "features.threads": 2,
    "features.max_length": 256,
    "train.num_workers": 0, "train.max_length": 256,
}
QUICK = {
    **DEMO, "model": "tiny-llama", "generate.pool_size": 120, "evolve.run_dir": "runs/quick",
    "features.dim": 256, "train.epochs": 1,
}


def demo_config(quick: bool = False, **overrides) -> Config:
    """The demo's :class:`Config` (``quick``: tiny-llama, small pools), with ``overrides``
    given as ``{"dotted.key": value}``."""
    cfg = Config()
    for key, value in {**(QUICK if quick else DEMO), **overrides}.items():
        cfg = apply_override(cfg, key, value)
    return cfg


def run_demo(cfg: Config, *, resume: bool = False, say=print) -> dict:
    """Run the evolve loop on ``cfg`` and write its report; returns :func:`evolve`'s result
    plus ``report`` (the path of report.md)."""
    from evoray.evolve import evolve
    from evoray.models import load_model

    t0 = time.perf_counter()
    load_model(cfg.model, cache_dir=cfg.cache_dir)  # converts SmolLM2 once, before the actors
    say(f"[demo] model {cfg.model!r} ready ({time.perf_counter() - t0:.1f} s)")
    out = evolve(cfg, resume=resume, say=say)
    from evoray.report import write_report

    out["report"] = write_report(out["run_dir"])
    say(f"[demo] report: {out['report']} ({time.perf_counter() - t0:.0f} s in all)")
    return out
