"""Training throughput: the Ray Train loop (1 worker) beside a plain PyTorch loop, one run.

    python benchmarks/train.py                          # tiny-llama, 120 steps of 8, 3 repeats
    python benchmarks/train.py --model smollm2-135m --steps 20 --threads 4
    python benchmarks/train.py --learn --model smollm2-135m --task compare   # accuracy gain
    python benchmarks/train.py --learn --model smollm2-135m --task compare --lr 3e-3 \
        --epochs 5 --target-modules all --lora-r 16 --n-test 200 --threads 2

Both loops train the same fresh LoRA of the same model on the same tokenized examples (a
built-in task's train split) with the same batch size, AdamW and response-only loss, on the same
number of CPU threads. The Ray figure is the worker's own samples/s from its first step to its
last report (``samples_per_s``), with no checkpoint in between (the steps fit in one epoch); the
start-up cost (Ray Train controller, worker group, model load, final checkpoint) is the fit's wall
time minus that training time, reported separately. The two loops run ``--repeats`` times,
interleaved, and the medians are compared. Ray must not be running already. Results are
appended to ``benchmarks/results/train.json``.

``--learn`` measures what training buys instead: test accuracy of the base model, then of the
model after LoRA training (in-process) on the first ``--n-learn`` clean examples of the task's
train split, evaluated on the first ``--n-test`` questions of the test split (all 500 by default).
``--lr``, ``--epochs``, ``--batch-size``, ``--lora-r``, ``--lora-alpha`` and ``--target-modules``
(comma-separated, or ``all`` = attention and MLP projections) set the training; every setting is
recorded in the appended row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter

RESULTS = os.path.join(os.path.dirname(__file__), "results", "train.json")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _data(task: str, n: int, folder: str) -> str:
    from evoray.data import read_records, write_records
    from evoray.tasks import write_task

    paths = write_task(task, folder, pool_size=20, seed=0)
    path = os.path.join(folder, "train_n.jsonl")
    write_records(read_records(paths["train"], "candidate")[:n], path, "candidate")
    return path


def plain_loop(path: str, model_spec: str, cfg, steps: int) -> float:
    """Samples/s of a plain PyTorch loop (model load excluded)."""
    import numpy as np
    import torch

    from evoray.data import collate, encode_pairs, read_records
    from evoray.lora import fresh_adapter
    from evoray.models import load_model

    torch.manual_seed(cfg.seed)
    model, tok = load_model(model_spec)
    model = fresh_adapter(model, cfg, cfg.seed)
    rows, _ = encode_pairs(tok, read_records(path, "candidate"), cfg.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    model.train()
    t0 = time.perf_counter()
    for s in range(steps):
        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        loss = model(**collate([rows[i] for i in idx], tok.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def learn(args) -> None:
    """Test accuracy of the base model and after LoRA training on ``--n-learn`` clean examples."""
    import torch

    from evoray.config import TrainConfig
    from evoray.data import read_records, write_records
    from evoray.tasks import write_task
    from evoray.train import evaluate, train

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_task(args.task, tmp, pool_size=20, seed=0)
        clean = [r for r in read_records(paths["train"], "candidate")
                 if r.get("meta", {}).get("kind", "clean") == "clean"][:args.n_learn]
        path = os.path.join(tmp, "clean.jsonl")
        write_records(clean, path, "candidate")
        test = os.path.join(tmp, "test_n.jsonl")
        write_records(read_records(paths["test"], "mcq")[:args.n_test], test, "mcq")
        modules = ALL_LINEAR if args.target_modules == "all" else args.target_modules.split(",")
        t0 = time.perf_counter()
        base = evaluate(args.model, None, test, max_length=256)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          max_length=256, seed=0, lora_r=args.lora_r,
                          lora_alpha=args.lora_alpha or 4.0 * args.lora_r,
                          target_modules=modules)
        res = train(path, args.model, cfg=cfg, out=os.path.join(tmp, "adapter"))
        tuned = evaluate(args.model, res.adapter, test, max_length=256)
    row = {"experiment": "learn", "model": args.model, "task": args.task,
           "n_train": len(clean), "epochs": args.epochs, "lr": args.lr,
           "batch_size": cfg.batch_size, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
           "target_modules": ",".join(modules), "final_train_loss": round(res.history[-1], 4),
           "base_accuracy": round(base["accuracy"], 4),
           "tuned_accuracy": round(tuned["accuracy"], 4),
           "gain_points": round(100 * (tuned["accuracy"] - base["accuracy"]), 1),
           "base_loss": round(base["loss"], 4), "tuned_loss": round(tuned["loss"], 4),
           "n_test": base["n"], "wall_s": round(time.perf_counter() - t0, 1),
           "base_predictions": dict(sorted(Counter(base["predictions"]).items())),
           "tuned_predictions": dict(sorted(Counter(tuned["predictions"]).items())),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(row, indent=1))
    _append(row)


def _append(row: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    rows = json.load(open(RESULTS)) if os.path.exists(RESULTS) else []
    rows.append(row)
    with open(RESULTS, "w") as f:
        json.dump(rows, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8, help="samples per step (both modes)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each loop")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each loop (median taken)")
    ap.add_argument("--learn", action="store_true",
                    help="instead: test accuracy before/after training on clean examples")
    ap.add_argument("--n-learn", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-test", type=int, default=500, help="first N test questions (--learn)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=None, help="default: 4 x lora_r")
    ap.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                    help="LoRA targets, comma-separated, or 'all' (attention + MLP)")
    args = ap.parse_args()
    if args.learn:
        learn(args)
        return

    import ray
    import torch

    from evoray.config import TrainConfig
    from evoray.train import train

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = _data(args.task, args.steps * args.batch_size, tmp)
        cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=256,
                          warmup_ratio=0.0, num_workers=1, cpus_per_worker=args.threads,
                          storage_path=os.path.join(tmp, "runs"))
        ray.init(num_cpus=max(2, args.threads), include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
        plains, rates, walls = [], [], []
        for i in range(args.repeats):  # interleaved, so load from other processes hits both
            plains.append(plain_loop(path, args.model, cfg, args.steps))
            t0 = time.perf_counter()
            res = train(path, args.model, cfg=cfg, out=os.path.join(tmp, "out"), name=f"b{i}")
            walls.append(time.perf_counter() - t0)
            rates.append(res.metrics["samples_per_s"])
        ray.shutdown()
    plain, rate, wall = (statistics.median(x) for x in (plains, rates, walls))
    row = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
           "threads": args.threads, "plain_samples_per_s": round(plain, 2),
           "ray_samples_per_s": round(rate, 2), "ratio": round(rate / plain, 3),
           "repeats": args.repeats, "plain_runs": [round(x, 1) for x in plains],
           "ray_runs": [round(x, 1) for x in rates],
           "ray_worker_threads": res.metrics.get("torch_threads"), "ray_fit_wall_s": round(wall, 1),
           "ray_startup_s": round(wall - args.steps * args.batch_size / rate, 1),
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"{'loop':<22}{'samples/s':>10}")
    print(f"{'plain PyTorch':<22}{plain:>10.1f}")
    print(f"{'Ray Train (1 worker)':<22}{rate:>10.1f}")
    print(f"ratio {row['ratio']:.3f} (target >= 0.9); Ray start-up and teardown "
          f"{row['ray_startup_s']:.1f} s of a {wall:.1f} s fit")
    _append(row)


if __name__ == "__main__":
    main()
