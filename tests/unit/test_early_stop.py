"""Early stopping on the targets (``train.early_stop_patience``): the stopping rule, the adapter
kept (exactly the best epoch's), the score against the competence diagnostic, and bad input."""

import os

import pytest
import torch
from safetensors.torch import load_file

from evoray.config import ConfigError, TrainConfig
from evoray.data import write_records
from evoray.errors import TrainError
from evoray.lora import load_with_adapter
from evoray.train import train
from evoray.train.competence import competence
from evoray.train.early_stop import KeepBest, better, stop_epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _s(acc, loss=1.0):
    return {"accuracy": acc, "loss": loss}


def test_stop_epoch_rule():
    curve = [_s(.2), _s(.5, 1.0), _s(.5, 0.9), _s(.4), _s(.45), _s(.9)]
    assert stop_epoch(curve, patience=2) == (3, 5)   # the tie at .5 goes to the lower loss
    assert stop_epoch(curve, patience=3) == (6, 6)   # patient enough to reach epoch 6
    assert stop_epoch(curve, patience=1) == (3, 4)
    assert stop_epoch([_s(.3)] * 4, patience=2) == (1, 3)  # equal scores never improve
    assert better(_s(.5, 2.0), _s(.4, 0.1)) and not better(_s(.5, 1.0), _s(.5, 1.0))


WORDS = {"red": "A", "blue": "B", "green": "C", "gold": "D"}


def _records(n, start=0):
    names = list(WORDS)
    return [{"id": f"q{start + i}", "prompt": f"Item {start + i} is {names[i % 4]}.\nA. a\nB. b\n"
             f"C. c\nD. d\nAnswer:", "response": WORDS[names[i % 4]], "source": "toy"}
            for i in range(n)]


CFG = dict(num_workers=0, epochs=6, batch_size=8, lr=5e-3, max_length=64, warmup_ratio=0.0,
           schedule="constant", lora_dropout=0.0, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("es") / "train.jsonl")
    write_records(_records(16), path, "candidate")
    return path


def test_keeps_the_best_epoch_and_stops_after_patience(data, tmp_path, monkeypatch):
    """Scripted target scores (the rule is tested above): epoch 2 is best, patience 2 stops
    after epoch 4, and the adapter written to ``out`` is exactly a 2-epoch training's."""
    script = iter([_s(.25), _s(.5), _s(.25), _s(.5, 2.0), _s(.75), _s(1.0)])
    monkeypatch.setattr(KeepBest, "score", lambda self, folder: dict(next(script)))
    seen = []
    res = train(data, "tiny-llama", cfg=TrainConfig(**CFG, early_stop_patience=2),
                out=str(tmp_path / "es"), targets=_records(8, start=100),
                on_checkpoint=lambda f, m: seen.append(m["epoch"]))
    assert res.early_stop["best_epoch"] == 2 and res.early_stop["stopped_epoch"] == 4
    assert [c["accuracy"] for c in res.early_stop["curve"]] == [.25, .5, .25, .5]
    assert seen == [1, 2, 3, 4]  # the caller's callback still sees every epoch
    assert res.metrics["epoch"] == 4  # training stopped: epochs 5 and 6 never ran
    two = train(data, "tiny-llama", cfg=TrainConfig(**{**CFG, "epochs": 2}),
                out=str(tmp_path / "two"))
    kept = load_file(os.path.join(res.adapter, "adapter_model.safetensors"))
    ref = load_file(os.path.join(two.adapter, "adapter_model.safetensors"))
    assert kept.keys() == ref.keys() and all(torch.equal(kept[k], ref[k]) for k in ref)
    assert os.path.exists(res.adam_state)


def test_score_agrees_with_the_competence_diagnostic(data, tmp_path):
    """The keeper's accuracy is the competence diagnostic's on the same adapter and targets, and
    its loss is the mean right-answer loss; with patience above the epochs it keeps the best
    epoch, whose adapter is exactly a plain training of that many epochs."""
    targets = _records(8, start=100)
    res = train(data, "tiny-llama", cfg=TrainConfig(**{**CFG, "epochs": 3},
                                                    early_stop_patience=5),
                out=str(tmp_path / "a"), targets=targets)
    assert res.early_stop["stopped_epoch"] == 3 and len(res.early_stop["curve"]) == 3
    best = res.early_stop["curve"][res.early_stop["best_epoch"] - 1]
    assert not any(better(c, best) for c in res.early_stop["curve"])
    plain = train(data, "tiny-llama", cfg=TrainConfig(**{**CFG, "epochs":
                                                         res.early_stop["best_epoch"]}),
                  out=str(tmp_path / "plain"))  # scoring between epochs changes no weight
    kept = load_file(os.path.join(res.adapter, "adapter_model.safetensors"))
    ref = load_file(os.path.join(plain.adapter, "adapter_model.safetensors"))
    assert all(torch.equal(kept[k], ref[k]) for k in ref)
    model, tok = load_with_adapter("tiny-llama", res.adapter)
    m = competence(model, tok, targets, max_length=64)
    assert best["accuracy"] == pytest.approx(m["accuracy"])
    keeper = KeepBest("tiny-llama", targets, 1, 2, max_length=64)
    try:
        again = keeper.score(res.adapter)
        assert again["n"] == 8 and again["accuracy"] == best["accuracy"]
        assert again["loss"] == pytest.approx(best["loss"], abs=1e-6)
    finally:
        keeper.cleanup()


def test_bad_input(data, tmp_path):
    cfg = TrainConfig(**CFG, early_stop_patience=2)
    with pytest.raises(TrainError, match="needs the targets"):
        train(data, "tiny-llama", cfg=cfg, out=str(tmp_path / "a"))
    free = [{"id": "t0", "prompt": "What is 2 + 2?", "response": "4"}]
    with pytest.raises(TrainError, match="none of the 1 target"):
        train(data, "tiny-llama", cfg=cfg, out=str(tmp_path / "b"), targets=free)
    with pytest.raises(ConfigError, match="early_stop_patience.*local mode"):
        TrainConfig(**{**CFG, "num_workers": 1}, early_stop_patience=2)
    with pytest.raises(ConfigError, match="early_stop_patience"):
        TrainConfig(**CFG, early_stop_patience=-1)
