"""Round policy: which adapter a round keeps when its selection still holds wrong labels (dev only).

    python benchmarks/round_policy.py --generators weak --seeds 0,1,2 --jobs 2
    python benchmarks/round_policy.py --report                      # tables only

A round-1 proxy is blind to wrong labels, so a selector that removes every off-task and duplicate
candidate keeps the on-task share of wrong letters (0.364 on the weak lookup pool), and the
downstream recipe (``quality.TRAIN``: 16 epochs, constant learning rate) memorises such a
selection, wrong letters included (dev about .30, against .93 for clean picks). A network fitting
noisy labels learns the shared rule before it memorises the exceptions, so an earlier epoch may be
better; the user's clean targets may tell which (:mod:`evoray.train.early_stop`).

Each cell trains the recipe on one selection of the quality benchmark's cleaned ``lookup`` pool
(``write_task('lookup', seed=0)``, 2,000 candidates, ratio 0.1) and scores the adapter after every
epoch on the task's 200 **dev** questions and on the 40 targets (accuracy as multiple-choice
questions, then the right answers' mean loss: what early stopping reads). Selections, drawn with
the cell's seed (also the training seed):

* ``oracle_on_task``: random among on-task candidates, one per question: what a label-blind
  selector that removes off-task and duplicate candidates picks;
* ``oracle_clean``: the same among clean candidates: a policy must not cost a clean round.

Every policy is then read off the same curves: a fixed number of epochs ``E``, and early stopping
on the targets with patience ``p`` (:func:`evoray.train.early_stop.stop_epoch`). The table gives
the dev accuracy of the adapter each policy keeps, mean ± s.d. over seeds, and the epochs kept.
Cells go to ``benchmarks/results/round_policy.json`` as they finish (a rerun resumes).

``--recipe gce`` trains with the generalized cross-entropy (``train.loss=gce``, q 0.7), which
scales each token's gradient by the model's probability of its label, so labels the model comes
to disagree with pull less. On the weak pool's on-task picks it did not help (2026-12-05, seeds 0
and 1: dev .305 and .245 after 16 epochs against .300 and .275 with cross-entropy; the curves
stay near chance throughout): the rule is not learnt early enough for the loss to tell the
wrong letters from the right ones.
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
SELECTIONS = ("oracle_on_task", "oracle_clean")
FIXED = (2, 4, 6, 8, 10, 12, 16)
PATIENCE = (1, 2, 3, 4)
RECIPES = {"ce": {}, "gce": {"loss": "gce", "gce_q": 0.7}}  # --recipe: the training loss


def cell_key(gen: str, selection: str, seed: int, recipe: str = "ce") -> str:
    return f"policy|lookup|{gen}|{selection}|{seed}" + ("" if recipe == "ce" else f"|{recipe}")


def run_cell(work: str, model: str, gen: str, selection: str, seed: int, threads: int,
             recipe: str = "ce") -> dict:
    """One training (in a worker process) and its per-epoch dev and target scores."""
    import torch

    from evoray.config import TrainConfig
    from evoray.data import write_records
    from evoray.train import evaluate, train
    from evoray.train.early_stop import KeepBest

    torch.set_num_threads(threads)
    data = quality_cells.task_files(work, "lookup", gen, 2000)
    rows = quality_cells.oracle_rows(data["pool_records"], selection, "lookup", 0.1, seed)
    picks = [data["pool_records"][i] for i in rows]
    folder = os.path.join(work, "round_policy", gen, selection, str(seed)) + (
        "" if recipe == "ce" else f"-{recipe}")
    recipe_cfg = {**quality.TRAIN, **RECIPES[recipe]}
    os.makedirs(folder, exist_ok=True)
    write_records(picks, f"{folder}/selected.jsonl", "candidate")
    per_epoch = -(-len(picks) // quality.TRAIN["batch_size"])
    keeper = KeepBest(model, data["target_records"], 1, per_epoch,
                      max_length=quality.TRAIN["max_length"])
    curve = []

    def score(ckpt: str, metrics: dict) -> None:
        m = evaluate(model, ckpt, data["dev"], max_length=quality.TRAIN["max_length"])
        t = keeper.score(ckpt)
        curve.append({"epoch": metrics["epoch"], "dev": m["accuracy"], "dev_loss": m["loss"],
                      "target_accuracy": t["accuracy"], "target_loss": t["loss"],
                      "train_loss": metrics["loss"]})
        print(f"[policy] {gen} {selection} seed {seed} epoch {metrics['epoch']}: dev "
              f"{m['accuracy']:.3f}, targets {t['accuracy']:.3f}", flush=True)

    try:
        res = train(f"{folder}/selected.jsonl", model, cfg=TrainConfig(**recipe_cfg, seed=seed),
                    out=f"{folder}/adapter", on_checkpoint=score)
    finally:
        keeper.cleanup()
    wrong = sum(r["response"] != r["meta"]["correct"] for r in picks) / len(picks)
    return {"gen": gen, "selection": selection, "seed": seed, "examples": res.n_examples,
            "wrong_label": round(wrong, 4), "train": recipe_cfg, "recipe": recipe,
            "threads": threads,
            "curve": curve}


def policies(curve: list[dict]) -> dict[str, tuple[int, float]]:
    """``{policy: (epoch kept, its dev accuracy)}`` for one cell's curve."""
    from evoray.train.early_stop import stop_epoch

    out = {f"{e} epochs": (e, curve[e - 1]["dev"]) for e in FIXED if e <= len(curve)}
    scores = [{"accuracy": c["target_accuracy"], "loss": c["target_loss"]} for c in curve]
    for p in PATIENCE:
        best, _ = stop_epoch(scores, p)
        out[f"early stop, patience {p}"] = (best, curve[best - 1]["dev"])
    best = max(range(len(curve)), key=lambda i: curve[i]["dev"])
    out["best epoch on dev (not a policy)"] = (best + 1, curve[best]["dev"])
    return out


def report(rows: dict) -> str:
    out = ["# Round policy: which epoch a round keeps (dev only)", "",
           "The downstream recipe (`quality.TRAIN`) on a selection of the cleaned lookup pool "
           "(2,000 candidates, ratio 0.1), scored on the 200 dev questions after every epoch; "
           "each policy's dev accuracy, mean ± s.d. over seeds, then each seed's (epoch kept). "
           "Written by `benchmarks/round_policy.py` from `round_policy.json`.", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows.values():
        groups.setdefault((r["gen"], r["selection"], r.get("recipe", "ce")), []).append(r)
    for (gen, sel, recipe), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        table = [policies(r["curve"]) for r in rs]
        loss = "" if recipe == "ce" else f", recipe {recipe} ({RECIPES[recipe]})"
        out += [f"### {gen} pool, {sel}{loss} (wrong labels: " + ", ".join(
            f"{r['wrong_label']:.2f}" for r in rs) + ")", "",
            "| policy | mean ± s.d. | " + " | ".join(f"seed {r['seed']}" for r in rs) + " |",
            "|---" * (len(rs) + 2) + "|"]
        for name in table[0]:
            accs = [t[name][1] for t in table]
            sd = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            out.append(f"| {name} | {statistics.mean(accs):.3f}{sd} | " + " | ".join(
                f"{t[name][1]:.3f} ({t[name][0]})" for t in table) + " |")
        out += ["", "Per epoch, dev / target accuracy:", "",
                "| epoch | " + " | ".join(f"seed {r['seed']}" for r in rs) + " |",
                "|---" * (len(rs) + 1) + "|"]
        for e in range(max(len(r["curve"]) for r in rs)):
            out.append(f"| {e + 1} | " + " | ".join(
                f"{r['curve'][e]['dev']:.3f} / {r['curve'][e]['target_accuracy']:.3f}"
                if e < len(r["curve"]) else "–" for r in rs) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generators", default="weak")
    ap.add_argument("--selections", default=",".join(SELECTIONS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default=os.path.join("runs", "quality"))
    ap.add_argument("--results", default=os.path.join(_HERE, "results", "round_policy.json"))
    ap.add_argument("--recipe", choices=tuple(RECIPES), default="ce",
                    help="training loss over quality.TRAIN: " + "; ".join(
                        f"{k}: {v or 'as is'}" for k, v in RECIPES.items()))
    ap.add_argument("--report", action="store_true", help="only rewrite the table")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.selections.split(",")) - set(SELECTIONS))
    if unknown:
        ap.error(f"--selections: unknown {', '.join(unknown)} (valid: {', '.join(SELECTIONS)})")
    cells = quality_cells.Cells(a.results, False, " ".join(
        ["python benchmarks/round_policy.py", *argv]) + f"  ({time.strftime('%Y-%m-%d')}, "
        f"{quality_cells.hardware()})")
    todo = [(g, s, int(seed)) for s in a.selections.split(",") for seed in a.seeds.split(",")
            for g in a.generators.split(",")
            if cell_key(g, s, int(seed), a.recipe) not in cells.rows]
    md = a.results.replace(".json", ".md")
    if not a.report and todo:
        for g in sorted({g for g, _, _ in todo}):  # pools written before the workers start
            quality_cells.task_files(a.work, "lookup", g, 2000)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(run_cell, a.work, a.model, g, s, seed, a.threads, a.recipe):
                       (g, s, seed) for g, s, seed in todo}
            for fut in cf.as_completed(futures):
                g, s, seed = futures[fut]
                cells.put(cell_key(g, s, seed, a.recipe), fut.result())
                with open(md, "w") as f:
                    f.write(report(cells.rows))
    with open(md, "w") as f:
        f.write(report(cells.rows))


if __name__ == "__main__":
    main()
