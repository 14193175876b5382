"""The quality benchmark's cells: the task files and pools, the oracles' picks, one training
and its test score (module level, so that a worker process can run it), and the cache of
finished cells. Shared by ``benchmarks/quality.py`` and ``benchmarks/recipe.py``."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def hardware() -> str:
    """The machine a cell ran on: the GPU's name, or the CPU's core count, architecture and model
    name (the same 2-core machine type ran the demo's bfloat16 training at 11.6 samples/s one day
    and 6.6 the next; here the virtual machine names only the vendor, "AMD EPYC")."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    return f"CPU only, {os.cpu_count()} cores ({platform.machine()}, {model})"


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
    return {**paths, "folder": folder, "generator": gen,
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


def evolve_cell(overrides: dict, task: str) -> tuple[dict, list[dict]]:
    """Run ``evoray.evolve`` on a config of ``{"dotted.key": value}`` overrides (resumed when its
    run folder holds a manifest) and score each round: ``(evolve's result, [{"round",
    "accuracy", "pool": pool_rates, "selection": selection_quality}])``."""
    from evoray.config import load_config
    from evoray.data import read_records
    from evoray.evolve import evolve, round_dir
    from evoray.tasks.score import pool_rates, selection_quality

    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    run = cfg.evolve.run_dir
    res = evolve(cfg, resume=os.path.exists(f"{run}/manifest.json"), progress=False)
    targets = read_records(f"{run}/task/targets.jsonl", "target")
    rounds = []
    for r, m in enumerate(res["rounds"], 1):
        rd = round_dir(run, r)
        picks = read_records(f"{rd}/selection/selected.jsonl", "candidate")
        rounds.append({"round": r, "accuracy": m.get("accuracy"),
                       "pool": pool_rates(read_records(f"{rd}/clean.jsonl", "candidate"), task),
                       "selection": selection_quality(picks, targets, task)})
    return res, rounds


def train_cell(model: str, train: dict, folder: str, seed: int, test: str, threads: int) -> dict:
    """Train on ``folder/selected.jsonl`` with ``train`` (TrainConfig settings) and ``seed``, in
    local mode with ``threads`` torch threads, and score ``folder/adapter`` on ``test``. Module
    level, so that a worker process can run it."""
    import torch

    from evoray.config import TrainConfig
    from evoray.train import evaluate
    from evoray.train import train as fit

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    res = fit(f"{folder}/selected.jsonl", model, cfg=TrainConfig(**train, seed=seed),
              out=f"{folder}/adapter")
    m = evaluate(model, res.adapter, test, max_length=96)
    return {"accuracy": m["accuracy"], "loss": m["loss"], "n_test": m["n"],
            "train_loss": float(res.history[-1]), "examples": res.n_examples,
            "threads": threads, "train": train, "seconds": round(time.perf_counter() - t0, 1)}


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
