"""The bad-input matrix: one table of bad files, features, configs, models and output folders,
across every CLI command. Each row runs ``evoray ...`` in-process on a copy of a workspace that
holds good inputs and earlier outputs, and asserts that

* the exit status is non-zero;
* stderr holds exactly one ``evoray: error: ...`` line naming the file, line or field (the row's
  ``expect`` strings), and no traceback (``--debug`` shows one: see the last tests);
* nothing is written: every file of the workspace has the same SHA-256 before and after, and no
  file appears (so no partial output under a final name, and earlier outputs are untouched).

Rows whose error is found while Ray Data reads the pool share one local Ray (module fixture).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from evoray.cli import main

pytestmark = pytest.mark.timeout(300)

GOOD = {"id": "a", "prompt": "What is 2 + 2?", "response": "4"}


def _jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                    for r in records)


@dataclass
class Case:
    argv: list[str]
    expect: list[str]  # substrings of the error line
    files: dict[str, bytes] = field(default_factory=dict)  # bad files written before the run
    ray: bool = False  # the error is found by Ray Data tasks
    setup: object = None  # a function(ws) for inputs that are not plain bytes


def _nan_features(ws: Path) -> None:
    from evoray.data.features import read_features, write_features

    f = read_features(str(ws / "feats"))
    X = f.X.copy()
    X[3, 5] = np.nan
    shutil.rmtree(ws / "feats")
    write_features(str(ws / "feats"), f.ids, X)


def _narrow_targets(ws: Path) -> None:
    from evoray.data.features import read_features, write_features

    f = read_features(str(ws / "tfeats"))
    shutil.rmtree(ws / "tfeats")
    write_features(str(ws / "tfeats"), f.ids, f.X[:, :8])


def _garbage_parquet(ws: Path) -> None:
    (next((ws / "feats").glob("*.parquet"))).write_bytes(b"PAR1 not really")


SEL = ["select", "--features", "feats", "--targets", "tfeats"]
FEAT = ["features", "--model", "tiny-llama", "--no-progress", "--out", "out_feats"]

CASES: dict[str, Case] = {
    # -- pool, targets and test files --------------------------------------------------------
    "pool_malformed_json": Case(FEAT + ["--pool", "bad.jsonl"], ["bad.jsonl:2", "malformed JSON"],
                                {"bad.jsonl": _jsonl(GOOD, b'{"id": "b", "prompt": ')}, ray=True),
    "pool_empty": Case(FEAT + ["--pool", "bad.jsonl"], ["bad.jsonl", "holds no records"],
                       {"bad.jsonl": b""}, ray=True),
    "pool_duplicate_ids": Case(FEAT + ["--pool", "bad.jsonl"],
                               ["bad.jsonl:3", "field 'id'", "duplicate id 'a'", "line 1"],
                               {"bad.jsonl": _jsonl(GOOD, {**GOOD, "id": "b"}, GOOD)}, ray=True),
    "pool_wrong_type": Case(FEAT + ["--pool", "bad.jsonl"],
                            ["bad.jsonl:2", "field 'response'", "wrong type int"],
                            {"bad.jsonl": _jsonl(GOOD, {**GOOD, "id": "b", "response": 4})},
                            ray=True),
    "pool_non_utf8": Case(FEAT + ["--pool", "bad.jsonl"], ["bad.jsonl:2", "not valid UTF-8"],
                          {"bad.jsonl": _jsonl(GOOD, b'{"id": "b", "prompt": "\xff\xfe", '
                                                     b'"response": "x"}')}, ray=True),
    "pool_10mb_line": Case(FEAT + ["--pool", "bad.jsonl"],
                           ["bad.jsonl:2", "a record may hold at most 1,048,576"],
                           {"bad.jsonl": _jsonl(GOOD, {**GOOD, "id": "b",
                                                       "prompt": "x" * 10_000_000})}, ray=True),
    "pool_10mb_first_line": Case(FEAT + ["--pool", "bad.jsonl"],
                                 ["bad.jsonl:1", "a record may hold at most 1,048,576"],
                                 {"bad.jsonl": b"y" * 10_000_000}, ray=True),
    "pool_unknown_field": Case(FEAT + ["--pool", "bad.jsonl"],
                               ["bad.jsonl", "field 'reponse'", "did you mean 'response'"],
                               {"bad.jsonl": _jsonl({"id": "a", "prompt": "p", "reponse": "r"})},
                               ray=True),
    "pool_missing": Case(FEAT + ["--pool", "nowhere.jsonl"], ["nowhere.jsonl", "no such file"]),
    "pool_unknown_format": Case(FEAT + ["--pool", "task/pool.csv"],
                                ["task/pool.csv", "unknown format '.csv'"]),
    "train_data_missing_field": Case(["train", "--model", "tiny-llama", "--out", "out_adapter",
                                      "--data", "bad.jsonl"],
                                     ["bad.jsonl:1", "field 'response'", "missing"],
                                     {"bad.jsonl": _jsonl({"id": "a", "prompt": "p"})}),
    "test_answer_not_a_choice": Case(
        ["eval", "--model", "tiny-llama", "--test", "bad.jsonl"],
        ["bad.jsonl:1", "field 'answer'", "not one of the choices"],
        {"bad.jsonl": _jsonl({"id": "q", "prompt": "1 + 1?\nA. 2\nB. 3\nAnswer:",
                              "choices": ["A", "B"], "answer": "E"})}),
    # -- features ------------------------------------------------------------------------------
    "features_missing": Case(SEL[:1] + ["--features", "nowhere", "--targets", "tfeats", "--out",
                                        "out_sel"], ["nowhere", "no such features"]),
    "features_wrong_dim": Case(SEL + ["--out", "out_sel"], ["dim"], setup=_narrow_targets),
    "features_nan": Case(SEL + ["--out", "out_sel"], ["feats", "non-finite"], setup=_nan_features),
    "features_unreadable": Case(SEL + ["--out", "out_sel"], ["feats", "Parquet"],
                                setup=_garbage_parquet),
    "features_pool_mismatch": Case(SEL + ["--out", "out_sel", "--pool", "other.jsonl"],
                                   ["other.jsonl", "not in the pool"],
                                   {"other.jsonl": _jsonl(GOOD)}),
    # -- config --------------------------------------------------------------------------------
    "config_unknown_key": Case(["evolve", "select.ratoi=0.1"],
                               ["select.ratoi", "did you mean 'select.ratio'"]),
    "config_wrong_type": Case(["evolve", "evolve.rounds=abc"],
                              ["evolve.rounds", "wrong type", "expected int"]),
    "config_ratio_zero": Case(["config", "select.ratio=0"], ["select.ratio", "must be in (0, 1]"]),
    "select_ratio_above_one": Case(SEL + ["--out", "out_sel", "--ratio", "1.5"],
                                   ["ratio", "must be in (0, 1]"]),
    "config_unknown_method": Case(SEL + ["--out", "out_sel", "--method", "nope"],
                                  ["select.method", "'nope'", "valid:"]),
    "config_unknown_generator": Case(["evolve", "generate.kind=nope"],
                                     ["generate.kind", "'nope'", "valid: hf, pool, simulated"]),
    "config_negative_rounds": Case(["evolve", "evolve.rounds=-1"],
                                   ["evolve.rounds", "must be positive"]),
    "config_yaml_malformed": Case(["evolve", "bad.yaml"], ["bad.yaml:3", "invalid YAML"],
                                  {"bad.yaml": b"select:\n  ratio: [\n"}),
    "train_setting_wrong_type": Case(["train", "--model", "tiny-llama", "--data",
                                      "task/pool.jsonl", "--out", "out_adapter", "train.lr=abc"],
                                     ["train.lr", "wrong type", "expected float"]),
    # -- old override forms name the new one ---------------------------------------------------
    "train_set_gone": Case(["train", "--model", "tiny-llama", "--data", "task/pool.jsonl",
                            "--out", "out_adapter", "--set", "lr=1e-3"],
                           ["--set is gone", "train.lr=1e-3"]),
    "select_param_gone": Case(SEL + ["--out", "out_sel", "--param", "novelty=knn"],
                              ["--param is gone", "select.evoselect.novelty=knn"]),
    "select_params_key_gone": Case(SEL + ["--out", "out_sel", "select.params={novelty: knn}"],
                                   ["'select.params' is gone", "select.evoselect.novelty=knn"]),
    "sweep_empty_space": Case(["sweep", "sweep.yaml"], ["sweep.space", "empty"],
                              {"sweep.yaml": b"model: tiny-llama\nsweep:\n  space: {}\n"}),
    "demo_bad_override": Case(["demo", "--quick", "--out", "out_demo", "select.lam=2"],
                              ["select.lam", "out of range"]),
    "tasks_unknown_task": Case(["tasks", "make", "--task", "nope", "--out", "out_task"],
                               ["unknown task 'nope'"]),
    # -- models and adapters -------------------------------------------------------------------
    "model_unknown": Case(FEAT + ["--pool", "task/pool.jsonl", "--model", "no/such/model"],
                          ["model 'no/such/model'", "tiny-llama"]),
    "adapter_missing": Case(FEAT + ["--pool", "task/pool.jsonl", "--adapter", "nowhere"],
                            ["adapter 'nowhere'", "adapter_config.json"]),
    "adapter_of_another_base": Case(FEAT + ["--pool", "task/pool.jsonl", "--adapter",
                                            "gpt2_adapter"],
                                    ["adapter 'gpt2_adapter'", "'tiny-gpt2'", "'tiny-llama'"]),
    "eval_adapter_of_another_base": Case(["eval", "--model", "tiny-llama", "--adapter",
                                          "gpt2_adapter", "--test", "task/test.jsonl"],
                                         ["adapter 'gpt2_adapter'", "tiny-gpt2"]),
    "export_adapter_missing": Case(["export", "--adapter", "nowhere", "--out", "out_export"],
                                   ["adapter 'nowhere'", "adapter_config.json"]),
    # -- run folders and outputs ---------------------------------------------------------------
    "report_not_a_run": Case(["report", "nowhere"], ["nowhere", "no such run directory"]),
    "resume_manifest_not_a_manifest": Case(["evolve", "evolve.run_dir=run", "--resume"],
                                           ["run/manifest.json", "not an evoray manifest"],
                                           {"run/manifest.json": b"[]"}),
    "resume_corrupt_manifest": Case(["evolve", "evolve.run_dir=run", "--resume"],
                                    ["run/manifest.json", "not valid JSON"],
                                    {"run/manifest.json": b'{"stages": '}),
    "evolve_existing_run_without_resume": Case(["evolve", "evolve.run_dir=run"],
                                               ["run", "--resume"]),
    "select_unwritable_out": Case(SEL + ["--out", "blocker/out_sel"], ["blocker"]),
    "tasks_unwritable_out": Case(["tasks", "make", "--task", "compare", "--pool-size", "20",
                                  "--out", "blocker/task"], ["blocker"]),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Good inputs and earlier outputs: a task, features of its pool and targets, an adapter of
    tiny-gpt2, a finished run's manifest, and a plain file that blocks a folder name."""
    from evoray.config import TrainConfig
    from evoray.data.features import write_features
    from evoray.data.io import read_records
    from evoray.lora import fresh_adapter, write_meta
    from evoray.models import load_model
    from evoray.tasks import write_task

    ws = tmp_path_factory.mktemp("ws")
    paths = write_task("arithmetic", str(ws / "task"), pool_size=40,
                       sizes={"targets": 8, "dev": 8, "test": 8, "train": 8})
    (ws / "task" / "pool.csv").write_text("id,prompt,response\n")
    rng = np.random.default_rng(0)
    pool = [r["id"] for r in read_records(paths["pool"], "candidate")]
    targets = [r["id"] for r in read_records(paths["targets"], "target")]
    write_features(str(ws / "feats"), pool, rng.standard_normal((len(pool), 16)).astype("f4"))
    write_features(str(ws / "tfeats"), targets,
                   rng.standard_normal((len(targets), 16)).astype("f4"))
    model, _ = load_model("tiny-gpt2")
    peft = fresh_adapter(model, TrainConfig(target_modules=["c_attn"]), seed=0)
    peft.save_pretrained(str(ws / "gpt2_adapter"))
    write_meta(str(ws / "gpt2_adapter"), "tiny-gpt2", model)
    (ws / "run").mkdir()
    (ws / "run" / "manifest.json").write_text(json.dumps({"version": 2, "config": None, "stages": {
        "task": {"inputs": "0" * 64, "finished": "2026-12-01T00:00:00+00:00", "seconds": 1.0,
                 "stats": {}}}}))
    (ws / "blocker").write_text("a file, not a folder\n")
    return ws


@pytest.fixture(scope="module")
def local_ray():
    """The suite's Ray when the integration tests started one in this process, else our own."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(argv: list[str]) -> int:
    from evoray.ray_utils import show_console_errors

    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code
    finally:
        show_console_errors(True)  # main() turned it off for this process


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_line_and_changes_nothing(name, workspace, tmp_path, capfd,
                                                            monkeypatch, request):
    case = CASES[name]
    if case.ray:
        request.getfixturevalue("local_ray")
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    for rel, data in case.files.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(data)
    if case.setup:
        case.setup(ws)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("EVORAY_CACHE", str(tmp_path / "cache"))
    before = _snapshot(ws)
    capfd.readouterr()

    rc = _run(case.argv)

    err = capfd.readouterr().err
    assert rc not in (0, None), (name, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("evoray: error: ")]
    assert len(lines) == 1, err[-3000:]
    for part in case.expect:
        assert part in lines[0], (part, lines[0])
    assert _snapshot(ws) == before, "the failed command wrote or changed files"


def test_matrix_covers_every_command():
    commands = {c.argv[0] if c.argv[0] != "tasks" else "tasks make" for c in CASES.values()}
    assert commands >= {"features", "select", "train", "eval", "export", "report", "evolve",
                        "sweep", "demo", "config", "tasks make"}
    assert len(CASES) >= 20


def test_debug_shows_the_traceback(workspace, tmp_path, monkeypatch):
    from evoray.errors import RecordError

    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    monkeypatch.chdir(ws)
    with pytest.raises(RecordError, match="nowhere.jsonl"):
        _run(["--debug", "eval", "--model", "tiny-llama", "--test", "nowhere.jsonl"])


def test_console_script_prints_only_the_error_line(workspace):
    """The real process: exit status 2 and stderr of one line (no logging noise)."""
    exe = Path(sys.executable).with_name("evoray")
    res = subprocess.run([str(exe), "select", "--features", "nowhere", "--targets", "tfeats",
                          "--out", "out"], cwd=workspace, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["evoray: error: nowhere: no such features file or folder"]
    assert not (workspace / "out").exists()
