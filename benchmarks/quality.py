"""Quality benchmark: does selection pay off? Paper-style tables on built-in tasks.

    python benchmarks/quality.py --quick          # tiny-llama, small pools: a few minutes
    python benchmarks/quality.py                  # smollm2-135m, 2,000 candidates: hours, resumable
    python benchmarks/quality.py --layers quality # one layer only
    python benchmarks/quality.py --model M --dim 8192 --num-gpus 1 --pool-size 20000 \\
        --downstream-tasks all --downstream-ratios all     # the full grid, on a GPU

Three layers, each cell cached in ``--results`` (JSON, rewritten after every cell) so that a
stopped run resumes where it was; ``--force`` recomputes. The tables go to ``--out``
(``benchmarks/results/quality.md``, or ``quality_quick.md``) with PNG plots beside it.

* **Selection quality** (no training): for every task × generator, the simulated pool
  (``--pool-size`` candidates, then the evolve loop's cleaning: exact duplicates dropped) and the
  task's 40 targets are featurized once with the base model as proxy (a fresh LoRA); then every
  selector at every ratio picks from the same features,
  and :func:`evoray.tasks.score.selection_quality` scores the picks with the generator's ground
  truth (off-task, redundant duplicates, near-duplicate kind, wrong label, unique-correct,
  answer-letter total variation to the targets). Two reference rows read ``meta``:
  ``oracle_on_task`` (random among on-task candidates, one per question) and ``oracle_clean``
  (random among clean candidates). Selectors use their defaults (EvoSelect: λ = 0.25, 10 blocks,
  ε = τ = 0.01), except TSDS, which draws without replacement (``replace=False``) so that every
  row has the same budget of distinct candidates.
* **Downstream**: LoRA training in-process on each selection (the recipe ``TRAIN``, chosen on
  dev by ``benchmarks/recipe.py``), test accuracy on the task's 500 test questions, over
  ``--seeds`` (default 0-4; seed s is both the selector's and the training's seed of every
  method, so seeds pair across methods): mean ± standard error, and each method's paired
  difference to random with its 95% t-interval; plus the base model.
* **Evolution**: ``evoray.evolve`` for 2 rounds with EvoSelect and with the baseline that has
  the highest unique-correct share in the quality layer (weak generator, ratio 0.1); per round,
  the selection's wrong-label share against the pool's base rates. Round 2's proxy is the
  round-1 model. ``--evolution-generator strong`` runs it on the strong generator's pools.
* **Trained proxy** (``proxy``): the evolution layer's premise without round 1. The weak lookup
  pool is featurized again with a proxy that learned the task (the downstream layer's model
  trained on the clean oracle's picks, seed ``PROXY_SEED``), every selector and EvoSelect with
  each setting changed in turn (``PROXY_ABLATIONS``, also run on the base proxy's features at
  ratio 0.1 in the quality layer) pick at ratio 0.1, and the AUC of right over wrong labels is
  given for the selectors' scores. ``ADAM_ROWS``: EvoSelect and attribution on candidate
  gradients preconditioned with the trained proxy's Adam state (``features.adam``, as LESS does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
from quality_cells import Cells, evolve_cell, hardware, oracle_rows, task_files, train_cell
from quality_report import (
    ADAM_ROWS,
    GENERATORS,
    ORACLES,
    PROXY_ABLATIONS,
    SELECTORS,
    TASKS,
    write_report,
)

_HERE = os.path.dirname(os.path.abspath(__file__))

# The trained proxy: the downstream cell (lookup, weak, 0.1, oracle_clean) of this seed.
PROXY_SEED = 1
METHOD_SETTINGS = {"tsds": {"select.tsds.replace": False}}  # config overrides per method
RATIOS = (0.05, 0.1, 0.2)
LAYERS = ("quality", "downstream", "evolution", "proxy")
# The first recipe (8 epochs, linear decay to 0): its clean-only cells spread from .43 to .78 over
# seeds, because the decay ends training in the middle of its climb (benchmarks/results/recipe.md).
TRAIN_V1 = {"epochs": 8, "lr": 1e-3, "batch_size": 8, "max_length": 96, "lora_r": 16,
            "lora_alpha": 32.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"]}
# The recipe of the downstream and evolution layers, chosen on dev by clean-only training alone
# (benchmarks/recipe.py, `const-1e-3` at 16 epochs: recipe.md): a constant learning rate, no
# warm-up, no LoRA dropout.
TRAIN = {**TRAIN_V1, "epochs": 16, "schedule": "constant", "warmup_ratio": 0.0,
         "lora_dropout": 0.0}
QUICK = {"model": "tiny-llama", "pool_size": 200, "dim": 256, "seeds": [0, 1],
         "train": {**TRAIN, "epochs": 1, "lora_r": 8, "lora_alpha": 32.0,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}


class Bench:
    def __init__(self, args):
        self.a = args
        self.cells = Cells(args.results, args.force, " ".join(
            ["python benchmarks/quality.py", *args.argv]) + f"  ({time.strftime('%Y-%m-%d')}, "
            f"{args.hardware})")
        self._tasks: dict[tuple[str, str], dict] = {}
        self._features: dict[str, dict] = {}
        # the features stage's settings, shared by the quality layer and the evolve runs
        self.features_cfg = {"dim": args.dim, "max_length": 96, "threads": args.threads,
                             "num_gpus": args.num_gpus}

    # -- data and features ---------------------------------------------------------------------

    def task(self, task: str, gen: str) -> dict:
        """The task's files, its simulated pool and the pool after the evolve loop's cleaning
        (exact duplicates and questions of the targets, dev and test dropped); read once."""
        if (task, gen) not in self._tasks:
            self._tasks[task, gen] = self._task(task, gen)
        return self._tasks[task, gen]

    def _task(self, task: str, gen: str) -> dict:
        return task_files(self.a.work, task, gen, self.a.pool_size)

    def features(self, data: dict, adapter: str | None = None, tag: str = "",
                 adam: bool = False):
        """Features of pool and targets with the base model, or ``adapter``, as proxy (computed
        once; reused from disk on a rerun); ``adam``: the pool's gradients preconditioned with
        the adapter's Adam state (``features.adam``, as LESS does; targets stay plain)."""
        key = data["folder"] + tag + ("-adam" if adam else "")
        if key not in self._features:
            self._features[key] = self._featurize(data, adapter, tag, adam)
        return self._features[key]

    def _featurize(self, data: dict, adapter: str | None = None, tag: str = "",
                   adam: bool = False):
        from evoray.config import FeaturesConfig
        from evoray.data.features import read_features
        from evoray.features.stage import featurize

        cfg = FeaturesConfig(**self.features_cfg, batch_size=16, num_actors=1, num_cpus=1.0)
        out = {}
        for name, kind in (("pool", "candidate"), ("targets", "target")):
            state = adam and kind == "candidate"
            path = featurize(data[name], self.a.model, adapter, cfg, out=f"{data['folder']}/"
                             f"features-{name}-{self.a.model}-{self.a.dim}{tag}"
                             + ("-adam" if state else ""), kind=kind,
                             adam_state=f"{adapter}/adam_state.safetensors" if state else None)
            out[name] = read_features(path)
        # The raw pool is featurized (once per pool) and the rows of the candidates that
        # cleaning dropped are left out: a candidate's feature does not depend on the others
        # (up to 1e-6 from batch padding), so this is the cleaned pool's features.
        feats = out["pool"]
        by_id = {r["id"]: r for r in data["pool_records"]}
        keep = np.array([i in by_id for i in feats.ids])
        out["pool"] = dataclasses.replace(feats, ids=feats.ids[keep], X=feats.X[keep],
                                          rows=feats.rows[keep], grad_norm=feats.grad_norm[keep],
                                          loss=feats.loss[keep])
        out["records"] = [by_id[i] for i in out["pool"].ids]  # rows of the feature array
        return out

    # -- selection -----------------------------------------------------------------------------

    def pick(self, method: str, ratio: float, seed: int, f: dict, task: str,
             settings: dict | None = None):
        """Rows of ``f["records"]`` picked by ``method`` and how often each was drawn;
        ``settings``: config overrides (``{"select.lam": 0.0}``) on top of METHOD_SETTINGS."""
        from evoray.config import load_config
        from evoray.select.io import select_features

        if method in ORACLES:
            return oracle_rows(f["records"], method, task, ratio, seed), None
        over = {"select.method": method, "select.ratio": ratio, "select.seed": seed,
                **METHOD_SETTINGS.get(method, {}), **(settings or {})}
        cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()]).select
        # No content keys: the seeded selectors draw over the rows in pool-file order (the cells
        # were made so); `evoray select --pool` draws over content order: another sample of the
        # same distribution.
        _, sel = select_features(cfg, f["pool"], f["targets"])
        return sel.indices, sel.explain["count"].tolist()

    def quality(self) -> None:
        from evoray.tasks.score import pool_rates

        for task in self.a.tasks:
            for gen in self.a.generators:
                data = self.task(task, gen)
                self.cells.get(f"pool|{task}|{gen}", pool_rates, data["pool_records"], task)
                for ratio in self.a.ratios:
                    ablations = tuple(PROXY_ABLATIONS) if ratio == 0.1 else ()
                    for method in (*self.a.methods, *ablations):
                        self.cells.get(f"quality|{task}|{gen}|{ratio}|{method}",
                                       self._quality_cell, data, task, ratio, method)

    def _quality_cell(self, data: dict, task: str, ratio: float, method: str) -> dict:
        from evoray.tasks.score import selection_quality

        f = self.features(data)
        if method in PROXY_ABLATIONS:
            rows, counts = self.pick("evoselect", ratio, 0, f, task, PROXY_ABLATIONS[method])
        else:
            rows, counts = self.pick(method, ratio, 0, f, task)
        picks = [f["records"][i] for i in rows]
        return selection_quality(picks, data["target_records"], task, counts)

    # -- downstream ----------------------------------------------------------------------------

    def train_eval(self, records: list[dict], folder: str, seed: int, test: str) -> dict:
        """Train on ``records`` in this process and score the adapter on ``test``."""
        from evoray.data import write_records

        os.makedirs(folder, exist_ok=True)
        write_records(records, f"{folder}/selected.jsonl", "candidate")
        return train_cell(self.a.model, self.a.train, folder, seed, test, self.a.train_threads)

    def downstream(self) -> None:
        """Every missing cell's selection is made here, in seed order (so that a partial run has
        every method at the first seeds); the trainings run ``--jobs`` at a time in worker
        processes of ``--train-threads`` torch threads each, and each cell is stored as soon as
        it finishes. Every pool's features are computed (or read from disk) before the first
        training starts: computed beside the trainings, a pool's features took the CPU of a
        training worker that then sat idle, and finished cells waited in memory."""
        todo = []
        for task in self.a.downstream_tasks:
            self.cells.get(f"base|{task}", self._base_cell, self.task(task, "weak"))
            for seed in self.a.seeds:
                for gen in self.a.generators:
                    for ratio in self.a.downstream_ratios:
                        for method in self.a.methods:
                            key = f"down|{task}|{gen}|{ratio}|{method}|{seed}"
                            if self.a.force or key not in self.cells.rows:
                                todo.append((key, task, gen, ratio, method, seed))
        if not todo:
            return
        for task, gen in dict.fromkeys((t[1], t[2]) for t in todo if t[4] not in ORACLES):
            self.features(self.task(task, gen))
        import concurrent.futures as cf
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no forked copy of this process's Ray
        with cf.ProcessPoolExecutor(self.a.jobs, mp_context=ctx) as pool:
            futures = {}
            for key, task, gen, ratio, method, seed in todo:
                folder, extra = self._prepare_cell(task, gen, ratio, method, seed)
                fut = pool.submit(train_cell, self.a.model, self.a.train, folder, seed,
                                  self.task(task, gen)["test"], self.a.train_threads)
                futures[fut] = key, extra
            for fut in cf.as_completed(futures):
                key, extra = futures[fut]
                self.cells.put(key, {**fut.result(), **extra})
                write_report(self.a, self.cells.rows)

    def _base_cell(self, data: dict) -> dict:
        from evoray.train import evaluate

        m = evaluate(self.a.model, None, data["test"], max_length=96)
        return {"accuracy": m["accuracy"], "loss": m["loss"], "n_test": m["n"]}

    def _prepare_cell(self, task: str, gen: str, ratio: float, method: str, seed: int):
        """Write the cell's selection (a selector's picks, repeated as drawn) into its folder;
        the folder and the selection's quality figures. The oracles read no features."""
        from evoray.data import write_records
        from evoray.tasks.score import selection_quality

        data = self.task(task, gen)
        f = {"records": data["pool_records"]} if method in ORACLES else self.features(data)
        rows, counts = self.pick(method, ratio, seed, f, task)
        picks = [f["records"][i] for i, c in zip(rows, counts or [1] * len(rows), strict=True)
                 for _ in range(c)]
        folder = os.path.join(self.a.work, "downstream", task, gen, str(ratio), method,
                              str(seed))
        os.makedirs(folder, exist_ok=True)
        write_records(picks, f"{folder}/selected.jsonl", "candidate")
        q = selection_quality([f["records"][i] for i in rows], data["target_records"], task,
                              counts)
        return folder, {"selection": {k: q[k] for k in ("wrong_label", "unique_correct",
                                                        "off_task", "duplicate")}}

    # -- evolution -----------------------------------------------------------------------------

    def best_baseline(self, task: str) -> str:
        gen = "weak" if "weak" in self.a.generators else self.a.generators[0]
        scores = {m: self.cells.rows.get(f"quality|{task}|{gen}|0.1|{m}", {})
                  .get("unique_correct", -1) for m in SELECTORS if m != "evoselect"}
        return max(scores, key=scores.get)

    def evolution(self) -> None:
        task, gen = self.a.evolution_task, self.a.evolution_generator
        for method in ("evoselect", self.a.baseline or self.best_baseline(task)):
            self.cells.get(f"evo|{task}|{gen}|{method}", self._evolution_cell, task, gen, method)

    def _evolution_cell(self, task: str, gen: str, method: str) -> dict:
        run = os.path.join(self.a.work, "evolution", f"{task}-{gen}-{method}")
        over = {"model": self.a.model, "evolve.task": task, "evolve.rounds": 2,
                "evolve.run_dir": run, "generate.preset": gen,
                "generate.pool_size": self.a.evolution_pool_size, "select.method": method,
                "select.ratio": 0.1, **METHOD_SETTINGS.get(method, {}),
                **{f"features.{k}": v for k, v in self.features_cfg.items()},
                **{f"train.{k}": v for k, v in self.a.train.items()}}
        res, rounds = evolve_cell(over, task)
        return {"method": method, "base_accuracy": (res["base"] or {}).get("accuracy"),
                "rounds": rounds}

    # -- trained proxy -------------------------------------------------------------------------

    def proxy(self) -> None:
        """Could a trained proxy tell right labels from wrong ones? The evolution layer's premise,
        tested without depending on round 1: the proxy is the model the downstream layer trained
        on the clean oracle's selection (lookup, weak, ratio 0.1, seed ``PROXY_SEED``: a model
        that learned the task), the pool is the quality layer's weak pool, and every selector
        picks at ratio 0.1 from the features of that proxy. It is the ceiling of what round 2
        could do had round 1 learned. ``proxy-sep`` gives, among the pool's on-task
        candidates, the AUC with which a score ranks right labels above wrong ones (0.5 = blind):
        the attribution score (centred cosine to the mean target), EvoSelect's OT mass, and,
        outside every selector, the proxy's own loss on the candidate (lower = right)."""
        task, gen = self.a.evolution_task, "weak"
        data = self.task(task, gen)
        for method in SELECTORS + tuple(PROXY_ABLATIONS) + tuple(ADAM_ROWS):
            self.cells.get(f"proxy|{task}|{gen}|0.1|{method}", self._proxy_cell, data, task,
                           method)
        self.cells.get(f"proxy-sep|{task}|{gen}", self._proxy_separation, data, task)

    def proxy_features(self, data: dict, task: str, adam: bool = False) -> dict:
        """The pool's and targets' features under the trained proxy: the downstream cell's
        adapter when that layer kept it, else the same training again (same picks, same seed);
        ``adam``: candidates preconditioned with that training's Adam state."""
        gen = data["generator"]
        cell = f"down|{task}|{gen}|0.1|oracle_clean|{PROXY_SEED}"
        adapter = os.path.join(self.a.work, "downstream", task, gen, "0.1", "oracle_clean",
                               str(PROXY_SEED), "adapter")
        trained = self.cells.rows.get(cell)
        if trained is None or not os.path.exists(adapter):
            folder = os.path.join(self.a.work, "proxy", os.path.basename(data["folder"]))
            adapter = f"{folder}/adapter"
            if not os.path.exists(f"{folder}/proxy.json"):  # written last
                rows, _ = self.pick("oracle_clean", 0.1, PROXY_SEED,
                                    {"records": data["pool_records"]}, task)
                m = self.train_eval([data["pool_records"][i] for i in rows], folder, PROXY_SEED,
                                    data["test"])
                with open(f"{folder}/proxy.json", "w") as f:
                    json.dump(m, f)
            with open(f"{folder}/proxy.json") as f:
                trained = json.load(f)
        return {**self.features(data, adapter, f"-oracle-clean-{PROXY_SEED}", adam),
                "proxy": trained}

    def _proxy_cell(self, data: dict, task: str, method: str) -> dict:
        from evoray.tasks.score import selection_quality

        f = self.proxy_features(data, task, adam=method in ADAM_ROWS)
        if method in ADAM_ROWS:
            rows, counts = self.pick(ADAM_ROWS[method], 0.1, 0, f, task)
        elif method in PROXY_ABLATIONS:
            rows, counts = self.pick("evoselect", 0.1, 0, f, task, PROXY_ABLATIONS[method])
        else:
            rows, counts = self.pick(method, 0.1, 0, f, task)
        return {**selection_quality([f["records"][i] for i in rows], data["target_records"],
                                    task, counts), "proxy_accuracy": f["proxy"]["accuracy"]}

    def _proxy_separation(self, data: dict, task: str) -> dict:
        from evoray.config import SelectConfig
        from evoray.select.baselines import attribution_scores
        from evoray.select.io import select_features
        from evoray.tasks.score import separation_auc as auc

        f = self.proxy_features(data, task)
        G, V = f["pool"].X.astype(np.float64), f["targets"].X.astype(np.float64)
        mu = G.mean(axis=0)  # centred by the pool's mean feature
        attribution = attribution_scores(G - mu, V - mu)
        _, sel = select_features(SelectConfig(method="evoselect", ratio=0.1, seed=0),
                                 f["pool"], f["targets"])
        on = np.array([r["meta"]["task"] == task for r in f["records"]])
        right = np.array([r["response"] == r["meta"]["correct"] for r in f["records"]])
        scores = {"attribution": attribution, "ot_mass": np.asarray(sel.scores["alignment"], float),
                  "neg_loss": -f["pool"].loss.astype(np.float64)}
        return {"n_on_task": int(on.sum()), "wrong_on_task": float(1 - right[on].mean()),
                "proxy_accuracy": f["proxy"]["accuracy"],
                **{f"auc_{n}": auc(s[on & right], s[on & ~right]) for n, s in scores.items()}}


# -- report ------------------------------------------------------------------------------------

def _list(text: str, allowed, cast=str) -> list:
    if text == "all":
        return list(allowed)
    return [cast(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, small pools: minutes")
    ap.add_argument("--layers", default="quality,evolution,downstream,proxy",
                    help="comma-separated, run in this order: quality, downstream, evolution, "
                         "proxy; report = rewrite the tables from the cache only")
    ap.add_argument("--model", help="base model (default smollm2-135m; quick: tiny-llama)")
    ap.add_argument("--pool-size", type=int, help="candidates per pool (default 2000)")
    ap.add_argument("--dim", type=int, help="feature dimension (default 1024)")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs of the feature actor")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the feature actor")
    ap.add_argument("--tasks", default=",".join(TASKS), help="quality layer: task families")
    ap.add_argument("--generators", default=",".join(GENERATORS))
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--downstream-tasks", default="lookup", help="comma-separated or 'all'")
    ap.add_argument("--downstream-ratios", default="0.1", help="comma-separated or 'all'")
    ap.add_argument("--methods", default="all", help="rows of the quality and downstream "
                    f"layers, comma-separated or 'all' ({', '.join(SELECTORS + ORACLES)})")
    ap.add_argument("--seeds", help="downstream seeds (default 0-4; quick: 0,1)")
    ap.add_argument("--evolution-task", default="lookup")
    ap.add_argument("--evolution-generator", default="weak", choices=GENERATORS)
    ap.add_argument("--evolution-pool-size", type=int, help="candidates a round (default: "
                    "--pool-size)")
    ap.add_argument("--baseline", choices=SELECTORS[:-1],
                    help="evolution's baseline (default: the highest unique-correct share at "
                         "ratio 0.1, weak generator, in the quality layer)")
    ap.add_argument("--epochs", type=int, help="training epochs (default: TRAIN's)")
    ap.add_argument("--jobs", type=int, default=2, help="downstream trainings at once, each in "
                    "a worker process (2 one-thread trainings use both cores of a 2-core machine)")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads per training")
    ap.add_argument("--work", help="pools, features, adapters (default runs/quality[_quick])")
    ap.add_argument("--results",
                    help="cell cache (default benchmarks/results/quality[_quick].json)")
    ap.add_argument("--out", help="tables (default benchmarks/results/quality[_quick].md)")
    ap.add_argument("--force", action="store_true", help="recompute cached cells")
    args = ap.parse_args(argv)
    args.argv = argv
    q = QUICK if args.quick else {}
    suffix = "_quick" if args.quick else ""
    args.model = args.model or q.get("model", "smollm2-135m")
    args.pool_size = args.pool_size or q.get("pool_size", 2000)
    args.dim = args.dim or q.get("dim", 1024)
    args.evolution_pool_size = args.evolution_pool_size or args.pool_size
    args.train = dict(q.get("train", TRAIN))
    if args.epochs:
        args.train["epochs"] = args.epochs
    args.tasks = _list(args.tasks, TASKS)
    args.generators = _list(args.generators, GENERATORS)
    args.ratios = _list(args.ratios, RATIOS, float)
    args.methods = _list(args.methods, SELECTORS + ORACLES)
    unknown = sorted(set(args.methods) - set(SELECTORS + ORACLES))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)} (valid: "
                 f"{', '.join(SELECTORS + ORACLES)})")
    args.downstream_tasks = _list(args.downstream_tasks, args.tasks)
    args.downstream_ratios = _list(args.downstream_ratios, args.ratios, float)
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else q.get("seeds",
                                                                                   [0, 1, 2, 3, 4])
    results = os.path.join(_HERE, "results")
    args.work = args.work or os.path.join("runs", f"quality{suffix}")
    args.results = args.results or os.path.join(results, f"quality{suffix}.json")
    args.out = args.out or os.path.join(results, f"quality{suffix}.md")
    args.hardware = hardware()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    bench = Bench(args)
    t0 = time.perf_counter()
    for layer in _list(args.layers, LAYERS):
        if layer not in LAYERS + ("report",):
            ap.error(f"--layers: unknown layer {layer!r} ({', '.join(LAYERS)}, "
                     "report = only rewrite the tables from the cache)")
        if layer != "report":
            getattr(bench, layer)()
        write_report(args, bench.cells.rows)
    print(f"[quality] done in {time.perf_counter() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
