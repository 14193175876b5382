"""``evoray demo``: one generate → features → select pass on embedded defaults, on a local Ray.

It builds a built-in task with the simulated (noisy) generator, computes gradient features of the
pool and of the targets with SmolLM2-135M as the proxy, selects a budget with EvoSelect and with
Random, and prints what each selection holds against the pool's mix (the generator's true kinds,
which selectors never read). The round loop with training lands with the evolve issue.
"""

from __future__ import annotations

import collections
import os
import time

__all__ = ["run_demo"]

KINDS = ("clean", "wrong_label", "off_task", "near_duplicate")


def _mix(records: list[dict]) -> str:
    counts = collections.Counter(r["meta"]["kind"] for r in records)
    return "  ".join(f"{k} {counts[k] / len(records):>4.0%}" for k in KINDS)


def run_demo(*, model: str = "smollm2-135m", task: str = "arithmetic", generator: str = "weak",
             pool_size: int = 60, ratio: float = 0.25, seed: int = 0, num_cpus: int = 2,
             out: str = "runs/demo", say=print) -> dict:
    """Run the demo; returns the paths it wrote. ``say`` prints progress lines."""
    from evoray.config import FeaturesConfig
    from evoray.data import read_records
    from evoray.data.features import read_features
    from evoray.features.stage import featurize
    from evoray.models import load_model
    from evoray.ray_utils import init_ray
    from evoray.select import budget, select
    from evoray.tasks import write_task

    t0 = time.perf_counter()
    paths = write_task(task, os.path.join(out, "task"), pool_size=pool_size, generator=generator,
                       seed=seed)
    pool = read_records(paths["pool"], "candidate")
    n_targets = len(read_records(paths["targets"], "target"))
    say(f"[demo] task {task!r}, {generator} generator: {len(pool)} candidates, {n_targets} "
        f"targets ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    load_model(model)  # converts SmolLM2 once, before the actors need it
    say(f"[demo] model {model!r} ready ({time.perf_counter() - t0:.1f} s)")

    # One actor; at least one CPU stays free for Ray Data's read and sort tasks.
    cfg = FeaturesConfig(batch_size=16, num_actors=1, num_cpus=max(0.5, num_cpus - 1))
    started = init_ray(num_cpus=num_cpus)
    try:
        feats = {}
        for name, kind in (("pool", "candidate"), ("targets", "target")):
            t0 = time.perf_counter()
            feats[name] = featurize(paths[name], model, cfg=cfg, kind=kind,
                                    out=os.path.join(out, "features", name))
            say(f"[demo] features of the {name}: {feats[name]} ({time.perf_counter() - t0:.1f} s)")
    finally:
        if started:
            import ray

            ray.shutdown()
    G, V = read_features(feats["pool"]), read_features(feats["targets"])
    k = budget(len(G), ratio=ratio)
    by_id = {r["id"]: r for r in pool}
    say(f"[demo] {'pool':<10} {len(pool):>4}  {_mix(pool)}")
    for method in ("random", "evoselect"):
        sel = select(G.X, V.X, k, method=method, seed=seed)
        picked = [by_id[i] for i in G.ids[sel.indices]]
        say(f"[demo] {method:<10} {len(picked):>4}  {_mix(picked)}")
    return {**paths, **feats}
