"""Can smollm2-135m learn a task from a label-blind selection? Test accuracy after every epoch.

    python benchmarks/noise_probe.py --mode on_task   # 195 on-task, distinct questions (~1/3 wrong)
    python benchmarks/noise_probe.py --mode clean     # 195 clean questions

A plain training loop (AdamW at the quality benchmark's TRAIN settings: lr 1e-3, batch 8, LoRA
r = 16 on all projections; no warm-up, schedule or dropout) on the quality benchmark's cleaned
weak lookup pool (``runs/quality/lookup-weak-2000``, written by ``benchmarks/quality.py``),
picking like its oracle rows: random candidates, one per question, among on-task (``meta.task``)
or clean (``meta.kind``) ones. Prints the training loss and the accuracy on the first
``--n-test`` test questions after each epoch: it shows whether label noise, not the selector,
stops the model from learning (README "Results").
"""

import argparse
import json
import time

import numpy as np
import torch

from evoray.config import TrainConfig
from evoray.data import collate, encode_pairs
from evoray.lora import fresh_adapter
from evoray.models import load_model
from evoray.train.evaluate import evaluate_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("on_task", "clean"), default="on_task")
    ap.add_argument("--work", default="runs/quality/lookup-weak-2000")
    ap.add_argument("--task", default="lookup")
    ap.add_argument("--k", type=int, default=195, help="training examples")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    recs = [json.loads(line) for line in open(f"{a.work}/clean.jsonl")]
    rng = np.random.default_rng(0)
    seen, picks = set(), []
    for i in rng.permutation(len(recs)):
        m = recs[i]["meta"]
        ok = m["kind"] == "clean" if a.mode == "clean" else m["task"] == a.task
        if ok and m["qkey"] not in seen:
            seen.add(m["qkey"])
            picks.append(recs[i])
    train = picks[:a.k]
    wrong = np.mean([r["response"].strip() != r["meta"]["correct"] for r in train])
    test = [json.loads(line) for line in open(f"{a.work}/test.jsonl")][:a.n_test]
    print(f"{len(train)} training examples, wrong-label share {wrong:.3f}; {len(test)} test")
    model, tok = load_model(a.model)
    cfg = TrainConfig(lr=1e-3, lora_r=16, lora_alpha=32.0, target_modules=ALL, max_length=96)
    model = fresh_adapter(model, cfg, 0)
    rows, _ = encode_pairs(tok, train, 96)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    print("epoch  train_loss  test_acc  seconds")
    for ep in range(a.epochs):
        model.train()
        order, total, t0 = rng.permutation(len(rows)), 0.0, time.time()
        for s in range(0, len(rows), 8):
            loss = model(**collate([rows[i] for i in order[s:s + 8]], tok.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            total += loss.item()
        model.eval()
        acc = evaluate_model(model, tok, test, max_length=96)["accuracy"]
        print(f"{ep:5d}  {total / -(-len(rows) // 8):10.3f}  {acc:8.3f}  {time.time() - t0:7.0f}",
              flush=True)


if __name__ == "__main__":
    main()
