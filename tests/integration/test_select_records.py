"""``evoray select`` from record files: features computed on the way, cached, reused."""

import json

import pyarrow.parquet as pq
import pytest

from evoray.cli import main
from evoray.data import read_records
from evoray.tasks import write_task


@pytest.mark.timeout(300)
def test_select_from_records_in_one_command(ray_session, tmp_path, capsys):
    paths = write_task("compare", str(tmp_path / "task"), pool_size=60, seed=0)
    out = tmp_path / "sel"
    argv = ["select", "--pool", paths["pool"], "--targets", paths["targets"], "--model",
            "tiny-llama", "--ratio", "0.1", "--out", str(out), "features.dim=64",
            "select.evoselect.novelty_pcs=0"]
    assert main(argv) == 0
    picked = read_records(str(out / "selected.jsonl"), "candidate")
    assert len(picked) == pq.read_table(out / "selected.parquet").num_rows == 6
    meta = json.loads((out / "features" / "pool" / "meta.json").read_text())
    assert meta["count"] == 60 and meta["dim"] == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diagnostics"]["params"]["novelty_pcs"] == 0
    first = (out / "features" / "pool" / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # the same inputs and settings: features reused, same picks
    assert (out / "features" / "pool" / "meta.json").stat().st_mtime_ns == first
    assert read_records(str(out / "selected.jsonl"), "candidate") == picked


@pytest.mark.timeout(60)
def test_select_records_mode_errors(tmp_path, capsys):
    paths = write_task("compare", str(tmp_path / "task"), pool_size=30, seed=0)
    assert main(["select", "--targets", paths["targets"], "--out", str(tmp_path / "o")]) == 2
    assert "give --features (a features folder) or --pool" in capsys.readouterr().err
    assert main(["select", "--pool", paths["pool"], "--targets", paths["targets"], "--out",
                 str(tmp_path / "o"), "train.lr=1"]) == 2
    assert "evoray select takes select.KEY=VALUE, features.KEY=VALUE, model=NAME only" in \
        capsys.readouterr().err
