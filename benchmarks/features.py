"""Throughput of gradient features: LESS-style loop vs the batched extractor vs a LoRA train step.

For each model, at sequence length 128 (no padding), on this machine, in one run:

* ``loop``: one forward and one backward per sample (``loss.backward()``, LESS's batch size 1),
  then that sample's gradient projected with the same projector (created once, blocks cached);
* ``batched``: :class:`evoray.features.extract.FeatureExtractor` on batches of ``--batch``;
* ``train``: a plain peft LoRA training step (forward, backward, AdamW step) on a batch of 8,
  the physical floor for gradient work.

Two proxies: ``fresh`` (a new LoRA, B = 0, so the batched extractor skips the A gradients) and
``trained`` (B != 0, every gradient computed). Prints one table with the ratios batched/loop and
batched/train. Results also go to ``benchmarks/results/features.json``. ``--bf16`` instead times
the batched extractor under bfloat16 autocast (``features.bf16``) against float32 on real lookup
candidates, with how far the features move (``benchmarks/results/features_bf16.json``).

    python benchmarks/features.py [--models tiny-llama smollm2-135m] [--batch tiny-llama=128]

The batched extractor's batch size is a setting (``features.batch_size``); the defaults here are
the sizes that amortise per-batch overhead on a 2-core CPU: 128 for the tiny model, whose
per-sample work is so small that framework overhead dominates, and 32 for SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from evoray.config import FeaturesConfig
from evoray.features.extract import FeatureExtractor
from evoray.features.grads import reference_gradients
from evoray.features.projection import ROWS
from evoray.lora import lora_pairs
from evoray.models import load_model

RESULTS = Path(__file__).parent / "results" / "features.json"
BATCH = {"tiny-llama": 128, "tiny-gpt2": 128, "smollm2-135m": 32}
SEQ, RESPONSE = 128, 16


def make_batch(tok, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok) - 1, (n, SEQ), generator=gen)  # last id: EOS
    labels = ids.clone()
    labels[:, :SEQ - RESPONSE] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def extractor(model_name: str, trained: bool, reference: bool = False,
              bf16: bool = False) -> FeatureExtractor:
    base, tok = load_model(model_name)
    ext = FeatureExtractor(base, tok, FeaturesConfig(dim=1024, bf16=bf16), reference=reference)
    if trained:  # as after training: B != 0, so no gradient is identically zero
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pair in lora_pairs(ext.model):
                pair.B.weight.copy_(0.02 * torch.randn(pair.B.weight.shape, generator=gen))
        ext.grads.a_skipped = False
    return ext


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up (which also fills the projection
    cache); the median resists a neighbour process stealing a core now and then."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loop_rate(ext: FeatureExtractor, batch, n: int, device: str = "cpu") -> float:
    """LESS: per sample, forward + backward, then project that one gradient (on ``device``;
    CUDA is synchronised before each time is read)."""
    proj = ext.projector

    def one(i):
        sample = {k: v[i:i + 1] for k, v in batch.items()}
        grads, _ = reference_gradients(ext.model, sample)
        out = torch.zeros(1, proj.dim, device=device)
        for p, g in enumerate(grads):
            g = g.reshape(1, -1)
            for c, start in enumerate(range(0, proj.sizes[p], proj.block_rows)):
                chunk = g[:, start:start + proj.block_rows]
                out.addmm_(chunk, proj._block(p, c, chunk.shape[1]))
        return out

    one(0)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        one(i)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1 / statistics.median(times)


def batched_rate(ext: FeatureExtractor, batch, bs: int) -> float:
    chunks = [{k: v[i:i + bs] for k, v in batch.items()}
              for i in range(0, batch["input_ids"].shape[0] - bs + 1, bs)]
    it = iter(chunks * 2)
    return bs / timed(lambda: ext(next(it)), len(chunks) * 2 - 1)


def train_rate(model_name: str, batch, bs: int = 8, repeats: int = 3) -> float:
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(model_name)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj",
                                                            "o_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    small = {k: v[:bs] for k, v in batch.items()}

    def step():
        loss = model(**small).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return bs / timed(step, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    ap.add_argument("--batch", nargs="*", default=[], metavar="MODEL=N",
                    help=f"batch size of the batched extractor per model (default {BATCH})")
    ap.add_argument("--loop-samples", type=int, default=16, help="samples timed in the loop")
    ap.add_argument("--bf16", action="store_true",
                    help="instead: the batched extractor under bfloat16 autocast against float32")
    args = ap.parse_args()
    if args.bf16:
        return bf16_table(args.models)
    sizes = {**BATCH, **{k: int(v) for k, v in (b.split("=") for b in args.batch)}}
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        bs = sizes.get(name, 16)
        batch = make_batch(load_model(name)[1], 2 * bs)
        train = train_rate(name, batch)
        for state in ("fresh", "trained"):
            ext = extractor(name, state == "trained")
            loop = loop_rate(ext, batch, args.loop_samples)
            fast = batched_rate(ext, batch, bs)
            rows.append({"model": name, "proxy": state, "batch": bs, "loop": loop, "batched": fast,
                         "train": train, "batched/loop": fast / loop,
                         "batched/train": fast / train, "gradient_entries": sum(ext.grads.sizes),
                         "a_skipped": ext.a_skipped,
                         "projection_cache_mb": round(ext.projector.peak_bytes / 2**20)})
            print(f"  measured {name} {state}", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"seq_len": SEQ, "rows": rows,
                                   "threads": torch.get_num_threads(), "proj_rows": ROWS},
                                  indent=2))
    print(f"\nsamples/s at sequence length {SEQ}, dim 1024, {torch.get_num_threads()} threads; "
          f"loop at batch 1, train step at batch 8, batched extractor at the batch shown")
    head = (f"{'model':<14} {'proxy':<8} {'batch':>5} {'loop':>8} {'batched':>8} {'train':>8} "
            f"{'batched/loop':>13} {'batched/train':>14} {'A skipped':>10} {'proj MB':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<14} {r['proxy']:<8} {r['batch']:>5} {r['loop']:>8.1f} "
              f"{r['batched']:>8.1f} "
              f"{r['train']:>8.1f} {r['batched/loop']:>12.2f}x {r['batched/train']:>13.2f}x "
              f"{str(r['a_skipped']):>10} {r['projection_cache_mb']:>8}")

def bf16_row(name: str, n: int = 64, bs: int = 16) -> dict:
    """The batched extractor under bfloat16 autocast against float32 on ``n`` real candidates
    (the strong lookup pool's, at max_length 96: the demo's setting): samples/s of each, their
    ratio, and how far each sample's feature moves (relative difference, cosine). Random tokens
    are no test of precision: their huge losses amplify rounding through the layers."""
    import numpy as np

    from evoray.data import collate, encode_pair
    from evoray.tasks.simulate import make_splits, simulate_pool

    tok = load_model(name)[1]
    pool = simulate_pool(make_splits("lookup"), n, preset="strong")
    batches = [collate([encode_pair(tok, r["prompt"], r["response"], 96)
                        for r in pool[i:i + bs]], tok.pad_token_id) for i in range(0, n, bs)]
    out = {}
    for bf16 in (False, True):
        base, _ = load_model(name)
        ext = FeatureExtractor(base, tok, FeaturesConfig(dim=1024, max_length=96, bf16=bf16))
        ext(batches[0])  # warm-up, fills the projection cache
        t0 = time.perf_counter()
        feats = np.concatenate([ext(b)[0] for b in batches])
        out[bf16] = (feats, n / (time.perf_counter() - t0))
    (a, r32), (b, r16) = out[False], out[True]
    rel = np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"model": name, "float32": r32, "bf16": r16, "bf16/float32": r16 / r32,
            "median_rel_diff": float(np.median(rel)), "max_rel_diff": float(rel.max()),
            "min_cosine": float(cos.min())}


def bf16_table(models: list[str]) -> None:
    """Print and store :func:`bf16_row` for each model."""
    b16 = [bf16_row(name) for name in models]
    print(f"\nbatched extractor under bfloat16 autocast (features.bf16) against float32, on 64 "
          f"strong lookup candidates at max_length 96, batch 16\n"
          f"{'model':<14} {'float32':>8} {'bf16':>8} {'bf16/float32':>13} "
          f"{'median rel diff':>16} {'max rel diff':>13} {'min cosine':>11}")
    for r in b16:
        print(f"{r['model']:<14} {r['float32']:>8.1f} {r['bf16']:>8.1f} "
              f"{r['bf16/float32']:>12.2f}x {r['median_rel_diff']:>16.4f} "
              f"{r['max_rel_diff']:>13.4f} {r['min_cosine']:>11.5f}")
    RESULTS.with_name("features_bf16.json").write_text(json.dumps(b16, indent=2))


if __name__ == "__main__":
    main()
