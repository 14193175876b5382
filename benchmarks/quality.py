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
* **Downstream**: LoRA training in-process on each selection (fixed settings: ``TRAIN``), test
  accuracy on the task's 500 test questions, mean and sample s.d. over ``--seeds`` (the seed of
  both the selector and training), plus the base model.
* **Evolution**: ``evoray.evolve`` for 2 rounds with EvoSelect and with the baseline that has
  the highest unique-correct share in the quality layer (weak generator, ratio 0.1); per round,
  the selection's wrong-label share against the pool's base rates. Round 2's proxy is the
  round-1 model. ``--evolution-generator strong`` runs it on the strong generator's pools.
* **Trained proxy** (``proxy``): the evolution layer's premise without round 1. The weak lookup
  pool is featurized again with a proxy that learned the task (the model trained on the clean
  oracle's picks), every selector and two EvoSelect ablations (``PROXY_ABLATIONS``) pick at
  ratio 0.1, and the AUC of right over wrong labels is given for the selectors' scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))

SELECTORS = ("random", "attribution", "diversity", "attr_div", "tsds", "evoselect")
ORACLES = ("oracle_on_task", "oracle_clean")
METHOD_SETTINGS = {"tsds": {"select.tsds.replace": False}}  # config overrides per method
RATIOS = (0.05, 0.1, 0.2)
# EvoSelect with one setting changed, in the trained-proxy layer only: which part of it costs
# picks once the proxy can rank labels (the diversity term; the residual novelty).
PROXY_ABLATIONS = {"evoselect lam=0": {"select.lam": 0.0},
                   "evoselect novelty_pcs=0": {"select.evoselect.novelty_pcs": 0}}
LAYERS = ("quality", "downstream", "evolution", "proxy")
GENERATORS = ("weak", "strong")
TASKS = ("lookup", "arithmetic")
# Fixed training settings of the downstream and evolution layers (smollm2-135m learns `lookup`
# with these; benchmarks/results/train.json): all attention and MLP projections, r = 16.
TRAIN_V1 = {"epochs": 8, "lr": 1e-3, "batch_size": 8, "max_length": 96, "lora_r": 16,
         "lora_alpha": 32.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"]}
TRAIN = TRAIN_V1
QUICK = {"model": "tiny-llama", "pool_size": 200, "dim": 256, "seeds": [0, 1],
         "train": {**TRAIN, "epochs": 1, "lora_r": 8, "lora_alpha": 32.0,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
QUALITY_METRICS = (("off_task", "off-task share"), ("duplicate", "redundant duplicate share"),
                   ("near_duplicate_kind", "near-duplicate (kind) share"),
                   ("wrong_label", "wrong-label share"), ("unique_correct", "unique-correct share"),
                   ("letter_tv", "letter TV distance to the targets"))


def task_files(work: str, task: str, gen: str, pool_size: int) -> dict:
    """The task's files under ``work``, its simulated pool (``write_task(task, seed=0)``) and the
    pool after the evolve loop's cleaning (exact duplicates and questions of the targets, dev and
    test dropped), written on first use; with the cleaned pool and the targets read."""
    from evoray.data import read_records
    from evoray.stages import clean_pool, eval_prompts
    from evoray.tasks import write_task

    folder = os.path.join(work, f"{task}-{gen}-{pool_size}")
    if not os.path.exists(f"{folder}/task.json"):  # written last
        write_task(task, folder, pool_size=pool_size, generator=gen, seed=0)
    paths = {n: f"{folder}/{n}.jsonl" for n in ("pool", "clean", "targets", "dev", "test")}
    if not os.path.exists(paths["clean"]):
        prompts = eval_prompts(*(read_records(paths[name], kind) for name, kind in
                                 (("targets", "target"), ("dev", "mcq"), ("test", "mcq"))))
        clean_pool(paths["pool"], paths["clean"], prompts)
    return {**paths, "folder": folder,
            "pool_records": read_records(paths["clean"], "candidate"),
            "target_records": read_records(paths["targets"], "target")}


def oracle_rows(records: list[dict], method: str, task: str, ratio: float, seed: int):
    """The reference rows, read from the generator's ``meta``: random among on-task
    (``oracle_on_task``) or clean (``oracle_clean``) candidates, one per question (the first
    such candidate of each question in pool order), as many as the ratio's budget allows."""
    from evoray.select.api import budget

    seen, rows = set(), []
    for i, r in enumerate(records):
        m = r["meta"]
        ok = m["kind"] == "clean" if method == "oracle_clean" else m["task"] == task
        if ok and m["qkey"] not in seen:
            seen.add(m["qkey"])
            rows.append(i)
    k = budget(len(records), ratio=ratio)
    return np.random.default_rng(seed).choice(rows, size=min(k, len(rows)), replace=False)


def train_cell(model: str, train: dict, folder: str, seed: int, test: str, threads: int) -> dict:
    """Train on ``folder/selected.jsonl`` with ``train`` (TrainConfig settings) and ``seed``, in
    local mode with ``threads`` torch threads, and score ``folder/adapter`` on ``test``. Module
    level, so that a worker process can run it."""
    import torch

    from evoray.config import TrainConfig
    from evoray.train import evaluate
    from evoray.train import train as fit

    torch.set_num_threads(threads)
    res = fit(f"{folder}/selected.jsonl", model, cfg=TrainConfig(**train, seed=seed),
              out=f"{folder}/adapter")
    m = evaluate(model, res.adapter, test, max_length=96)
    return {"accuracy": m["accuracy"], "loss": m["loss"], "n_test": m["n"],
            "train_loss": float(res.history[-1]), "examples": res.n_examples,
            "threads": threads, "train": train}


class Cells:
    """The cache of finished cells: ``{key: row}`` in a JSON file rewritten after each cell."""

    def __init__(self, path: str, force: bool, cmd: str):
        self.path, self.force, self.done, self.cmd = path, force, set(), cmd
        self.rows = json.load(open(path))["cells"] if os.path.exists(path) else {}

    def get(self, key: str, fn, *args):
        """The cached row of ``key``, else ``fn(*args)``, stored with its seconds (``force``:
        every key is computed once in this run)."""
        if key not in self.done and (self.force or key not in self.rows):
            t0 = time.perf_counter()
            row = fn(*args)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            self.put(key, row)
        return self.rows[key]

    def put(self, key: str, row: dict) -> None:
        """Store ``row`` (with the command, date and hardware) and rewrite the file at once."""
        row["cmd"] = self.cmd
        if os.path.exists(self.path):  # keep cells another run wrote meanwhile
            self.rows = {**json.load(open(self.path))["cells"], **self.rows}
        self.rows[key] = row
        self.done.add(key)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"cells": self.rows}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        print(f"[quality] {key}: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            if not isinstance(v, dict | list)), flush=True)


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

    def features(self, data: dict, adapter: str | None = None, tag: str = ""):
        """Features of pool and targets with the base model, or ``adapter``, as proxy (computed
        once; reused from disk on a rerun)."""
        key = data["folder"] + tag
        if key not in self._features:
            self._features[key] = self._featurize(data, adapter, tag)
        return self._features[key]

    def _featurize(self, data: dict, adapter: str | None = None, tag: str = ""):
        from evoray.config import FeaturesConfig
        from evoray.data.features import read_features
        from evoray.features.stage import featurize

        cfg = FeaturesConfig(**self.features_cfg, batch_size=16, num_actors=1, num_cpus=1.0)
        out = {}
        for name, kind in (("pool", "candidate"), ("targets", "target")):
            path = featurize(data[name], self.a.model, adapter, cfg, out=f"{data['folder']}/"
                             f"features-{name}-{self.a.model}-{self.a.dim}{tag}", kind=kind)
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
                    for method in self.a.methods:
                        self.cells.get(f"quality|{task}|{gen}|{ratio}|{method}",
                                       self._quality_cell, data, task, ratio, method)

    def _quality_cell(self, data: dict, task: str, ratio: float, method: str) -> dict:
        from evoray.tasks.score import selection_quality

        f = self.features(data)
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
        it finishes."""
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
        from evoray.config import load_config
        from evoray.data import read_records
        from evoray.evolve import evolve, round_dir
        from evoray.tasks.score import pool_rates, selection_quality

        run = os.path.join(self.a.work, "evolution", f"{task}-{gen}-{method}")
        over = {"model": self.a.model, "evolve.task": task, "evolve.rounds": 2,
                "evolve.run_dir": run, "generate.preset": gen,
                "generate.pool_size": self.a.evolution_pool_size, "select.method": method,
                "select.ratio": 0.1, **METHOD_SETTINGS.get(method, {}),
                **{f"features.{k}": v for k, v in self.features_cfg.items()},
                **{f"train.{k}": v for k, v in self.a.train.items()}}
        cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])
        res = evolve(cfg, resume=os.path.exists(f"{run}/manifest.json"), progress=False)
        targets = read_records(f"{run}/task/targets.jsonl", "target")
        rounds = []
        for r, m in enumerate(res["rounds"], 1):
            rd = round_dir(run, r)
            picks = read_records(f"{rd}/selection/selected.jsonl", "candidate")
            rounds.append({"round": r, "accuracy": m.get("accuracy"),
                           "pool": pool_rates(read_records(f"{rd}/clean.jsonl", "candidate"),
                                              task),
                           "selection": selection_quality(picks, targets, task)})
        return {"method": method, "base_accuracy": (res["base"] or {}).get("accuracy"),
                "rounds": rounds}

    # -- trained proxy -------------------------------------------------------------------------

    def proxy(self) -> None:
        """Could a trained proxy tell right labels from wrong ones? The evolution layer's premise,
        tested without depending on round 1: the proxy is the model trained on the clean
        oracle's selection (the downstream cell oracle_clean, weak, ratio 0.1, seed 0: a model
        that learned the task), the pool is the quality layer's weak pool, and every selector
        picks at ratio 0.1 from the features of that proxy. It is the ceiling of what round 2
        could do had round 1 learned. ``proxy-sep`` gives, among the pool's on-task
        candidates, the AUC with which a score ranks right labels above wrong ones (0.5 = blind):
        the attribution score (centred cosine to the mean target), EvoSelect's OT mass, and,
        outside every selector, the proxy's own loss on the candidate (lower = right)."""
        task, gen = self.a.evolution_task, "weak"
        data = self.task(task, gen)
        for method in SELECTORS + tuple(PROXY_ABLATIONS):
            self.cells.get(f"proxy|{task}|{gen}|0.1|{method}", self._proxy_cell, data, task,
                           method)
        self.cells.get(f"proxy-sep|{task}|{gen}", self._proxy_separation, data, task)

    def proxy_features(self, data: dict, task: str) -> dict:
        folder = os.path.join(self.a.work, "proxy", os.path.basename(data["folder"]))
        if not os.path.exists(f"{folder}/proxy.json"):  # written last
            rows, _ = self.pick("oracle_clean", 0.1, 0, {"records": data["pool_records"]}, task)
            m = self.train_eval([data["pool_records"][i] for i in rows], folder, 0, data["test"])
            with open(f"{folder}/proxy.json", "w") as f:
                json.dump(m, f)
        with open(f"{folder}/proxy.json") as f:
            trained = json.load(f)
        return {**self.features(data, f"{folder}/adapter", "-oracle-clean-proxy"),
                "proxy": trained}

    def _proxy_cell(self, data: dict, task: str, method: str) -> dict:
        from evoray.tasks.score import selection_quality

        f = self.proxy_features(data, task)
        if method in PROXY_ABLATIONS:
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
        mu = G.mean(axis=0)  # centred as EvoSelect centres
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

def _cols(args) -> list[tuple[str, float]]:
    return [(g, r) for g in args.generators for r in args.ratios]


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary_table(rows: dict, task: str, gen: str, ratio: float) -> list[str]:
    """Every quality metric of every method in one cell (task, generator, ratio)."""
    pool = rows.get(f"pool|{task}|{gen}")
    if pool is None:
        return []
    lines = [f"### {task}, {gen} generator, ratio {ratio}: all metrics", "",
             "| method | " + " | ".join(t for _, t in QUALITY_METRICS) + " |",
             "|---" * (len(QUALITY_METRICS) + 1) + "|"]
    for method in SELECTORS + ORACLES:
        c = rows.get(f"quality|{task}|{gen}|{ratio}|{method}")
        if c:
            lines.append(f"| {method} | " + " | ".join(_fmt(c[k]) for k, _ in QUALITY_METRICS)
                         + " |")
    lines.append(f"| *pool (N = {pool['n']})* | {_fmt(pool['off_task'])} | – | "
                 f"{_fmt(pool['near_duplicate_kind'])} | {_fmt(pool['wrong_label'])} "
                 f"(on-task {_fmt(pool['on_task_wrong'])}) | "
                 f"{_fmt(pool['unique_correct_on_task'])} (on-task) | – |")
    return lines


def report(args, rows: dict) -> str:
    cmds: dict[str, set[str]] = {}
    for key, row in rows.items():
        cmds.setdefault(row.get("cmd", "?"), set()).add(key.split("|")[0])
    out = [f"# Quality benchmark ({'quick' if args.quick else 'full'} mode)", "",
           f"Model {args.model}, features dim {args.dim} (base model + fresh LoRA as proxy), "
           f"pools of {args.pool_size} candidates before cleaning. Every number comes from "
           f"`{os.path.relpath(args.results)}`, written by these runs (cell kinds in brackets):",
           ""] + [f"* `{c}` [{', '.join(sorted(k))}]" for c, k in sorted(cmds.items())] + [""]
    out += ["## Selection quality (no training)", "",
            "Shares of the k = ratio × N picks (see `evoray/tasks/score.py`). `pool` rows are the "
            "pool's base rates; `on-task base` is the wrong-label share among distinct on-task "
            "questions, what a selector blind to labels gets once it keeps only on-task, "
            "distinct questions.", ""]
    cols = _cols(args)
    for task in args.tasks:
        for g in args.generators:
            out += summary_table(rows, task, g, 0.1) + [""]
    for task in args.tasks:
        for key, title in QUALITY_METRICS:
            head = "| method | " + " | ".join(f"{g} {r}" for g, r in cols) + " |"
            lines = [f"### {task}: {title}", "", head, "|---" * (len(cols) + 1) + "|"]
            for method in SELECTORS + ORACLES:
                cells = [rows.get(f"quality|{task}|{g}|{r}|{method}", {}).get(key) for g, r in cols]
                if all(c is None for c in cells):
                    continue
                lines.append(f"| {method} | " + " | ".join(_fmt(c) for c in cells) + " |")
            pool_key = {"wrong_label": "wrong_label", "off_task": "off_task",
                        "near_duplicate_kind": "near_duplicate_kind",
                        "unique_correct": "unique_correct_on_task"}.get(key)
            if pool_key:
                lines.append("| *pool* | " + " | ".join(_fmt(rows.get(f"pool|{task}|{g}", {})
                                                            .get(pool_key)) for g, _ in cols)
                             + " |")
            if key == "wrong_label":
                lines.append("| *on-task base* | " + " | ".join(
                    _fmt(rows.get(f"pool|{task}|{g}", {}).get("on_task_wrong")) for g, _ in cols)
                    + " |")
            out += lines + [""]
    out += downstream_tables(args, rows)
    if any(k.startswith("evo|") for k in rows):
        out += ["## Evolution: 2 rounds of `evoray evolve` (ratio 0.1)", "",
                f"Task {args.evolution_task}; round 2's proxy is the round-1 model.", "",
                "| generator | method | round | test acc | wrong-label | pool base | "
                "on-task base | off-task | duplicate | unique-correct | letter TV |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        order = {g: i for i, g in enumerate(GENERATORS)}
        for key in sorted((k for k in rows if k.startswith("evo|")),
                          key=lambda k: (order.get(k.split("|")[2], 9), k)):
            e, gen = rows[key], key.split("|")[2]
            for r in e["rounds"]:
                s, p = r["selection"], r["pool"]
                out.append(f"| {gen} | {e['method']} | {r['round']} | {_fmt(r['accuracy'])} | "
                           f"{_fmt(s['wrong_label'])} | {_fmt(p['wrong_label'])} | "
                           f"{_fmt(p['on_task_wrong'])} | {_fmt(s['off_task'])} | "
                           f"{_fmt(s['duplicate'])} | {_fmt(s['unique_correct'])} | "
                           f"{_fmt(s['letter_tv'])} |")
        out.append("")
    out += proxy_tables(args, rows)
    return "\n".join(out)


def paired(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences ``x - y`` and its two-sided 95% t-interval
    (``len - 1`` degrees of freedom)."""
    from scipy import stats

    d = [x - y for x, y in zip(xs, ys, strict=True)]
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return statistics.mean(d), statistics.mean(d) - half, statistics.mean(d) + half


def downstream_tables(args, rows: dict) -> list[str]:
    """Per task: each method's test accuracy (mean ± standard error over the seeds) and its
    paired difference to random (seed s of both shares the selection and training seed) with a
    95% t-interval; an interval that excludes 0 is marked significant."""
    out = ["## Downstream: test accuracy after LoRA training on the selection", "",
           f"Training in-process with the recipe {json.dumps(args.train)}; seeds "
           f"{args.seeds} (seed s is both the selector's and the training's seed for every "
           "method). Each cell: mean ± standard error over the seeds, then the paired "
           "difference to random, mean [95% t-interval]; **bold** = the interval excludes 0.", ""]
    for task in args.downstream_tasks:
        dcols = [(g, r) for g in args.generators for r in args.downstream_ratios]
        base = rows.get(f"base|{task}")
        lines = [f"### {task}" + (f" (base model: {base['accuracy']:.3f})" if base else ""), "",
                 "| method | " + " | ".join(f"{g} {r} | Δ random" for g, r in dcols) + " |",
                 "|---" * (2 * len(dcols) + 1) + "|"]
        per_seed = []
        for method in SELECTORS + ORACLES:
            cells, shown = [], False
            for g, r in dcols:
                acc = {s: rows[k]["accuracy"] for s in args.seeds
                       if (k := f"down|{task}|{g}|{r}|{method}|{s}") in rows}
                ref = {s: rows[k]["accuracy"] for s in args.seeds
                       if (k := f"down|{task}|{g}|{r}|random|{s}") in rows}
                if not acc:
                    cells += ["–", "–"]
                    continue
                shown = True
                v = list(acc.values())
                se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
                cells.append(f"{statistics.mean(v):.3f} ± {se:.3f} (n={len(v)})")
                both = sorted(set(acc) & set(ref))
                if method == "random" or len(both) < 2:
                    cells.append("–")
                else:
                    m, lo, hi = paired([acc[s] for s in both], [ref[s] for s in both])
                    text = f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                    cells.append(f"**{text}**" if lo > 0 or hi < 0 else text)
                per_seed.append(f"| {method} | {g} {r} | " + " | ".join(
                    f"{acc[s]:.3f}" if s in acc else "–" for s in args.seeds) + " |")
            if shown:
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        out += lines + ["", f"Test accuracy of each seed ({task}):", "",
                        "| method | pool | " + " | ".join(f"seed {s}" for s in args.seeds)
                        + " |", "|---" * (len(args.seeds) + 2) + "|"] + per_seed + [""]
    return out


def proxy_tables(args, rows: dict) -> list[str]:
    """The trained-proxy layer (``Bench.proxy``): selection quality and label separation."""
    out = []
    for key in sorted(k for k in rows if k.startswith("proxy-sep|")):
        _, task, gen = key.split("|")
        sep = rows[key]
        out += [f"## Trained proxy: could round 2 tell right labels from wrong? ({task}, {gen} "
                "generator, ratio 0.1)", "",
                "The same pool as the selection-quality layer, featurized with the model trained "
                f"on the clean oracle's selection as proxy (test accuracy "
                f"{_fmt(sep['proxy_accuracy'])}; base model as proxy: the quality layer). "
                "AUC = probability that a right-label on-task candidate scores above a "
                f"wrong-label one ({sep['n_on_task']} on-task candidates, "
                f"{_fmt(sep['wrong_on_task'])} wrong; 0.5 = blind to labels):", "",
                "| score | AUC right over wrong |", "|---|---:|",
                f"| attribution (centred cosine to the mean target) | "
                f"{_fmt(sep['auc_attribution'])} |",
                f"| EvoSelect OT mass (first block) | {_fmt(sep['auc_ot_mass'])} |",
                f"| proxy's loss on the candidate (lower = right; no selector uses it) | "
                f"{_fmt(sep['auc_neg_loss'])} |", "",
                "| method | proxy | off-task | duplicate | wrong-label | unique-correct | "
                "letter TV |", "|---|---|---:|---:|---:|---:|---:|"]
        for method in SELECTORS + tuple(PROXY_ABLATIONS):
            for proxy, k in (("base", f"quality|{task}|{gen}|0.1|{method}"),
                             ("trained", f"proxy|{task}|{gen}|0.1|{method}")):
                if k in rows:
                    r = rows[k]
                    out.append(f"| {method} | {proxy} | {_fmt(r['off_task'])} | "
                               f"{_fmt(r['duplicate'])} | {_fmt(r['wrong_label'])} | "
                               f"{_fmt(r['unique_correct'])} | {_fmt(r['letter_tv'])} |")
        p = rows.get(f"pool|{task}|{gen}", {})
        out += [f"| *pool* | | {_fmt(p.get('off_task'))} | – | {_fmt(p.get('wrong_label'))} "
                f"(on-task {_fmt(p.get('on_task_wrong'))}) | – | – |", ""]
    return out


def plots(args, rows: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    specs = [("unique_correct", "quality", args.tasks, args.ratios, "unique-correct share"),
             ("accuracy", "down", args.downstream_tasks, args.downstream_ratios, "test accuracy")]
    for metric, layer, tasks, ratios, label in specs:
        for task in tasks:
            fig, axes = plt.subplots(1, len(args.generators), figsize=(5 * len(args.generators), 4),
                                     squeeze=False)
            drawn = False
            for ax, g in zip(axes[0], args.generators, strict=True):
                for method in SELECTORS + ORACLES:
                    xs, ys = [], []
                    for r in ratios:
                        if layer == "quality":
                            v = rows.get(f"quality|{task}|{g}|{r}|{method}", {}).get(metric)
                        else:
                            vs = [rows[k][metric] for s in args.seeds
                                  if (k := f"down|{task}|{g}|{r}|{method}|{s}") in rows]
                            v = statistics.mean(vs) if vs else None
                        if v is not None:
                            xs.append(r)
                            ys.append(v)
                    if xs:
                        drawn = True
                        ax.plot(xs, ys, marker="o", label=method,
                                linestyle="--" if method in ORACLES else "-")
                if layer == "down" and f"base|{task}" in rows:
                    ax.axhline(rows[f"base|{task}"]["accuracy"], color="grey", lw=0.8,
                               label="base model")
                ax.set(title=f"{task}, {g} generator", xlabel="selection ratio", ylabel=label)
            if drawn:
                axes[0][-1].legend(fontsize=7)
                name = f"quality_{'quick_' if args.quick else ''}{layer}_{task}.png"
                fig.tight_layout()
                fig.savefig(os.path.join(folder, name), dpi=90)
                made.append(name)
            plt.close(fig)
    return made


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
    ap.add_argument("--seeds", help="downstream seeds (default 0,1,2; quick: 0,1)")
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
                                                                                   [0, 1, 2])
    results = os.path.join(_HERE, "results")
    args.work = args.work or os.path.join("runs", f"quality{suffix}")
    args.results = args.results or os.path.join(results, f"quality{suffix}.json")
    args.out = args.out or os.path.join(results, f"quality{suffix}.md")
    import platform

    import torch

    args.hardware = (f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else
                     f"CPU only, {os.cpu_count()} cores ({platform.machine()})")
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


def report_grid(args, rows: dict):
    """``args`` with its grid widened to every cell in the cache, so that a run restricted to
    some cells (``--generators weak --seeds 0``) still renders all the finished ones."""
    def union(ours, found, order=()):  # canonical order first, then the others sorted
        merged = set(ours) | set(found)
        return [x for x in order if x in merged] + sorted(merged - set(order))

    keys = [k.split("|") for k in rows]
    quality = [k for k in keys if k[0] == "quality"]
    down = [k for k in keys if k[0] == "down"]
    return argparse.Namespace(**{
        **vars(args),
        "tasks": union(args.tasks, [k[1] for k in quality], TASKS),
        "generators": union(args.generators, [k[2] for k in quality + down], GENERATORS),
        "ratios": union(args.ratios, [float(k[3]) for k in quality]),
        "downstream_tasks": union(args.downstream_tasks, [k[1] for k in down], TASKS),
        "downstream_ratios": union(args.downstream_ratios, [float(k[3]) for k in down]),
        "seeds": union(args.seeds, [int(k[5]) for k in down])})


def write_report(args, rows: dict) -> None:
    args = report_grid(args, rows)
    folder = os.path.dirname(args.out) or "."
    text = report(args, rows)
    names = plots(args, rows, folder)
    text += "\n" + "\n".join(f"![{n}]({n})" for n in names) + "\n"
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
