"""The evolution layer: does selection compound when each round's model is the next round's proxy?

    python benchmarks/evolution.py --generators weak,strong --seeds 0,1,2     # every cell
    python benchmarks/evolution.py --report                                   # tables only
    python benchmarks/evolution.py --quick                                    # tiny-llama, minutes

Each cell is one ``evoray.evolve`` run of ``--rounds`` (3) rounds on the built-in ``lookup`` task:
a fresh pool of ``--pool-size`` (600) simulated candidates a round (``generate.seed`` = the cell's
seed, so every arm of a seed sees the same pools), cleaned, then one arm's selection at ratio 1/3
(199 picks, as many as the downstream layer's ratio 0.1 of 2,000), then the downstream recipe
(``quality.TRAIN``: 16 epochs at a constant 1e-3, LoRA r 16 on all projections, batch 8)
continuing from the previous round's adapter, then test accuracy on 500 questions. Round r's
proxy (features and the competence check) is round r-1's model. Arms: ``evoselect``,
``attribution`` and ``random`` (which reads no features, so none are computed for it). The seed
is also the selection's and the training's, so arms pair by seed.

The round policy is the recipe as it stands: ``benchmarks/round_policy.py`` found early stopping
on the targets harmful on noisy on-task picks (the targets' accuracy dips in the first epochs and
the rule is learnt late), so ``--policy fixed`` (the default) trains every epoch; ``--policy
replay`` trains each round on every round's picks so far (``evolve.replay``). Training and
features run in float32, as the recipe was chosen; ``--bf16`` autocasts both to bfloat16 (about
half the time on an AVX512-BF16 CPU, another cell key), which learned less reliably on clean picks
(``results/demo_recipe.md``: dev .665 and .930 at 12 epochs against .940 and .945 in float32).

A cell's run folder is ``<work>/<generator>-<arm>-<seed>-<policy>``; a killed cell resumes from
its manifest (finished stages are reused), and each finished cell goes to
``results/evolution.json`` at once, so a rerun resumes. Cells run one at a time, each with both
cores (the features stage is a Ray Data actor; training is in-process).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import quality
import quality_cells
from quality_report import EVOLUTION_ARMS, evolution_report

_HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = EVOLUTION_ARMS
POLICIES = {"fixed": {}, "replay": {"evolve.replay": True}}


def cell_key(gen: str, arm: str, seed: int, policy: str, bf16: bool) -> str:
    return f"evo3|lookup|{gen}|{arm}|{seed}|{policy}" + ("|bf16" if bf16 else "")


def run_cell(a, gen: str, arm: str, seed: int) -> dict:
    """One evolve run (resumed when its folder holds a manifest) and its per-round figures."""
    run = os.path.join(a.work, f"{gen}-{arm}-{seed}-{a.policy}" + ("-bf16" if a.bf16 else ""))
    over = {"model": a.model, "evolve.task": "lookup", "evolve.rounds": a.rounds,
            "evolve.run_dir": run, "evolve.test_size": a.test_size,
            "generate.kind": "simulated", "generate.preset": gen,
            "generate.pool_size": a.pool_size, "generate.seed": seed,
            "select.method": arm, "select.ratio": a.ratio, "select.seed": seed,
            "features.dim": a.dim, "features.max_length": 96, "features.threads": 2,
            "features.num_actors": 1, "features.num_cpus": 1.0, "features.bf16": a.bf16,
            **{f"train.{k}": v for k, v in a.train.items()}, "train.seed": seed,
            "train.num_workers": 0, "train.bf16": a.bf16, **POLICIES[a.policy]}
    res, rounds = quality_cells.evolve_cell(over, "lookup")
    for row, m in zip(rounds, res["rounds"], strict=True):
        row["proxy"] = m.get("proxy")
    return {"gen": gen, "arm": arm, "seed": seed, "policy": a.policy, "bf16": a.bf16,
            "train": a.train, "base_accuracy": (res["base"] or {}).get("accuracy"),
            "rounds": rounds}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generators", default="weak,strong")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool-size", type=int, default=600)
    ap.add_argument("--ratio", type=float, default=0.3333)
    ap.add_argument("--policy", choices=tuple(POLICIES), default="fixed")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (features, training)")
    ap.add_argument("--quick", action="store_true", help="tiny-llama, pools of 60, 2 rounds")
    ap.add_argument("--report", action="store_true", help="only rewrite the tables")
    ap.add_argument("--work", default=os.path.join("runs", "evolution"))
    ap.add_argument("--results", default=os.path.join(_HERE, "results", "evolution.json"))
    a = ap.parse_args(argv)
    unknown = sorted(set(a.arms.split(",")) - set(ARMS))
    if unknown:
        ap.error(f"--arms: unknown {', '.join(unknown)} (valid: {', '.join(ARMS)})")
    a.model, a.dim, a.train, a.test_size = "smollm2-135m", 1024, \
        dict(quality.TRAIN), 500
    if a.quick:
        a.model, a.dim, a.pool_size, a.rounds, a.test_size = "tiny-llama", 256, 60, 2, 50
        a.train = dict(quality.QUICK["train"])
        a.work = a.work + "_quick"
        a.results = a.results.replace(".json", "_quick.json")
    cells = quality_cells.Cells(a.results, False, " ".join(
        ["python benchmarks/evolution.py", *argv]) + f"  ({time.strftime('%Y-%m-%d')}, "
        f"{quality_cells.hardware()})")
    md = a.results.replace(".json", ".md")

    def write_report() -> None:
        with open(md, "w") as f:
            f.write(evolution_report(cells.rows))

    if not a.report:
        for seed in map(int, a.seeds.split(",")):  # seed-major: a partial run has whole seeds
            for gen in a.generators.split(","):
                for arm in a.arms.split(","):
                    cells.get(cell_key(gen, arm, seed, a.policy, a.bf16), run_cell, a, gen,
                              arm, seed)
                    write_report()
    write_report()

if __name__ == "__main__":
    main()
