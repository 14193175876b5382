"""``evoray report`` on a synthetic run directory written with the real writers."""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from evoray.data.features import write_features
from evoray.data.io import write_records
from evoray.errors import EvorayError, RecordError
from evoray.report import main_score, pca2, register, write_report
from evoray.report_run import load_run

KINDS = ("clean", "wrong_label", "off_task", "near_duplicate")
ACCURACY = {0: 0.25, 1: 0.3125, 2: 0.4375}
LOSS = {0: 2.5, 1: 2.125, 2: 1.875}
N_POOL, N_CLEAN, N_SEL, DIM = 40, 36, 9, 16
PROXY = {r: {"accuracy": acc, "auc": auc, "n": 12, "at_chance": acc < 0.5}
         for r, acc, auc in ((1, 0.25, 0.5), (2, 0.75, 0.875), (3, 0.5, 0.625))}


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _round(run: Path, r: int, *, upto: str = "evaluate", kinds: bool = True,
           method: str = "evoselect") -> None:
    """Write round ``r``'s files, stopping after stage ``upto``."""
    rng = np.random.default_rng(r)
    d = run / f"round_{r:02d}"
    pool = [{"id": f"r{r}-{i}", "prompt": f"What is {i} + {r}?", "response": str(i + r),
             "source": "simulated", **({"meta": {"kind": KINDS[i % 4]}} if kinds else {})}
            for i in range(N_POOL)]
    write_records(pool, str(d / "pool.jsonl"), "candidate")
    clean = pool[:N_CLEAN]
    write_records(clean, str(d / "clean.jsonl"), "candidate")
    _json(d / "proxy.json", PROXY[r])
    ids = np.array([c["id"] for c in clean])
    G = rng.standard_normal((N_CLEAN, DIM)).astype(np.float32)
    write_features(str(d / "features" / "pool"), ids, G)
    write_features(str(d / "features" / "targets"), np.array([f"t{j}" for j in range(12)]),
                   rng.standard_normal((12, DIM)).astype(np.float32))
    if upto == "features":
        return
    align = rng.random(N_CLEAN)
    picks = np.argsort(-align)[:N_SEL]
    chosen = np.zeros(N_CLEAN, bool)
    chosen[picks] = True
    (d / "selection").mkdir()
    pq.write_table(pa.table({"id": ids[picks], "rank": np.arange(1, N_SEL + 1),
                             "alignment": align[picks]}), d / "selection" / "selected.parquet")
    write_records([clean[i] for i in picks], str(d / "selection" / "selected.jsonl"), "candidate")
    _json(d / "selection" / "summary.json", {"method": method, "selected": N_SEL})
    cols = {"id": ids, "selected": chosen}
    if method != "random":
        cols |= {"alignment": align, "novelty": rng.random(N_CLEAN)}
    pq.write_table(pa.table(cols), d / "selection" / "scores.parquet")
    if upto == "select":
        return
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text("{}")
    mix = {"clean": 0.75, "wrong_label": 0.25, "off_task": 0.0, "near_duplicate": 0.0}
    _json(d / "metrics.json", {
        "round": r, "accuracy": ACCURACY[r], "loss": LOSS[r], "n_test": 16,
        "per_subtask": {"add": {"accuracy": ACCURACY[r], "n": 16}},
        "n_generated": N_POOL, "n_clean": N_CLEAN, "n_selected": N_SEL,
        "clean_stats": {"duplicates": 4, "contaminated": 0, "invalid": 0},
        "mix": mix if kinds else None, "pool_mix": dict.fromkeys(KINDS, 0.25) if kinds else None,
        "seconds": {"generate": 1.5, "select": 0.5, "train": 10.0}, "proxy": PROXY[r]})


def _run(tmp_path: Path, *, rounds: int = 2, finished: int = 2, kinds: bool = True,
         method: str = "evoselect") -> Path:
    run = tmp_path / "run"
    config = {"model": "tiny-llama", "select": {"method": method, "ratio": 0.25, "k": None},
              "generate": {"kind": "simulated", "preset": "weak", "pool_size": N_POOL},
              "evolve": {"rounds": rounds, "task": "arithmetic"}}
    _json(run / "manifest.json", {"version": 2, "config": config, "stages": {}})
    _json(run / "base" / "metrics.json", {"round": 0, "accuracy": ACCURACY[0], "loss": LOSS[0],
                                          "n_test": 16, "per_subtask": {}})
    for r in range(1, rounds + 1):
        if r <= finished:
            _round(run, r, kinds=kinds, method=method)
        elif r == finished + 1:
            _round(run, r, upto="select", kinds=kinds, method=method)
    return run


def _row(text: str, first: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _images(run: Path, text: str) -> list[str]:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for link in links:
        data = (run / link).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", link
        img = imread(run / link)
        assert img.shape[0] > 50 and img.shape[1] > 50, link
    return links


def test_report_of_a_finished_run(tmp_path):
    run = _run(tmp_path)
    path = write_report(str(run))
    assert path == str(run / "report.md")
    text = Path(path).read_text()
    assert "| model | tiny-llama |" in text and "| method | evoselect |" in text
    assert "| budget | ratio 0.25 |" in text and "| rounds | 2 |" in text
    head = _row(text, "round")
    assert head[:8] == ["round", "accuracy", "loss", "proxy acc.", "proxy AUC", "n_generated",
                        "n_clean", "n_selected"]
    assert head[8:12] == [f"{k} %" for k in KINDS] and head[-1] == "status"
    assert _row(text, "0 (base)")[:5] == ["0 (base)", "0.2500", "2.5000", "–", "–"]
    proxy = {1: ["0.250", "0.500 (chance)"], 2: ["0.750", "0.875"]}
    for r in (1, 2):
        row = _row(text, str(r))
        assert row[:8] == [str(r), f"{ACCURACY[r]:.4f}", f"{LOSS[r]:.4f}", *proxy[r], "40",
                           "36", "9"]
        assert row[8:12] == ["75.0% (25.0%)", "25.0% (25.0%)", "0.0% (25.0%)", "0.0% (25.0%)"]
        assert row[12:] == ["12.0", "done"]
    links = _images(run, text)
    assert links == ["plots/accuracy.png", "plots/scores.png", "plots/mix.png", "plots/pca.png"]
    assert "`alignment` (evoselect" in text  # the caption names the score column


def test_unfinished_round_still_reports(tmp_path):
    run = _run(tmp_path, rounds=3, finished=1)  # round 2 stops after select, round 3 not begun
    text = Path(write_report(str(run))).read_text()
    assert _row(text, "1")[-1] == "done"
    row2 = _row(text, "2")
    # counted from the files written so far; the proxy's figures from round_02/proxy.json
    assert row2[1:8] == ["–", "–", "0.750", "0.875", "40", "36", "9"]
    chosen = [json.loads(ln)["meta"]["kind"]
              for ln in (run / "round_02/selection/selected.jsonl").read_text().splitlines()]
    share = chosen.count("clean") / len(chosen)  # meta.kind shares of selected.jsonl, clean.jsonl
    assert row2[8] == f"{share:.1%} (25.0%)"
    assert row2[-1] == "missing train (adapter)"
    assert _row(text, "3")[-1] == "not started"
    links = _images(run, text)
    assert "plots/pca.png" in links and "plots/scores.png" in links


def test_missing_metrics_names_the_stage(tmp_path):
    run = _run(tmp_path, finished=2)
    (run / "round_02" / "metrics.json").unlink()
    rounds = {r.round: r for r in load_run(str(run)).rounds}
    assert rounds[2].status == "missing evaluate (metrics.json)"


def test_missing_base_and_malformed_metrics(tmp_path):
    run = _run(tmp_path, finished=1)
    (run / "base" / "metrics.json").unlink()
    text = Path(write_report(str(run))).read_text()
    assert _row(text, "0 (base)")[-1] == "missing base/metrics.json"
    assert _row(text, "1")[1] == "0.3125"
    (run / "round_01" / "metrics.json").write_text('{"round": 1,')
    with pytest.raises(RecordError, match=r"round_01/metrics.json:1: malformed JSON"):
        write_report(str(run))


def test_without_meta_kind_or_scores(tmp_path):
    run = _run(tmp_path, kinds=False, method="random")
    text = Path(write_report(str(run))).read_text()
    assert "wrong_label" not in text and "Make-up" not in text
    assert _images(run, text) == ["plots/accuracy.png", "plots/pca.png"]


def test_uri_and_other_out(tmp_path):
    run = _run(tmp_path, finished=1)
    out = tmp_path / "elsewhere"
    path = write_report(f"file://{run}", out=f"file://{out}")
    assert path == f"file://{out}/report.md"
    text = (out / "report.md").read_text()
    assert _row(text, "1")[1] == "0.3125"
    assert len(_images(out, text)) == 4


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_bad_run_dir(tmp_path, make):
    path = tmp_path / "nope"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("x")
    with pytest.raises(EvorayError, match=re.escape(str(path))):
        write_report(str(path))
    assert not (path / "report.md").exists()


def test_cli(tmp_path, capsys):
    run = _run(tmp_path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert str(run / "report.md") in out and "| 2 | 0.4375 |" in out


@pytest.mark.parametrize("method, expected", [
    ("evoselect", "alignment"), ("tsds", "probability"), ("attribution", "attribution"),
    ("attr_div", "attribution"), ("diversity", "centroid_cos"), ("random", None),
    ("custom", "score")])
def test_main_score(method, expected):
    columns = {"evoselect": ["alignment", "novelty"], "tsds": ["probability", "kde"],
               "attribution": ["attribution"], "attr_div": ["attribution", "centroid_cos"],
               "diversity": ["centroid_cos"], "random": [], "custom": ["other", "score"]}[method]
    assert main_score(["id", "selected", *columns], columns, method) == expected


def test_pca2_matches_exact_svd():
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((500, 2)) * [5.0, 2.0]) @ rng.standard_normal((2, 64))
    X = (X + 0.01 * rng.standard_normal((500, 64))).astype(np.float32)
    P, share = pca2(X)
    Xc = X - X.mean(axis=0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    exact = Xc @ vt[:2].T
    for j in range(2):
        assert abs(np.corrcoef(P[:, j], exact[:, j])[0, 1]) > 0.999
    np.testing.assert_allclose(share, s[:2] ** 2 / (s ** 2).sum(), rtol=1e-3)
