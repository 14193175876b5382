"""Evaluation as a Ray Data stage gives what the in-process evaluation gives."""

import pytest

from evoray.data import read_records, write_records
from evoray.train.evaluate import evaluate

pytestmark = pytest.mark.timeout(300)


def test_ray_data_evaluation_equals_in_process(one_round, tmp_path):
    run = one_round["run_dir"]
    items = read_records(f"{run}/task/test.jsonl", "mcq")[:45]
    test = str(tmp_path / "test.jsonl")
    write_records(items, test, "mcq")
    adapter = f"{run}/round_01/adapter"
    local = evaluate("tiny-llama", adapter, test, batch_size=8, max_length=256)
    on_ray = evaluate("tiny-llama", adapter, test, batch_size=8, max_length=256, num_actors=2,
                      num_cpus=0.5)
    assert on_ray["predictions"] == local["predictions"]
    assert on_ray["accuracy"] == local["accuracy"] and on_ray["n"] == 45
    assert abs(on_ray["loss"] - local["loss"]) < 1e-5
    assert on_ray["per_subtask"] == local["per_subtask"]
