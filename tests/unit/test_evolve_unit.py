"""Pool cleaning, the manifest, and the demo's embedded defaults (no Ray)."""

import json
import os

import pytest

from evoray.config import load_config
from evoray.demo import demo_config
from evoray.errors import EvorayError
from evoray.evolve import format_table
from evoray.stages import Manifest, clean_pool


def _cand(i, prompt, response="A", **extra):
    return {"id": f"c{i}", "prompt": prompt, "response": response, **extra}


def test_clean_pool_drops_invalid_duplicates_and_contaminated(tmp_path):
    raw = tmp_path / "pool.jsonl"
    recs = [_cand(0, "What is 1+1?\nA. 2\nAnswer:"),
            _cand(1, "what is  1+1?\nA. 2\nAnswer:"),          # same after normalising
            _cand(0, "Another question?\nAnswer:"),              # duplicate id
            _cand(3, "Eval question?\nAnswer:"),                 # in the eval set
            {"id": "c4", "prompt": "", "response": "A"},         # invalid: empty prompt
            {"id": "c5", "prompt": "ok?", "response": "A", "junk": 1},  # invalid: unknown field
            _cand(6, "What is 1+1?\nA. 2\nAnswer:", "B"),        # same prompt, other response
            ]
    lines = [json.dumps(r) for r in recs] + ["{not json"]
    raw.write_text("\n".join(lines) + "\n")
    out = tmp_path / "clean.jsonl"
    stats = clean_pool(str(raw), str(out), {"eval question? answer:"})
    assert stats == {"generated": 8, "invalid": 3, "duplicates": 2, "contaminated": 1, "kept": 2}
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == ["c0", "c6"]


def test_clean_pool_that_empties_is_an_error_and_writes_nothing(tmp_path):
    raw = tmp_path / "pool.jsonl"
    raw.write_text(json.dumps(_cand(0, "Eval question?\nAnswer:")) + "\n")
    with pytest.raises(EvorayError, match="no candidate left"):
        clean_pool(str(raw), str(tmp_path / "clean.jsonl"), {"eval question? answer:"})
    assert not (tmp_path / "clean.jsonl").exists()


def test_manifest_records_and_matches(tmp_path):
    m = Manifest(str(tmp_path))
    (tmp_path / "out.txt").write_text("x")
    m.record("round_01/select", "abc", 1.5, {"selected": 3})
    again = Manifest(str(tmp_path))
    assert again.done("round_01/select", "abc", [str(tmp_path / "out.txt")])["stats"] == \
        {"selected": 3}
    assert again.done("round_01/select", "other", [str(tmp_path / "out.txt")]) is None
    assert again.done("round_01/select", "abc", [str(tmp_path / "missing")]) is None
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(EvorayError, match="manifest.json: not valid JSON"):
        Manifest(str(tmp_path))


@pytest.mark.parametrize("quick,name", [(False, "demo"), (True, "quick")])
def test_job_configs_are_the_demo_defaults(quick, name):
    assert load_config(f"jobs/configs/{name}.yaml") == demo_config(quick=quick)


def test_demo_is_the_strong_lookup_setting_in_process():
    cfg = demo_config()
    assert (cfg.model, cfg.generate.kind, cfg.generate.preset, cfg.evolve.task) == (
        "smollm2-135m", "simulated", "strong", "lookup")
    assert (cfg.evolve.rounds, cfg.generate.pool_size, cfg.select.method, cfg.select.ratio,
            cfg.train.num_workers, cfg.train.bf16, cfg.train.epochs) == (
        1, 600, "evoselect", 0.3333, 0, True, 6)
    # jobs/configs/demo.yaml is the same run for `ray job submit`
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert load_config(os.path.join(root, "jobs", "configs", "demo.yaml"), []) == cfg


def test_demo_arms_and_side_by_side_table():
    from evoray.demo import arms, compare_table

    assert arms(demo_config()) == ("random", "evoselect")
    assert arms(demo_config(**{"select.method": "tsds"})) == ("random", "tsds")
    assert arms(demo_config(**{"select.method": "random"})) == ("random",)
    base = {"round": 0, "accuracy": 0.25}
    results = {
        "random": {"base": base, "rounds": [
            {"round": 1, "accuracy": 0.5, "n_selected": 10, "mix": {"clean": 0.6,
                                                                    "off_task": 0.4}}]},
        "evoselect": {"base": base, "rounds": [
            {"round": 1, "accuracy": 0.75, "n_selected": 10, "mix": {"clean": 1.0}}]}}
    lines = compare_table(results)
    assert lines[2] == "| 0 | base model | 0.250 | – | – | – | – | – |"
    assert lines[3] == "| 1 | random | 0.500 | 10 | 60 | 0 | 40 | 0 |"
    assert lines[4] == "| 1 | evoselect | 0.750 | 10 | 100 | 0 | 0 | 0 |"
    assert len(lines) == 5


def test_format_table_shows_make_up():
    rows = [{"round": 0, "accuracy": 0.25, "loss": 2.0},
            {"round": 1, "accuracy": 0.5, "loss": 1.0, "n_generated": 10, "n_clean": 9,
             "n_selected": 2, "mix": {"clean": 0.5, "wrong_label": 0.5, "off_task": 0.0,
                                      "near_duplicate": 0.0},
             "proxy": {"accuracy": 0.275, "auc": 0.5125, "n": 40}}]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[3:5] == ["p.acc", "p.AUC"]
    assert lines[1].split()[:5] == ["0", "0.250", "2.000", "-", "-"]
    assert lines[2].split() == ["1", "0.500", "1.000", "0.28", "0.51", "10", "9", "2", "50",
                                "50", "0", "0"]


def test_manifest_of_another_version_is_refused(tmp_path):
    import json

    from evoray.errors import EvorayError
    from evoray.stages import MANIFEST_VERSION

    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "config": None,
                                                        "stages": {}}))
    with pytest.raises(EvorayError, match=f"manifest version 1, this one writes "
                                          f"{MANIFEST_VERSION}.*start a new run"):
        Manifest(str(tmp_path))


def test_selection_key_ignores_the_other_selectors_settings():
    from evoray.config import load_config
    from evoray.stages import select_inputs

    base = select_inputs(load_config(None, []))
    assert select_inputs(load_config(None, ["select.tsds.kde_K=7"])) == base
    assert select_inputs(load_config(None, ["select.evoselect.novelty_pcs=0"])) != base
    assert select_inputs(load_config(None, ["select.method=tsds"])) != base


def test_base_metrics_are_reused_only_for_the_same_model_test_set_and_length(tmp_path,
                                                                          monkeypatch):
    """The demo's second arm copies the first arm's round 0 instead of evaluating the base model
    again, but only when model, test set and max_length are the same; otherwise it evaluates."""
    import evoray.train
    from evoray.evolve import _Loop

    calls = []

    def fake_evaluate(model, adapter, test, **kw):
        calls.append((model, adapter, test, kw["max_length"]))
        return {"accuracy": 0.5, "loss": 1.0, "n": 4, "per_subtask": {}}

    monkeypatch.setattr(evoray.train, "evaluate", fake_evaluate)
    files = {"test": "test.jsonl", "test_hash": "h1"}
    first = _Loop(demo_config(quick=True, **{"evolve.run_dir": str(tmp_path / "a")}), False,
                  lambda *_: None, False).base(files)
    assert len(calls) == 1 and first["test_hash"] == "h1" and first["model"] == "tiny-llama"

    def arm(name, known, **over):
        cfg = demo_config(quick=True, **{"evolve.run_dir": str(tmp_path / name), **over})
        return _Loop(cfg, False, lambda *_: None, False).base(dict(files), known=known)

    assert arm("b", first) == first and len(calls) == 1
    assert json.loads((tmp_path / "b" / "base" / "metrics.json").read_text()) == first
    arm("c", {**first, "test_hash": "other"})
    arm("d", first, **{"train.max_length": 64})
    arm("e", first, model="tiny-gpt2")
    assert len(calls) == 4 and calls[-1][0] == "tiny-gpt2" and calls[-2][3] == 64
