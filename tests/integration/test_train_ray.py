"""Ray Train on the local session Ray: two DDP workers learn; a worker failure after a step
checkpoint resumes from it and ends with the adapter of an uninterrupted run."""

import os

import pytest
import torch
from safetensors.torch import load_file

from evoray.config import TrainConfig
from evoray.data import read_records, write_records
from evoray.tasks import write_task
from evoray.train import train
from evoray.train.loop import FAIL_ENV

pytestmark = pytest.mark.slow  # multi-worker Train, and a worker group restarted

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    paths = write_task("arithmetic", str(out), pool_size=20, seed=0)
    small = str(out / "train_small.jsonl")
    write_records(read_records(paths["train"], "candidate")[:32], small, "candidate")
    return small


BASE = dict(batch_size=8, lr=5e-3, max_length=128, warmup_ratio=0.0, lora_dropout=0.1, seed=5,
            cpus_per_worker=0.5)


@pytest.mark.timeout(300)
def test_two_workers_learn(ray_session, data, tmp_path):
    cfg = TrainConfig(**BASE, num_workers=2, max_steps=6, storage_path=str(tmp_path / "runs"))
    res = train(data, "tiny-llama", cfg=cfg, out=str(tmp_path / "out"), name="two-workers")
    assert len(res.history) == 6
    assert res.history[-1] < res.history[0] - 0.3
    assert res.checkpoint is not None and res.checkpoint.startswith(str(tmp_path / "runs"))
    assert os.path.exists(tmp_path / "out" / "adam_state.safetensors")


@pytest.mark.timeout(400)
def test_worker_failure_resumes_from_step_checkpoint(ray_session, data, tmp_path, monkeypatch):
    cfg = dict(BASE, max_steps=6, checkpoint_every=2)
    monkeypatch.setenv(FAIL_ENV, "3")  # the first attempt raises before step 4, after ckpt 2
    res = train(data, "tiny-llama", cfg=TrainConfig(**cfg, num_workers=1, max_failures=1,
                                                    storage_path=str(tmp_path / "runs")),
                out=str(tmp_path / "faulty"), name="faulty")
    monkeypatch.delenv(FAIL_ENV)
    assert res.metrics["resumed_from_step"] == 2 and res.metrics["step"] == 6
    ref = train(data, "tiny-llama", cfg=TrainConfig(**cfg, num_workers=0),
                out=str(tmp_path / "ref"))
    a = load_file(str(tmp_path / "faulty" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert res.history == pytest.approx(ref.history, abs=1e-5)

    # the same run name and storage path resume from the last checkpoint (step 6)
    more = train(data, "tiny-llama", cfg=TrainConfig(**{**cfg, "max_steps": 8}, num_workers=1,
                                                     storage_path=str(tmp_path / "runs")),
                 out=str(tmp_path / "more"), name="faulty")
    assert more.metrics["resumed_from_step"] == 6 and more.metrics["step"] == 8
    assert more.history[:6] == res.history and len(more.history) == 8
