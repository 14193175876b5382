"""The GPU path, for a lent machine that has torch, transformers, peft and pyarrow (no Ray,
no faiss, no model weights): one script, about 5 minutes on an H100.

    PYTHONPATH=. python benchmarks/gpu_check.py --out "$OUT"

1. **Equality**: the features of 64 tiny-llama candidates (a trained LoRA: B != 0, every
   gradient computed) on CUDA in float32, and under bfloat16 autocast, against the same
   features on the CPU; reports the largest relative row error ``‖f_gpu − f_cpu‖ / ‖f_cpu‖``
   (target: within 1e-3 in float32) and the cosine of the bf16 rows.
2. **Throughput at dim 8192** on a randomly initialised model of SmolLM2-135M's shape
   (``LlamaConfig`` below; the weights cannot travel, and speed does not depend on them),
   sequence length 128: the batched extractor (fresh LoRA and trained LoRA), the LESS-style
   loop (one backward a sample) and a peft LoRA training step at batch 8, in samples/s.

Writes ``gpu.json`` under ``--out`` (copy it to ``benchmarks/results/gpu.json``) and prints a
table. Exits 1 when CUDA is missing or the float32 error exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from features import loop_rate, make_batch  # noqa: E402  (benchmarks/features.py)

from evoray.config import FeaturesConfig  # noqa: E402
from evoray.features.extract import FeatureExtractor  # noqa: E402
from evoray.lora import lora_pairs  # noqa: E402
from evoray.models import load_model  # noqa: E402

SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                 "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                 "tie_word_embeddings": True}


def train_lora(ext: FeatureExtractor) -> None:
    """Make the LoRA a trained one: B != 0 (the same values on every device)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pair in lora_pairs(ext.model):
            pair.B.weight.copy_(0.02 * torch.randn(pair.B.weight.shape, generator=gen))
    ext.grads.a_skipped = False


def features(device: str, bf16: bool, batch) -> torch.Tensor:
    model, tok = load_model("tiny-llama")
    ext = FeatureExtractor(model, tok, FeaturesConfig(dim=1024, bf16=bf16), device=device)
    train_lora(ext)
    feats, _, _ = ext({k: v.to(device) for k, v in batch.items()})
    return torch.as_tensor(feats, dtype=torch.float64)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def equality(device: str) -> dict:
    batch = make_batch(load_model("tiny-llama")[1], 64)
    cpu = features("cpu", False, batch)
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        gpu = features(device, bf16, batch)
        rel = (gpu - cpu).norm(dim=1) / cpu.norm(dim=1)
        cos = torch.nn.functional.cosine_similarity(gpu, cpu, dim=1)
        out[name] = {"max_rel_err": float(rel.max()), "median_rel_err": float(rel.median()),
                     "min_cos": float(cos.min())}
    return out


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``repeats`` calls after a warm-up, the device synchronised."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def smollm2_shaped():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval()


class _Tok:  # what make_batch and the extractor read of a tokenizer
    def __len__(self) -> int:
        return SMOLLM2_SHAPE["vocab_size"]


def train_rate(batch, device: str) -> float:
    """A peft LoRA training step (r 8 on q/k/v/o, AdamW) at batch 8, in samples/s."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(smollm2_shaped(), LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    small = {k: v[:8] for k, v in batch.items()}

    def step():
        model(**small).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return 8 / timed(step, 5, device)


def throughput(bs: int, dim: int, loop_samples: int, device: str) -> list[dict]:
    batch = {k: v.to(device) for k, v in make_batch(_Tok(), 2 * bs).items()}
    rows = []
    train = train_rate(batch, device)
    for state in ("fresh", "trained"):
        for bf16 in (False, True):
            ext = FeatureExtractor(smollm2_shaped(), _Tok(), FeaturesConfig(dim=dim, bf16=bf16),
                                   device=device)
            if state == "trained":
                train_lora(ext)
            chunks = [{k: v[i:i + bs] for k, v in batch.items()} for i in (0, bs)]
            it = iter(chunks * 4)
            fast = bs / timed(lambda ext=ext, it=it: ext(next(it)), 5, device)
            loop = loop_rate(ext, batch, loop_samples, device) if not bf16 else None
            rows.append({"proxy": state, "bf16": bf16, "batch": bs, "dim": dim,
                         "batched": fast, "loop": loop, "train": train,
                         "batched/loop": fast / loop if loop else None,
                         "batched/train": fast / train})
            print(f"  {state} bf16={bf16}: batched {fast:.1f}/s"
                  + (f", loop {loop:.1f}/s" if loop else ""), flush=True)
            del ext
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--loop-samples", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "equality": equality(a.device)}
    print(json.dumps(result["equality"], indent=1), flush=True)
    result["throughput"] = throughput(a.batch, a.dim, a.loop_samples, a.device)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'proxy':<8} {'bf16':<5} {'batched/s':>10} {'loop/s':>8} {'train/s':>8} "
          f"{'batched/loop':>12} {'batched/train':>13}")
    for r in result["throughput"]:
        loop = f"{r['loop']:.1f}" if r["loop"] else "-"
        ratio = f"{r['batched/loop']:.1f}x" if r["batched/loop"] else "-"
        print(f"{r['proxy']:<8} {str(r['bf16']):<5} {r['batched']:>10.1f} {loop:>8} "
              f"{r['train']:>8.1f} {ratio:>12} {r['batched/train']:>12.2f}x")
    return 0 if result["equality"]["fp32"]["max_rel_err"] <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
