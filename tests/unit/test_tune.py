"""Sweeps without Ray: the search space, resources, bad input through the CLI, and the report
written from trial rows (results.csv, summary.md pivots, plots, best_config.yaml)."""

import csv
import importlib.util
import math
from pathlib import Path

import pytest

from evoray.cli import main
from evoray.config import load_config
from evoray.errors import ConfigError
from evoray.tune_report import best_row, pivot_table, write_outputs
from evoray.tune_space import check_config, expected_trials, parse_space, plan_concurrency

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "tune_configs" / "quick.yaml")


def _cfg(*overrides: str):
    return load_config(QUICK, list(overrides))


@pytest.mark.parametrize("name,trials", [("quick", 4), ("ratio_lambda", 15), ("methods", 18)])
def test_every_tune_config_loads_and_checks(name, trials):
    cfg = load_config(str(ROOT / "tune_configs" / f"{name}.yaml"))
    space = check_config(cfg)
    assert expected_trials(cfg, space) == trials
    assert cfg.sweep.metric == "dev_accuracy"
    if name == "ratio_lambda":
        assert space == {"select.ratio": ("grid", [0.05, 0.1, 0.2]),
                         "select.lam": ("grid", [0.0, 0.25, 0.5, 0.75, 1.0])}
        assert cfg.model == "smollm2-135m" and cfg.generate.preset == "weak"
    if name == "methods":
        from evoray.config import SELECT_METHODS

        assert sorted(space["select.method"][1]) == sorted(SELECT_METHODS)


@pytest.mark.parametrize("space,part", [
    ("{}", "sweep.space: empty"),
    ("{select.ratio: {grid: []}}", "empty grid"),
    ("{select.ration: {grid: [0.1]}}", "did you mean 'select.ratio'"),
    ("{selct.ratio: {grid: [0.1]}}", "did you mean 'select'"),
    ("{train.lrr: {loguniform: [1.0e-5, 1.0e-3]}}", "did you mean 'train.lr'"),
    ("{select.ratio: [0.1, 0.2]}", "expected one of {grid: [...]}"),
    ("{select.ratio: {grid: [0.1, 1.5]}}", "select.ratio: 1.5 is out of range"),
    ("{train.epochs: {grid: [1, two]}}", "train.epochs: wrong type str"),
    ("{train.lr: {uniform: [0.1, 0.01]}}", "uniform needs [low, high]"),
    ("{train.lr: {loguniform: [0, 0.01]}}", "low > 0"),
    ("{features.dim: {grid: [128, 256]}}", "select.* and train.* only"),
    ("{train.num_workers: {grid: [0, 1]}}", "decides every trial's resources"),
    ("{select: {grid: [{ratio: 0.1}]}}", "names a whole section"),
])
def test_bad_search_spaces_are_refused(space, part):
    with pytest.raises(ConfigError, match="sweep.space") as err:
        parse_space(_cfg(f"sweep.space={space}"))
    assert part in str(err.value)


def test_distributions_and_trial_counts():
    cfg = _cfg("sweep.space={select.ratio: {grid: [0.1, 0.2]}, train.lr: {loguniform: "
               "[1.0e-5, 1.0e-3]}, train.epochs: {randint: [1, 4]}}", "sweep.num_samples=3")
    space = check_config(cfg)
    assert space["train.lr"] == ("loguniform", [1e-5, 1e-3])
    assert expected_trials(cfg, space) == 6
    cfg = _cfg("sweep.search=random", "sweep.num_samples=5")
    assert expected_trials(cfg, check_config(cfg)) == 5


def test_optuna_search_names_the_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ConfigError, match=r"optuna package.*pip install optuna"):
        check_config(_cfg("sweep.search=optuna"))


@pytest.mark.parametrize("overrides,part", [
    (["sweep.metric=test_accuracy"], "test metrics are for reporting only"),
    (["sweep.grace_period=5"], "more than the most epochs a trial trains (2)"),
    (["train.max_steps=10"], "sweeps count epochs"),
    (["train.early_stop_patience=2"], "its scheduler stops trials"),
    (["train.use_gpu=true"], "set train.num_workers >= 1 for GPU trials"),
    (["evolve.targets=t.jsonl"], "evolve.dev: a sweep scores trials on a dev split"),
])
def test_other_config_errors(overrides, part):
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(*overrides))
    assert part in str(err.value)


def test_concurrency_from_resources():
    assert plan_concurrency(_cfg(), {"CPU": 2.0}) == 2
    assert plan_concurrency(_cfg("train.cpus_per_worker=0.5"), {"CPU": 2.0}) == 4
    assert plan_concurrency(_cfg("sweep.max_concurrent_trials=1"), {"CPU": 8.0}) == 1
    multi = _cfg("train.num_workers=2", "train.cpus_per_worker=1.0", "sweep.trial_cpus=0.5")
    assert plan_concurrency(multi, {"CPU": 8.0}) == 3  # 2.5 CPU a trial
    gpu = _cfg("train.num_workers=2", "train.use_gpu=true", "sweep.trial_cpus=1")
    assert plan_concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4


@pytest.mark.parametrize("overrides,available,largest,part", [
    (["train.num_workers=4"], {"CPU": 2.0}, None, "4 Train worker(s) x 1 CPU"),
    (["train.num_workers=1", "train.use_gpu=true"], {"CPU": 8.0}, None, "GPU 1"),
    (["sweep.trial_cpus=4"], {"CPU": 8.0}, {"CPU": 2.0}, "the largest node has 2 CPU"),
])
def test_resources_no_trial_can_get(overrides, available, largest, part):
    with pytest.raises(ConfigError, match="no trial can start") as err:
        plan_concurrency(_cfg(*overrides), available, largest)
    assert part in str(err.value) and "sweep.resources" in str(err.value)


@pytest.mark.parametrize("overrides,part", [
    (["sweep.space={select.ration: {grid: [0.1]}}"], "did you mean 'select.ratio'"),
    (["sweep.space={select.ratio: {grid: []}}"], "empty grid"),
    (["train.num_workers=4", "sweep.resources={CPU: 2}"], "no trial can start"),
])
def test_cli_errors_come_before_ray(tmp_path, capsys, monkeypatch, overrides, part):
    import evoray.tune

    monkeypatch.setattr(evoray.tune, "_start_ray", lambda cfg: pytest.fail("Ray was started"))
    assert main(["sweep", QUICK, f"sweep.sweep_dir={tmp_path / 's'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evoray: error: ") and part in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


# -- the report, from rows such as collect() makes ------------------------------------------

def _rows():
    rows, n = [], 0
    for lam in (0.0, 0.5, 1.0):
        for ratio in (0.1, 0.2):
            n += 1
            rows.append({"trial_id": f"t_{n:05d}", "status": "done", "select.ratio": ratio,
                         "select.lam": lam, "method": "evoselect", "ratio": ratio, "lam": lam,
                         "epochs": 2, "epochs_run": 2, "dev_accuracy": 0.3 + 0.1 * lam + ratio,
                         "dev_loss": 1.0, "test_accuracy": 0.9 - 0.1 * lam - ratio,
                         "test_loss": 1.1, "pool": 100, "time_s": 3.0, "error": ""})
    rows[-1].update(status="stopped", epochs_run=1)
    return rows


def test_best_and_pivots_use_dev_only():
    rows = _rows()
    best = best_row(rows, "dev_accuracy", "max")
    assert (best["lam"], best["ratio"]) == (1.0, 0.2)  # the worst on test: never chosen by it
    table = pivot_table(rows, "lam", "ratio", "dev_accuracy", "dev_accuracy", "max", "λ")
    assert table[0] == "| λ | 0.1 | 0.2 |"
    assert table[2:] == ["| 0 | 0.400 | 0.500 |", "| 0.5 | 0.450 | 0.550 |",
                         "| 1 | 0.500 | 0.600 |"]
    assert best_row(rows, "dev_loss", "min")["trial_id"] == "t_00001"  # ties: first trial


def test_write_outputs(tmp_path):
    cfg = _cfg(f"sweep.sweep_dir={tmp_path}")
    space = check_config(cfg)
    files = write_outputs(cfg, space, _rows(), [{"trial_id": "t_00001", "epoch": 1}],
                          seconds=12.0)
    with open(files["results"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and {"trial_id", "status", "dev_accuracy", "test_accuracy",
                                "time_s", "lam", "ratio"} <= set(table[0])
    assert all(math.isfinite(float(r["dev_accuracy"])) for r in table)
    md = Path(files["summary"]).read_text()
    assert "## Dev accuracy: λ (rows) × ratio (columns), EvoSelect" in md
    assert "## Test accuracy: λ (rows) × ratio (columns), EvoSelect" in md
    assert "| 1 | 0.500 | 0.600 |" in md and "1 stopped early by ASHA" in md
    for name in ("accuracy_vs_ratio", "tradeoff"):
        assert Path(files[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(files["best_config"])
    assert (best.select.lam, best.select.ratio) == (1.0, 0.2)
    assert best.evolve.run_dir == f"{tmp_path}/best_run" and best.model == "tiny-llama"
    assert files["best"]["trial_id"] == "t_00006"


def test_collect_statuses_from_tune_results():
    from types import SimpleNamespace

    import pandas as pd

    from evoray.tune_report import collect

    cfg = _cfg()
    space = check_config(cfg)

    def result(tid, epochs, error=None):
        m = {"trial_id": tid, "epoch": epochs, "dev_accuracy": 0.3, "time_total_s": 2.0}
        df = pd.DataFrame([{**m, "epoch": e + 1} for e in range(epochs)])
        return SimpleNamespace(metrics=m if epochs else {}, error=error, metrics_dataframe=df,
                               checkpoint=None,
                               config={"select.ratio": 0.1, "select.lam": 0.0},
                               path=f"/x/tune/_trial_{tid}_0_select_lam=0.0")

    grid = [result("abcde_00000", 2), result("abcde_00001", 1), result("abcde_00002", 1),
            result("abcde_00003", 0, error=RuntimeError("boom\nmore"))]
    rows, epochs = collect(grid, cfg, space, {"abcde_00000", "abcde_00001", "abcde_00003"})
    assert [r["status"] for r in rows] == ["done", "stopped", "unfinished", "error"]
    assert rows[3]["trial_id"] == "abcde_00003" and rows[3]["error"] == "boom"
    assert len(epochs) == 4 and rows[0]["epochs_run"] == 2


def test_collect_keeps_one_row_per_epoch_after_a_resume():
    """A trial cut off by a stopped driver reports epoch 1 again after --resume (it restarted
    afresh): epochs.csv keeps the later report only."""
    from types import SimpleNamespace

    import pandas as pd

    from evoray.tune_report import collect

    cfg = _cfg()
    space = check_config(cfg)
    reports = [{"trial_id": "abcde_00000", "epoch": 1, "dev_accuracy": 0.1},
               {"trial_id": "abcde_00000", "epoch": 1, "dev_accuracy": 0.2},
               {"trial_id": "abcde_00000", "epoch": 2, "dev_accuracy": 0.3}]
    res = SimpleNamespace(metrics=reports[-1], error=None, metrics_dataframe=pd.DataFrame(reports),
                          checkpoint=None, config={"select.ratio": 0.1, "select.lam": 0.0},
                          path="/x/tune/_trial_abcde_00000_0")
    rows, epochs = collect([res], cfg, space, {"abcde_00000"})
    assert [(e["epoch"], e["dev_accuracy"]) for e in epochs] == [(1, 0.2), (2, 0.3)]
    assert rows[0]["epochs_run"] == 2
