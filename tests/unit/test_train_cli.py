"""``evoray train``, ``evoray eval`` and ``evoray export`` end to end, in-process."""

import os

import pytest
import torch

from evoray.cli import main
from evoray.data import read_records, write_records
from evoray.models import load_model
from evoray.tasks import write_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_eval_export(tmp_path, capsys):
    paths = write_task("compare", str(tmp_path / "task"), pool_size=20, seed=0)
    small, test = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
    write_records(read_records(paths["train"], "candidate")[:16], small, "candidate")
    write_records(read_records(paths["test"], "mcq")[:12], test, "mcq")
    out = str(tmp_path / "adapter")
    assert main(["train", "--data", small, "--model", "tiny-llama", "--out", out,
                 "train.max_steps=3", "train.batch_size=8", "train.max_length=128",
                 "train.lr=1e-2"]) == 0
    text = capsys.readouterr().out
    assert "loss first -> last" in text and "examples" in text
    assert os.path.exists(os.path.join(out, "adam_state.safetensors"))

    assert main(["eval", "--model", "tiny-llama", "--adapter", out, "--test", test]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "(12 items)" in text and "response loss" in text

    merged = str(tmp_path / "merged")
    assert main(["export", "--adapter", out, "--merge", "--out", merged]) == 0
    assert os.path.exists(os.path.join(merged, "config.json"))
    # the merged model computes what base + adapter computes
    from evoray.lora import load_adapter

    base, tok = load_model("tiny-llama")
    with_adapter = load_adapter(base, out, trainable=False).eval()
    plain, _ = load_model(merged)
    ids = torch.tensor([tok("What is 3 + 4? Answer: B", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits,
                                   with_adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    only = str(tmp_path / "only")
    assert main(["export", "--adapter", out, "--out", only]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(only))
    assert not os.path.exists(os.path.join(only, "config.json"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--model", "tiny-llama", "--adapter", str(tmp_path), "--test",
                 str(tmp_path / "missing.jsonl")]) == 2
    assert "evoray: error:" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "x.jsonl"), "--model", "tiny-llama", "--out",
                 str(tmp_path / "o"), "train.lr=-1"]) == 2
    assert "train.lr: -1.0 is out of range" in capsys.readouterr().err


def test_train_takes_target_records(tmp_path, capsys):
    """A targets file (records with ``subtask``) trains on its prompts and responses."""
    paths = write_task("compare", str(tmp_path / "task"), pool_size=20, seed=0)
    out = str(tmp_path / "adapter")
    assert main(["train", "--data", paths["targets"], "--model", "tiny-llama", "--out", out,
                 "train.max_steps=2", "train.batch_size=8", "train.max_length=128"]) == 0
    n = len(read_records(paths["targets"], "target"))
    assert f"examples            {n} (0 skipped)" in capsys.readouterr().out
