"""The evolve loop end to end on tiny-llama: outputs, resume after a failure, changed settings,
and the report. One reference run (the ``quick_run`` session fixture) is shared."""

import json
import shutil
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest

from evoray.data import read_records
from evoray.demo import demo_config
from evoray.errors import EvorayError
from evoray.evolve import evolve
from evoray.faults import FAIL_ENV
from evoray.stages import Manifest

pytestmark = pytest.mark.timeout(600)

STAGES = ("generate", "clean", "proxy", "features", "select", "train", "evaluate")


def _selected_ids(run_dir: str, r: int) -> list[str]:
    table = pq.read_table(f"{run_dir}/round_{r:02d}/selection/selected.parquet")
    return table["id"].to_pylist()


def test_one_round_evolve_end_to_end(one_round, tmp_path):
    """The fast tier's evolve path: generate → clean → features → select → train → evaluate,
    once, with the test set cut to ``evolve.test_size``."""
    run, rd = one_round["run_dir"], f"{one_round['run_dir']}/round_01"
    stages = Manifest(run).stages
    assert {"task", "base/evaluate"} | {f"round_01/{s}" for s in STAGES} == set(stages)
    clean = read_records(f"{rd}/clean.jsonl", "candidate")
    picked = read_records(f"{rd}/selection/selected.jsonl", "candidate")
    assert len(picked) == round(0.2 * len(clean)) > 0
    assert {x["id"] for x in picked} <= {x["id"] for x in clean}
    assert len(read_records(f"{run}/task/test.jsonl", "mcq")) == 500
    with open(f"{rd}/metrics.json") as f:
        m = json.load(f)
    assert m["n_test"] == 100 == one_round["base"]["n_test"] and 0 <= m["accuracy"] <= 1
    assert one_round["rounds"] == [m] and m["n_selected"] == len(picked)
    # the proxy's competence on the targets: in proxy.json, metrics.json and the manifest
    n_targets = len(read_records(f"{run}/task/targets.jsonl", "target"))
    assert m["proxy"]["n"] == n_targets > 0 and m["proxy"]["proxy"] == "base model"
    assert 0 <= m["proxy"]["accuracy"] <= 1 and 0 <= m["proxy"]["auc"] <= 1
    with open(f"{rd}/proxy.json") as f:
        assert json.load(f) == m["proxy"]
    assert stages["round_01/proxy"]["stats"]["n"] == n_targets
    with open(f"{rd}/adapter/adapter_config.json") as f:
        assert json.load(f)["r"] > 0
    # a larger test_size is another evaluation: base and round 1 are scored again, nothing else
    shutil.copytree(run, tmp_path / "run")
    cfg = demo_config(quick=True, **{"evolve.run_dir": str(tmp_path / "run"),
                                     "evolve.rounds": 1, "evolve.test_size": 120})
    lines = []
    out = evolve(cfg, resume=True, say=lines.append)
    ran = [line.split()[1].rstrip(":") for line in lines
           if line.startswith(("[evolve] base/", "[evolve] round_")) and "done earlier" not in line]
    assert ran == ["base/evaluate", "round_01/evaluate"]
    assert out["base"]["n_test"] == out["rounds"][0]["n_test"] == 120


def test_random_rounds_skip_the_features_stage(one_round, tmp_path):
    """select.method=random reads no features: its round has no features stage or folder, and
    it picks from the same cleaned pool as the reference run, a ratio's worth. With
    train.early_stop_patience the round's training scores every epoch on the run's targets and
    the manifest records the epoch kept."""
    from evoray.report_run import load_run

    cfg = demo_config(quick=True, **{"evolve.run_dir": str(tmp_path / "run"),
                                     "evolve.rounds": 1, "evolve.test_size": 20,
                                     "select.method": "random", "train.epochs": 2,
                                     "train.early_stop_patience": 1})
    out = evolve(cfg, say=lambda line: None)
    rd = tmp_path / "run" / "round_01"
    stages = Manifest(str(tmp_path / "run")).stages
    assert "round_01/features" not in stages and "round_01/select" in stages
    kept = stages["round_01/train"]["stats"]
    assert 1 <= kept["best_epoch"] <= kept["stopped_epoch"] <= 2
    assert not (rd / "features").exists()
    clean = read_records(str(rd / "clean.jsonl"), "candidate")
    ref = read_records(f"{one_round['run_dir']}/round_01/clean.jsonl", "candidate")
    assert [x["id"] for x in clean] == [x["id"] for x in ref]  # the same generated pool
    picked = read_records(str(rd / "selection" / "selected.jsonl"), "candidate")
    assert len(picked) == round(0.2 * len(clean)) == out["rounds"][0]["n_selected"]
    assert {x["id"] for x in picked} <= {x["id"] for x in clean}
    assert [r.status for r in load_run(str(tmp_path / "run")).rounds][1:] == ["done"]


@pytest.mark.slow
def test_every_round_writes_its_outputs_and_the_table(quick_run):
    run = quick_run["run_dir"]
    manifest = Manifest(run)
    stages = manifest.stages
    # the run records what made it: the whole config and the package versions
    assert manifest.data["config"]["model"] == "tiny-llama"
    assert manifest.data["config"]["trust_remote_code"] is False
    assert {"evoray", "torch", "ray", "transformers", "peft"} <= set(manifest.data["versions"])
    assert {"task", "base/evaluate"} <= set(stages)
    for r in (1, 2):
        rd = f"{run}/round_{r:02d}"
        assert all(f"round_{r:02d}/{s}" in stages for s in STAGES)
        pool = read_records(f"{rd}/pool.jsonl", "candidate")
        clean = read_records(f"{rd}/clean.jsonl", "candidate")
        picked = read_records(f"{rd}/selection/selected.jsonl", "candidate")
        assert len(pool) == 120 and all(x["id"].startswith(f"r{r:02d}-") for x in pool)
        cs = stages[f"round_{r:02d}/clean"]["stats"]
        assert cs["kept"] == len(clean) and cs["generated"] == len(pool)
        assert len(picked) == round(0.2 * len(clean))
        assert {x["id"] for x in picked} <= {x["id"] for x in clean}
        scores = pq.read_table(f"{rd}/selection/scores.parquet").to_pydict()
        assert sum(scores["selected"]) == len(picked)
        with open(f"{rd}/adapter/adapter_config.json") as f:
            assert json.load(f)["r"] > 0
        with open(f"{rd}/metrics.json") as f:
            m = json.load(f)
        assert m["n_test"] == 500 and 0 <= m["accuracy"] <= 1 and m["n_selected"] == len(picked)
        assert abs(sum(m["mix"].values()) - 1) < 1e-9
        assert abs(sum(m["pool_mix"].values()) - 1) < 1e-9
    # the proxy of round 2 is the round-1 model
    assert stages["round_02/features"]["stats"]["proxy"] == "round 1 model"
    printed = "\n".join(quick_run["lines"]).splitlines()
    arm = printed.index(f"[demo] arm evoselect: {run}")
    table = [line for line in printed[arm:] if line.lstrip().startswith(("0 ", "1 ", "2 "))]
    assert [line.split()[0] for line in table] == ["0", "1", "2"]
    assert quick_run["lines"][-1].startswith("[demo] report:")


@pytest.mark.slow
def test_demo_arms_share_the_pools_and_report_side_by_side(quick_run):
    """The quick demo's random arm sees the EvoSelect arm's generated pools, reads no
    features, picks as many, both arms share one base evaluation, and both arms' rounds are in
    the side-by-side table."""
    from pathlib import Path

    demo = quick_run["demo"]
    rand, evo = demo["arms"]["random"], demo["arms"]["evoselect"]
    assert Path(rand["run_dir"]).parent == Path(evo["run_dir"]).parent == Path(demo["run_dir"])
    for r in (1, 2):
        pools = [read_records(f"{out['run_dir']}/round_{r:02d}/clean.jsonl", "candidate")
                 for out in (rand, evo)]
        assert pools[0] == pools[1]
        assert not Path(f"{rand['run_dir']}/round_{r:02d}/features").exists()
        assert rand["rounds"][r - 1]["n_selected"] == evo["rounds"][r - 1]["n_selected"]
    text = Path(demo["report"]).read_text()
    for out, method in ((rand, "random"), (evo, "evoselect")):
        for m in out["rounds"]:
            assert f"| {m['round']} | {method} | {m['accuracy']:.3f} |" in text
        assert f"]({method}/report.md)" in text and Path(out["report"]).exists()
    assert f"| 0 | base model | {evo['base']['accuracy']:.3f} |" in text
    assert evo["base"] == rand["base"]  # evaluated once, by the first arm


@pytest.mark.slow
def test_existing_run_is_refused_without_resume_and_skipped_with_it(quick_run):
    cfg = demo_config(quick=True, **{"evolve.run_dir": quick_run["run_dir"]})
    with pytest.raises(EvorayError, match="--resume"):
        evolve(cfg, say=lambda _: None)
    lines = []
    out = evolve(cfg, resume=True, say=lines.append)
    assert sum("done earlier, skipped" in line for line in lines) == 2 + 2 * len(STAGES)
    assert out["rounds"] == quick_run["rounds"]


@pytest.mark.slow
def test_failure_after_round2_selection_then_resume_gives_the_same_run(quick_run, quick_round_one,
                                                                         monkeypatch):
    """Round 1 comes from the reference run (``quick_round_one``, to keep the test short);
    round 2 fails right after its selection is recorded, and ``--resume`` finishes it."""
    run = str(quick_round_one)
    cfg = demo_config(quick=True, **{"evolve.run_dir": run})
    monkeypatch.setenv(FAIL_ENV, "round_02/select")
    with pytest.raises(EvorayError, match="injected failure after round_02/select"):
        evolve(cfg, resume=True, say=lambda _: None)
    assert (quick_round_one / "round_02" / "selection" / "selected.parquet").exists()
    assert not (quick_round_one / "round_02" / "adapter").exists()
    monkeypatch.delenv(FAIL_ENV)
    lines = []
    out = evolve(cfg, resume=True, say=lines.append)
    assert "[evolve] round_02/select: done earlier, skipped" in lines
    assert not any(line.startswith("[evolve] round_02/train: done earlier") for line in lines)
    for r in (1, 2):
        assert _selected_ids(run, r) == _selected_ids(quick_run["run_dir"], r)
    for got, want in zip(out["rounds"], quick_run["rounds"], strict=True):
        assert abs(got["accuracy"] - want["accuracy"]) <= 1e-6
        assert abs(got["loss"] - want["loss"]) <= 1e-6


@pytest.mark.slow
def test_changed_setting_reruns_what_it_reaches_replay(quick_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(quick_run["run_dir"], run)
    cfg = demo_config(quick=True, **{"evolve.run_dir": run, "evolve.replay": True})
    lines = []
    evolve(cfg, resume=True, say=lines.append)
    ran = [line.split()[1].rstrip(":") for line in lines
           if line.startswith("[evolve] round_") and "done earlier" not in line]
    assert ran == ["round_02/train", "round_02/evaluate"]
    data = read_records(f"{run}/round_02/train.jsonl", "candidate")
    both = _selected_ids(run, 1) + _selected_ids(run, 2)
    assert [x["id"] for x in data] == both


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_report_of_the_quick_run(quick_run):
    import re
    from pathlib import Path

    report = Path(quick_run["report"])
    text = report.read_text()
    accs = [m["accuracy"] for m in quick_run["rounds"]]
    for acc in accs:
        assert f"{acc:.3f}" in text
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert len(links) >= 3
    for link in links:
        w, h = _png_size(report.parent / link)
        assert w > 0 and h > 0
    import matplotlib.image

    assert np.asarray(matplotlib.image.imread(report.parent / links[0])).size > 0


@pytest.mark.slow
def test_fixed_proxy_reuses_round1_proxy(quick_run, tmp_path):
    from evoray.data.features import read_features

    run = str(tmp_path / "run")
    shutil.copytree(quick_run["run_dir"], run)
    cfg = demo_config(quick=True, **{"evolve.run_dir": run, "evolve.fixed_proxy": True})
    lines = []
    evolve(cfg, resume=True, say=lines.append)
    ran = [line.split()[1].rstrip(":") for line in lines
           if line.startswith("[evolve] round_") and "done earlier" not in line]
    assert ran[:2] == ["round_02/proxy", "round_02/features"] and "round_01/features" not in ran
    with open(f"{run}/round_01/proxy.json") as f1, open(f"{run}/round_02/proxy.json") as f2:
        p1, p2 = json.load(f1), json.load(f2)
    assert p2["proxy"] == "base model" and {**p2, "proxy": None} == {**p1, "proxy": None}
    assert Manifest(run).stages["round_02/features"]["stats"]["proxy"] == "base + fresh LoRA"
    t1 = read_features(f"{run}/round_01/features/targets")
    t2 = read_features(f"{run}/round_02/features/targets")
    assert t1.X.tobytes() == t2.X.tobytes()  # the same proxy gives the same target features
    moved = read_features(f"{quick_run['run_dir']}/round_02/features/targets")
    assert moved.X.tobytes() != t2.X.tobytes()  # the evolving proxy gave other features
