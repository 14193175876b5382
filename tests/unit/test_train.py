"""Training in-process (local mode, ``num_workers=0``: no Ray): outputs, learning, determinism,
the Adam state the features stage reads, continuing an adapter, and bad input."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evoray.config import FeaturesConfig, TrainConfig
from evoray.data import read_records, write_records
from evoray.data.tokenize import ResponseTooLong
from evoray.errors import EvorayError, ModelError, TrainError
from evoray.tasks import write_task
from evoray.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    paths = write_task("arithmetic", str(out), pool_size=20, seed=0)
    small = str(out / "train_small.jsonl")
    write_records(read_records(paths["train"], "candidate")[:24], small, "candidate")
    return {**paths, "small": small}


CFG = dict(num_workers=0, max_steps=6, batch_size=8, lr=5e-3, max_length=128, warmup_ratio=0.0,
           lora_dropout=0.1, seed=3)


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adapter"))
    return train(task["small"], "tiny-llama", cfg=TrainConfig(**CFG), out=out)


def test_train_writes_adapter_state_and_loss_falls(trained):
    out = trained.adapter
    for name in ("adapter_config.json", "adapter_model.safetensors", "adam_state.safetensors",
                 "trainer_state.pt", "state.json", "evoray_adapter.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert len(trained.history) == 6 and trained.metrics["step"] == 6
    assert trained.history[-1] < trained.history[0] - 0.3
    state = json.load(open(os.path.join(out, "state.json")))
    assert state["step"] == 6 and state["epoch"] == 2 and state["step_in_epoch"] == 0
    opt = torch.load(os.path.join(out, "trainer_state.pt"), weights_only=True)
    assert len(opt["optimizer"]["state"]) > 0 and opt["scheduler"]["last_epoch"] == 6
    assert json.load(open(os.path.join(out, "evoray_adapter.json")))["base_model"] == "tiny-llama"


def test_training_is_deterministic(task, trained, tmp_path):
    again = train(task["small"], "tiny-llama", cfg=TrainConfig(**CFG), out=str(tmp_path))
    a = load_file(os.path.join(trained.adapter, "adapter_model.safetensors"))
    b = load_file(os.path.join(again.adapter, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.history == trained.history


def test_bf16_autocast_on_cpu_learns_and_is_deterministic(task, trained, tmp_path):
    """train.bf16 on a CPU: a bfloat16 autocast step (another trajectory than float32's), the
    same adapter from the same seed, float32 LoRA weights, and the loss still falls."""
    runs = [train(task["small"], "tiny-llama", cfg=TrainConfig(**CFG, bf16=True),
                  out=str(tmp_path / name)) for name in ("a", "b")]
    a, b = (load_file(os.path.join(r.adapter, "adapter_model.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a) and runs[0].history == runs[1].history
    assert {t.dtype for t in a.values()} == {torch.float32}
    assert runs[0].history != trained.history  # float32's, from the same seed and data
    assert runs[0].history[-1] < runs[0].history[0] - 0.3


def test_on_checkpoint_sees_every_epoch(task, trained, tmp_path):
    """Local mode hands each epoch's checkpoint folder to ``on_checkpoint`` while it exists; the
    last one is the trained adapter. With a constant learning rate, epoch 1 of a 2-epoch run is
    exactly a 1-epoch run: what lets the quality benchmark score every epoch count of its recipe
    from one training."""
    seen = []

    def keep(folder, metrics):
        seen.append((metrics["step"], metrics["epoch"],
                     load_file(os.path.join(folder, "adapter_model.safetensors"))))

    train(task["small"], "tiny-llama", cfg=TrainConfig(**CFG), out=str(tmp_path / "a"),
          on_checkpoint=keep)
    assert [(s, e) for s, e, _ in seen] == [(3, 1), (6, 2)]
    final = load_file(os.path.join(trained.adapter, "adapter_model.safetensors"))
    assert all(torch.equal(seen[-1][2][k], final[k]) for k in final)
    const = {**CFG, "max_steps": None, "schedule": "constant"}
    two, one = [], []
    train(task["small"], "tiny-llama", cfg=TrainConfig(**const, epochs=2), out=str(tmp_path / "b"),
          on_checkpoint=lambda f, m: two.append(load_file(f"{f}/adapter_model.safetensors")))
    train(task["small"], "tiny-llama", cfg=TrainConfig(**const, epochs=1), out=str(tmp_path / "c"),
          on_checkpoint=lambda f, m: one.append(load_file(f"{f}/adapter_model.safetensors")))
    assert len(two) == 2 and len(one) == 1
    assert all(torch.equal(two[0][k], one[0][k]) for k in one[0])
    assert not all(torch.equal(two[1][k], one[0][k]) for k in one[0])
    with pytest.raises(TrainError, match="on_checkpoint needs local mode"):
        train(task["small"], "tiny-llama", cfg=TrainConfig(**{**CFG, "num_workers": 1}),
              out=str(tmp_path / "d"), on_checkpoint=keep)


def test_features_read_the_adam_state(task, trained):
    from evoray.data import collate, encode_pairs
    from evoray.features.extract import FeatureExtractor
    from evoray.lora import lora_pairs
    from evoray.models import load_model

    state = load_file(trained.adam_state)
    fcfg = FeaturesConfig(dim=64, lora_r=8)
    outs = []
    for adam in (None, trained.adam_state):
        model, tok = load_model("tiny-llama")
        fx = FeatureExtractor(model, tok, fcfg, adapter=trained.adapter, adam_state=adam)
        names = {f"{p.name}.lora_A.exp_avg" for p in lora_pairs(fx.model)}
        assert names <= set(state)  # names match the features code's peft model
        recs = read_records(task["pool"], "candidate")[:4]
        enc, _ = encode_pairs(tok, recs, 128, on_overflow="skip")
        feats, _, _ = fx(collate(enc, tok.pad_token_id))
        assert np.isfinite(feats).all() and np.abs(feats).sum() > 0
        outs.append(feats)
    assert not np.allclose(outs[0], outs[1])


def test_continue_from_adapter(task, trained, tmp_path):
    # also exercises gradient accumulation and gradient checkpointing
    cfg = TrainConfig(**{**CFG, "max_steps": 2, "batch_size": 4, "grad_accum": 2,
                         "gradient_checkpointing": True, "schedule": "cosine"})
    res = train(task["small"], "tiny-llama", init_adapter=trained.adapter, cfg=cfg,
                out=str(tmp_path))
    # it starts where the first run ended, not from a fresh adapter's loss
    assert res.history[0] < trained.history[0] - 0.3


def test_mismatched_or_missing_adapter(task, trained, tmp_path):
    with pytest.raises(ModelError, match="trained on base model 'tiny-llama'"):
        train(task["small"], "tiny-gpt2", init_adapter=trained.adapter,
              cfg=TrainConfig(**CFG), out=str(tmp_path / "x"))
    with pytest.raises(EvorayError, match="adapter_config.json"):
        train(task["small"], "tiny-llama", init_adapter=str(tmp_path / "nowhere"),
              cfg=TrainConfig(**CFG), out=str(tmp_path / "y"))


def test_bad_training_data(task, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EvorayError, match="no records"):
        train(str(empty), "tiny-llama", cfg=TrainConfig(**CFG), out=str(tmp_path / "a"))
    long = [{"id": "long", "prompt": "Q?", "response": "x" * 200, "source": "t"}]
    path = str(tmp_path / "long.jsonl")
    write_records(long, path, "candidate")
    with pytest.raises(ResponseTooLong, match="'long'"):
        train(path, "tiny-llama", cfg=TrainConfig(**CFG), out=str(tmp_path / "b"))
    with pytest.raises(TrainError, match="no example fits max_length"):
        train(path, "tiny-llama", cfg=TrainConfig(**{**CFG, "on_overflow": "skip"}),
              out=str(tmp_path / "c"))


def test_training_raises_test_accuracy(tmp_path):
    """A learnable toy task (the word in the prompt decides the letter): accuracy goes from the
    random model's to (near) perfect, so train and evaluate agree on the text and the letters."""
    from evoray.train import evaluate

    words = {"red": "A", "blue": "B", "green": "C", "gold": "D"}
    rng = np.random.default_rng(0)

    def item(i, w):
        return {"id": f"q{i}", "prompt": f"Item {rng.integers(100)} is {w}.\nA. a\nB. b\nC. c\n"
                f"D. d\nAnswer:", "choices": list("ABCD"), "answer": words[w],
                "subtask": "warm" if w in ("red", "gold") else "cold"}

    names = list(words)
    train_items = [item(i, names[i % 4]) for i in range(64)]
    test_items = [item(100 + i, names[i % 4]) for i in range(16)]
    data, test = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
    write_records([{"id": r["id"], "prompt": r["prompt"], "response": r["answer"],
                    "source": "toy"} for r in train_items], data, "candidate")
    write_records(test_items, test, "mcq")
    base = evaluate("tiny-llama", None, test)
    cfg = TrainConfig(**{**CFG, "max_steps": 150, "lr": 3e-2, "lora_dropout": 0.0,
                         "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]})
    res = train(data, "tiny-llama", cfg=cfg, out=str(tmp_path / "a"))
    tuned = evaluate("tiny-llama", res.adapter, test)
    assert base["accuracy"] <= 0.5
    assert tuned["accuracy"] >= 0.9 and tuned["loss"] < base["loss"]
    assert set(tuned["per_subtask"]) == {"warm", "cold"}


def test_response_loss_gce_against_its_formula():
    """train.loss=gce is (1 - p^q) / q per response token, averaged; ce is cross-entropy; as
    q -> 0 GCE tends to cross-entropy."""
    from evoray.train.loop import response_loss

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(7, 11, generator=g), torch.randint(0, 11, (7,), generator=g)
    p = torch.softmax(logits.double(), -1)[torch.arange(7), target]
    for q in (0.3, 0.7, 1.0):
        want = ((1 - p ** q) / q).mean()
        assert abs(response_loss(logits, target, "gce", q).item() - want.item()) < 1e-5
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert torch.equal(response_loss(logits, target), ce)
    assert abs(response_loss(logits, target, "gce", 1e-4).item() - ce.item()) < 1e-2
    with pytest.raises(EvorayError, match="gce_q"):
        TrainConfig(loss="gce", gce_q=0.0)


def test_gce_training_learns_and_is_deterministic(task, trained, tmp_path):
    """GCE's loss is bounded by 1/q and its gradient is scaled by p^q, tiny on a random model's
    49k-token vocabulary, so on tiny-llama it falls slowly; it must still fall, reproducibly."""
    runs = [train(task["small"], "tiny-llama", cfg=TrainConfig(**CFG, loss="gce"),
                  out=str(tmp_path / name)) for name in ("a", "b")]
    a, b = (load_file(os.path.join(r.adapter, "adapter_model.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a) and runs[0].history == runs[1].history
    assert runs[0].history != trained.history
    assert runs[0].history[-1] < runs[0].history[0] - 0.01 and max(runs[0].history) < 1 / 0.7
