"""Sweeps on the suite's local Ray: tune_configs/quick.yaml stopped midway and resumed, ASHA
stopping trials early, and multi-worker (Train V2) trials. One quick sweep (the module fixture)
computes the shared features; the other sweeps reuse them through sweep.shared_dir."""

import csv
import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest

from evoray.config import load_config
from evoray.tune import STOP_ENV, SweepInterrupted, sweep

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUICK = str(Path(__file__).resolve().parents[2] / "tune_configs" / "quick.yaml")


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _attempts(root: Path) -> dict[str, list]:
    return {p.parent.name: json.loads(p.read_text())
            for p in (root / "trials").glob("*/attempts.json")}


def _live(ray) -> tuple[set, set]:
    """Placement groups not removed, and actors not dead. The State API's list_actors needs the
    dashboard, which the suite's Ray does not run: read the GCS actor table instead."""
    from ray._private.state import actors

    pgs = {k for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
    return pgs, {k for k, a in actors().items() if a["State"] != "DEAD"}


def _assert_nothing_left(ray, before: tuple[set, set], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pgs, alive = _live(ray)
        new_pgs, new_actors = pgs - before[0], alive - before[1]
        if not new_pgs and not new_actors:
            return
        if time.monotonic() > deadline:
            from ray._private.state import actors

            names = [actors()[a]["ActorClassName"] for a in new_actors]
            pytest.fail(f"left behind: placement groups {sorted(new_pgs)}, actors {names}")
        time.sleep(1)


@pytest.fixture(scope="module")
def quick_sweep(ray_session, tmp_path_factory):
    """tune_configs/quick.yaml stopped once its first trial finished (Tune's stop signal, as on
    Ctrl-C), then resumed. Counts every featurize call on the way."""
    import evoray.features.stage as stage

    root = tmp_path_factory.mktemp("sweep") / "quick"
    cfg = load_config(QUICK, [f"sweep.sweep_dir={root}"])
    calls, lines, real = [], [], stage.featurize

    def counting(pool, *args, **kwargs):
        calls.append(pool)
        return real(pool, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "featurize", counting)
        mp.setenv(STOP_ENV, "1")
        with pytest.raises(SweepInterrupted, match="rerun with --resume"):
            sweep(cfg, say=lines.append)
        first = {"calls": list(calls), "attempts": _attempts(root),
                 "finished": [x.split()[1] for x in lines if x.endswith("so far)")]}
        mp.delenv(STOP_ENV)
        out = sweep(cfg, resume=True, say=lines.append)
    return {"root": root, "out": out, "first": first, "calls": calls, "lines": lines,
            "shared": str(root / "shared")}


def test_quick_sweep_writes_one_row_per_trial_with_finite_metrics(quick_sweep):
    root, out = quick_sweep["root"], quick_sweep["out"]
    rows = _csv(root / "results.csv")
    assert len(rows) == 4 == len({r["trial_id"] for r in rows})
    assert {(r["ratio"], r["lam"]) for r in rows} == {(a, b) for a in ("0.1", "0.2")
                                                     for b in ("0.0", "1.0")}
    for r in rows:
        assert r["status"] in ("done", "stopped") and r["method"] == "evoselect"
        for key in ("dev_accuracy", "dev_loss", "test_accuracy", "test_loss", "train_loss",
                    "time_s"):
            assert math.isfinite(float(r[key])), (key, r)
        assert 1 <= int(r["epochs_run"]) <= 2 and int(r["selected"]) > 0
    per_trial = Counter(r["trial_id"] for r in _csv(root / "epochs.csv"))
    assert per_trial == {r["trial_id"]: int(r["epochs_run"]) for r in rows}
    md = (root / "summary.md").read_text()
    assert "λ (rows) × ratio (columns)" in md and (root / "plots" / "tradeoff.png").exists()
    assert out["best"]["trial_id"] in per_trial
    best = next(r for r in rows if r["trial_id"] == out["best"]["trial_id"])
    assert (Path(best["checkpoint"]) / "adapter_model.safetensors").exists()
    assert not list(root.glob("trials/*/adapter_*"))  # working copies removed at the end


def test_features_are_extracted_once_for_every_trial(quick_sweep):
    shared = Path(quick_sweep["shared"])
    # one featurize call for the pool and one for the targets, both in the first run
    assert quick_sweep["first"]["calls"] == [str(shared / "clean.jsonl"),
                                             str(shared / "task" / "targets.jsonl")]
    assert quick_sweep["calls"] == quick_sweep["first"]["calls"]  # none on --resume
    assert "[sweep] shared features: done earlier, skipped" in quick_sweep["lines"]


def test_best_config_loads_and_is_chosen_on_dev(quick_sweep):
    root = quick_sweep["root"]
    best = load_config(str(root / "best_config.yaml"))
    rows = _csv(root / "results.csv")
    top = max(float(r["dev_accuracy"]) for r in rows)
    chosen = [r for r in rows if float(r["ratio"]) == best.select.ratio
              and float(r["lam"]) == best.select.lam]
    assert len(chosen) == 1 and float(chosen[0]["dev_accuracy"]) == top
    assert best.model == "tiny-llama" and best.evolve.run_dir == f"{root}/best_run"


def test_resume_does_not_rerun_finished_trials(quick_sweep):
    first, after = quick_sweep["first"], _attempts(quick_sweep["root"])
    assert len(first["finished"]) >= 1 and len(after) == 4
    for tid in first["finished"]:
        assert len(after[tid]) == 1, (tid, after[tid])  # started once, never again
    unfinished = set(after) - set(first["finished"])
    assert unfinished and all(len(after[t]) >= 1 for t in unfinished)
    # a trial cut off midway went on from its last reported epoch, or started afresh
    for tid in unfinished & set(first["attempts"]):
        assert len(after[tid]) == len(first["attempts"][tid]) + 1


def test_asha_stops_trials_early_and_leaves_nothing_behind(quick_sweep, ray_session, tmp_path,
                                                           monkeypatch):
    import evoray.features.stage as stage

    monkeypatch.setattr(stage, "featurize", lambda *a, **k: pytest.fail("featurize called"))
    before = _live(ray_session)
    # one trial at a time, the best learning rate first: the two tiny ones are worse at rung 1
    cfg = load_config(QUICK, [
        f"sweep.sweep_dir={tmp_path / 'asha'}", f"sweep.shared_dir={quick_sweep['shared']}",
        "sweep.space={train.lr: {grid: [0.005, 1.0e-6, 2.0e-6]}}", "sweep.metric=dev_loss",
        "sweep.mode=min", "train.epochs=3", "sweep.max_concurrent_trials=1",
        "select.ratio=0.2"])
    sweep(cfg, say=lambda _: None)
    rows = {r["trial_id"]: r for r in _csv(tmp_path / "asha" / "results.csv")}
    epochs = Counter(r["trial_id"] for r in _csv(tmp_path / "asha" / "epochs.csv"))
    assert max(epochs.values()) == 3 and min(epochs.values()) < 3
    stopped = [t for t, r in rows.items() if r["status"] == "stopped"]
    assert stopped and all(epochs[t] < 3 for t in stopped)
    assert rows[min(rows)]["status"] == "done"
    _assert_nothing_left(ray_session, before)


def test_multi_worker_trials_report_every_epoch(quick_sweep, ray_session, tmp_path):
    before = _live(ray_session)
    root = tmp_path / "workers"
    cfg = load_config(QUICK, [
        f"sweep.sweep_dir={root}", f"sweep.shared_dir={quick_sweep['shared']}",
        "sweep.space={train.lr: {grid: [0.005, 0.001]}}", "sweep.scheduler=fifo",
        "train.num_workers=1", "train.cpus_per_worker=0.5", "sweep.trial_cpus=0.5",
        "select.ratio=0.2"])
    sweep(cfg, say=lambda _: None)
    rows = _csv(root / "results.csv")
    assert [r["status"] for r in rows] == ["done", "done"]
    epochs = _csv(root / "epochs.csv")
    assert sorted(int(e["epoch"]) for e in epochs) == [1, 1, 2, 2]
    assert all(math.isfinite(float(e["dev_accuracy"])) for e in epochs)
    for r in rows:  # each trial ran a Ray Train run of its own, named after it
        assert (root / "train" / r["trial_id"]).is_dir()
    _assert_nothing_left(ray_session, before)
