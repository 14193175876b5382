"""Choosing the downstream training recipe: dev accuracy of clean-only training, epoch by epoch.

    python benchmarks/recipe.py --recipes const-1e-3 --seeds 0,1 --jobs 2   # 2 trainings at once
    python benchmarks/recipe.py --report                                     # tables only

The quality benchmark's downstream layer (``benchmarks/quality.py``) can only tell selectors apart
if its training recipe learns reliably. This script chooses that recipe fairly: every cell trains
on the **clean oracle's** selection at ratio 0.1 (``oracle_clean``: random among candidates with
a right label, one per question, drawn with the cell's seed, which is also the training seed)
from the quality benchmark's cleaned ``lookup`` pools (``write_task('lookup', seed=0)``, presets
``weak`` and ``strong``), and scores the adapter on the task's 200 **dev** questions after the
epochs listed in the recipe, never on test. A recipe with a constant learning rate (no warm-up,
no decay) is read at several epoch counts from one training: its state after epoch ``e`` is
exactly that of an ``e``-epoch training (``tests/unit/test_train.py`` checks this).

Recipes marked ``diagnosis`` reproduce the earlier benchmark's settings (8 epochs, linear decay)
to find out why its clean-only cells spread; only they also score the final adapter on test, to
compare with the earlier test figures.

Cells go to ``benchmarks/results/recipe.json`` as they finish (a rerun resumes; ``--force``
recomputes); ``--jobs 2`` runs two 1-thread trainings at once (both cores of a 2-core machine).
The table goes to ``benchmarks/results/recipe.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import statistics
import sys
import time

import quality
import quality_cells

_HERE = os.path.dirname(os.path.abspath(__file__))

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = {"lr": 1e-3, "batch_size": 8, "max_length": 96, "lora_r": 16, "lora_alpha": 32.0,
        "target_modules": ALL, "warmup_ratio": 0.0, "schedule": "constant", "lora_dropout": 0.0}
# name -> TrainConfig settings, the epochs at which dev is scored, and whether it is a diagnosis
RECIPES = {
    # Seed 0 ran 20 epochs; the other seeds 16 (with a constant learning rate and no warm-up,
    # the first 16 epochs of a 20-epoch training are a 16-epoch training).
    "const-1e-3": {"train": {**BASE, "epochs": 16}, "score": list(range(8, 17, 2))},
    "const-2e-3": {"train": {**BASE, "lr": 2e-3, "epochs": 20}, "score": list(range(6, 21, 2))},
    "bench-8": {"train": {**quality.TRAIN_V1}, "score": [2, 4, 6, 8], "diagnosis": True},
    # For `evoray demo`, which must train two arms in minutes: ~100 clean picks (ratio 0.1 of a
    # 1,000-candidate pool), at batch 8 and at batch 4 (twice the steps for the same compute).
    # Their rows go to results/demo_recipe.json (--results), apart from the benchmark's choice.
    "demo-b8": {"train": {**BASE, "epochs": 16}, "score": [6, 8, 10, 12, 14, 16], "pool": 1000},
    "demo-b4": {"train": {**BASE, "batch_size": 4, "epochs": 12}, "score": [4, 6, 8, 10, 12],
                "pool": 1000},
    # const-1e-3 with bfloat16 autocast (about twice as fast on this CPU): does it learn alike?
    "demo-bf16": {"train": {**BASE, "epochs": 12, "bf16": True}, "score": [6, 8, 10, 12]},
    # The demo must finish in 10 minutes on a slow 2-core host, about 6 epochs: does a higher
    # constant learning rate reach in 6 epochs what 1e-3 reaches in 10?
    "demo-bf16-2e-3": {"train": {**BASE, "epochs": 8, "bf16": True, "lr": 2e-3},
                       "score": [4, 5, 6, 7, 8]},
    "demo-bf16-3e-3": {"train": {**BASE, "epochs": 8, "bf16": True, "lr": 3e-3},
                       "score": [4, 5, 6, 7, 8]},
}


def pool_size_of(recipe: str, default: int) -> int:
    """The pool a recipe trains from: its own ``pool``, else ``--pool-size``."""
    return RECIPES[recipe].get("pool", default)


def cell_key(gen: str, recipe: str, seed: int, threads: int) -> str:
    return f"recipe|lookup|{gen}|{recipe}|{seed}|t{threads}"


def run_cell(work: str, pool_size: int, model: str, gen: str, recipe: str, seed: int,
             threads: int) -> dict:
    """One training (in a worker process) and its dev scores; see the module docstring."""
    import torch

    from evoray.config import TrainConfig
    from evoray.data import write_records
    from evoray.train import evaluate, train

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    spec = RECIPES[recipe]
    pool_size = pool_size_of(recipe, pool_size)
    data = quality_cells.task_files(work, "lookup", gen, pool_size)
    rows = quality_cells.oracle_rows(data["pool_records"], "oracle_clean", "lookup", 0.1, seed)
    picks = [data["pool_records"][i] for i in rows]
    folder = os.path.join(work, "recipe", gen, recipe, f"{seed}-t{threads}")
    os.makedirs(folder, exist_ok=True)
    write_records(picks, f"{folder}/selected.jsonl", "candidate")
    dev, t0 = {}, time.perf_counter()

    def score(ckpt: str, metrics: dict) -> None:
        if metrics["epoch"] in spec["score"] and metrics["step"] % per_epoch == 0:
            m = evaluate(model, ckpt, data["dev"], max_length=96)
            dev[str(metrics["epoch"])] = {"accuracy": m["accuracy"], "loss": m["loss"],
                                          "train_loss": metrics["loss"],
                                          "seconds": round(time.perf_counter() - t0, 1)}
            print(f"[recipe] {gen} {recipe} seed {seed} t{threads} epoch {metrics['epoch']}: "
                  f"dev {m['accuracy']:.3f}", flush=True)

    per_epoch = -(-len(picks) // spec["train"]["batch_size"])
    cfg = TrainConfig(**spec["train"], seed=seed)
    res = train(f"{folder}/selected.jsonl", model, cfg=cfg, out=f"{folder}/adapter",
                on_checkpoint=score)
    row = {"gen": gen, "recipe": recipe, "seed": seed, "threads": threads, "pool": pool_size,
           "train": spec["train"], "dev": dev, "examples": res.n_examples,
           "final_train_loss": float(res.history[-1])}
    if spec.get("diagnosis"):
        m = evaluate(model, res.adapter, data["test"], max_length=96)
        row["test_accuracy"] = m["accuracy"]
    row["seconds"] = round(time.perf_counter() - t_start, 1)
    return row


def _mean_sd(xs: list[float]) -> str:
    return (f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else
            f"{xs[0]:.3f}")


def _settings(train: dict) -> str:
    """Every TrainConfig setting the recipe runs with (its own and the defaults it keeps) that
    shapes learning."""
    from evoray.config import TrainConfig, config_to_dict

    full = config_to_dict(TrainConfig(**train))
    keys = ("epochs", "lr", "schedule", "warmup_ratio", "batch_size", "lora_r", "lora_alpha",
            "lora_dropout", "weight_decay", "max_grad_norm", "max_length", "bf16")
    return ", ".join(f"{k}={full[k]}" for k in keys) + \
        f", LoRA on {len(full['target_modules'])} projections"


# The bar a recipe must clear on dev, on both pools, over at least this many seeds
BAR = {"mean": 0.85, "sd": 0.03, "seeds": 5}


def choice(rows: dict) -> list[str]:
    """For each recipe run on both pools with enough seeds: the fewest scored epochs whose dev
    accuracy clears :data:`BAR` on both, with the figures; the downstream layer's ``TRAIN``
    follows it (``benchmarks/quality.py``)."""
    out = []
    for recipe, spec in RECIPES.items():
        if spec.get("diagnosis"):
            continue
        by_gen = {g: [r for r in rows.values() if r["recipe"] == recipe and r["gen"] == g
                      and r["threads"] == 1] for g in ("strong", "weak")}
        if min(len(v) for v in by_gen.values()) < BAR["seeds"]:
            continue
        figures, chosen = [], None
        for e in spec["score"]:
            stats = {}
            for g, rs in by_gen.items():
                accs = [r["dev"][str(e)]["accuracy"] for r in rs if str(e) in r["dev"]]
                if len(accs) >= BAR["seeds"]:
                    stats[g] = (statistics.mean(accs), statistics.stdev(accs))
            if len(stats) < 2:
                continue
            ok = all(m >= BAR["mean"] and sd <= BAR["sd"] for m, sd in stats.values())
            figures.append(f"{e} epochs: " + ", ".join(
                f"{g} {m:.3f} ± {sd:.3f}" for g, (m, sd) in stats.items()) +
                (" (clears the bar)" if ok else ""))
            if ok and chosen is None:
                chosen = e
        out += [f"### The choice: {recipe}", "",
                f"The bar: dev mean ≥ {BAR['mean']} with s.d. ≤ {BAR['sd']} over "
                f"{BAR['seeds']}+ seeds, on both pools; the fewest epochs that clear it is the "
                "recipe (each epoch adds about 1.5 minutes to every training):", ""]
        out += [f"* {f}" for f in figures] + [""]
        out += [f"**Chosen: {recipe} at {chosen} epochs.**" if chosen else
                "**No scored epoch clears the bar.**", ""]
    return out


def report(rows: dict) -> str:
    out = ["# Choosing the downstream recipe (dev only)", "",
           "Clean-only training (`oracle_clean`, ratio 0.1, lookup, SmolLM2-135M), dev accuracy "
           "on 200 questions after each listed epoch; mean ± s.d. over seeds (each seed draws "
           "its own clean picks and trains with that seed), then each seed's figure. Written by "
           "`benchmarks/recipe.py` from `recipe.json`.", ""] + choice(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows.values():
        groups.setdefault((r["recipe"], r["threads"], r["gen"]), []).append(r)
    for (recipe, threads, gen), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        out += [f"### {recipe}, {gen} pool, {threads} torch thread(s)", "",
                f"Settings: {_settings(rs[0]['train'])}; pool of {rs[0].get('pool', 2000)}, "
                f"{rs[0]['examples']} clean picks.", "",
                "| epochs | mean ± s.d. | " + " | ".join(f"seed {r['seed']}" for r in rs) + " |",
                "|---" * (len(rs) + 2) + "|"]
        epochs = sorted({int(e) for r in rs for e in r["dev"]})
        for e in epochs:
            accs = [r["dev"].get(str(e), {}).get("accuracy") for r in rs]
            have = [a for a in accs if a is not None]
            out.append(f"| {e} | {_mean_sd(have)} | " + " | ".join(
                "–" if a is None else f"{a:.3f}" for a in accs) + " |")
        if any("test_accuracy" in r for r in rs):
            out.append("| test (final) | | " + " | ".join(
                f"{r['test_accuracy']:.3f}" if "test_accuracy" in r else "–" for r in rs) + " |")
        if len({r["train"]["epochs"] for r in rs}) > 1:
            out += ["", "Seeds trained " + ", ".join(
                f"{r['train']['epochs']} (seed {r['seed']})" for r in rs) + " epochs; with a "
                "constant learning rate and no warm-up an epoch's state does not depend on how "
                "many epochs follow it."]
        minutes = [r["seconds"] / 60 for r in rs if "seconds" in r]
        out += ["", f"Minutes per cell (training and dev scoring): "
                f"{statistics.mean(minutes):.1f}." if minutes else "", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="const-1e-3",
                    help=f"comma-separated: {', '.join(RECIPES)}")
    ap.add_argument("--generators", default="strong,weak")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pool-size", type=int, default=2000)
    ap.add_argument("--work", default=os.path.join("runs", "quality"))
    ap.add_argument("--results", default=os.path.join(_HERE, "results", "recipe.json"))
    ap.add_argument("--report", action="store_true", help="only rewrite the table")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.recipes.split(",")) - set(RECIPES))
    if unknown:
        ap.error(f"--recipes: unknown {', '.join(unknown)} (valid: {', '.join(RECIPES)})")
    import torch

    hardware = f"{quality_cells.hardware()}, torch {torch.__version__}"
    cells = quality_cells.Cells(a.results, a.force, " ".join(["python benchmarks/recipe.py", *argv])
                          + f"  ({time.strftime('%Y-%m-%d')}, {hardware})")
    todo = [(g, r, int(s)) for r in a.recipes.split(",") for s in a.seeds.split(",")
            for g in a.generators.split(",")
            if a.force or cell_key(g, r, int(s), a.threads) not in cells.rows]
    if not a.report and todo:
        for g, r in sorted({(g, r) for g, r, _ in todo}):  # pools written before the workers
            quality_cells.task_files(a.work, "lookup", g, pool_size_of(r, a.pool_size))
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(run_cell, a.work, a.pool_size, a.model, g, r, s, a.threads):
                       (g, r, s) for g, r, s in todo}
            for fut in cf.as_completed(futures):
                g, r, s = futures[fut]
                cells.put(cell_key(g, r, s, a.threads), fut.result())
                with open(a.results.replace(".json", ".md"), "w") as f:
                    f.write(report(cells.rows))
    with open(a.results.replace(".json", ".md"), "w") as f:
        f.write(report(cells.rows))


if __name__ == "__main__":
    main()
