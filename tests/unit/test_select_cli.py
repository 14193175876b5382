"""`evoray select`: files in, selected.parquet / summary.json / selected.jsonl out, and errors."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from evoray.cli import main
from evoray.data.features import write_features


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    G = np.concatenate([centre + 0.3 * rng.normal(size=(40, 16)),
                        rng.normal(size=(160, 16))]).astype(np.float32)
    V = (centre + 0.3 * rng.normal(size=(10, 16))).astype(np.float32)
    ids = [f"c{i}" for i in range(len(G))]
    write_features(str(tmp_path / "F"), ids, G)
    write_features(str(tmp_path / "T"), [f"t{i}" for i in range(len(V))], V)
    with open(tmp_path / "pool.jsonl", "w") as f:
        for i in ids + ["extra"]:
            f.write(json.dumps({"id": i, "prompt": f"q {i}", "response": "A"}) + "\n")
    return tmp_path


def run(files, *extra):
    return main(["select", "--features", str(files / "F"), "--targets", str(files / "T"),
                 "--out", str(files / "out"), *extra])


def test_select_writes_parquet_summary_and_records(files, capsys):
    assert run(files, "--ratio", "0.1", "--pool", str(files / "pool.jsonl")) == 0
    table = pq.read_table(files / "out" / "selected.parquet").to_pylist()
    assert len(table) == 20 and [r["rank"] for r in table] == list(range(1, 21))
    first = table[0]
    assert {"id", "rank", "alignment", "novelty", "alignment_term", "novelty_term",
            "nearest_targets", "nearest_cos", "count"} <= set(first)
    assert len(first["nearest_targets"]) == 3 and first["nearest_targets"][0].startswith("t")
    assert sum(int(r["id"][1:]) < 40 for r in table) >= 18  # the planted aligned rows
    summary = json.loads((files / "out" / "summary.json").read_text())
    assert summary["method"] == "evoselect" and summary["k"] == 20
    assert summary["diagnostics"]["converged"]
    assert set(summary["diagnostics"]["timing"]) >= {"cost", "ot", "diversification"}
    records = [json.loads(x) for x in (files / "out" / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [r["id"] for r in table]
    assert records[0]["prompt"] == f"q {records[0]['id']}"
    assert "selected 20 of 200" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["random", "attribution", "diversity", "attr_div", "tsds"])
def test_select_other_methods_with_k(files, method):
    assert run(files, "--method", method, "--k", "15", "--seed", "2") == 0
    table = pq.read_table(files / "out" / "selected.parquet")
    assert table.num_rows <= 15 and sum(table["count"].to_pylist()) == 15


def test_select_settings_and_config(files, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("select: {method: evoselect, k: 12, lam: 0.5, evoselect: {novelty: knn}}\n")
    assert run(files, "--config", str(cfg), "select.evoselect.nprobe=4") == 0
    summary = json.loads((files / "out" / "summary.json").read_text())
    assert summary["k"] == 12 and summary["diagnostics"]["novelty"] == "knn"
    params = summary["diagnostics"]["params"]
    assert params["lam"] == 0.5 and params["nprobe"] == 4 and params["novelty"] == "knn"


def test_selector_settings_match_the_functions():
    """The typed settings' defaults are the selector functions' keyword defaults."""
    import dataclasses
    import inspect

    from evoray.config import SelectConfig
    from evoray.select.api import METHODS

    cfg = SelectConfig()
    for method in METHODS:
        given = SelectConfig(method=method).method_params()
        defaults = {n: p.default for n, p in inspect.signature(METHODS[method]).parameters.items()
                    if p.default is not inspect.Parameter.empty and n not in ("seed", "subtasks")}
        assert given == defaults, method
    assert {f.name for f in dataclasses.fields(cfg.attr_div)} >= {"drop", "cluster_ratio"}


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "0"], "select.ratio: 0.0 is out of range"),
    (["--ratio", "1.5"], "select.ratio: 1.5 is out of range"),
    (["--k", "0"], "select.k: 0 is out of range"),
    (["--k", "201"], "got 201"),
    (["--method", "tsd"], "did you mean 'tsds'"),
    (["select.lamb=0.3"], "did you mean 'select.lam'"),
    (["select.evoselect.novelty=kn"], "did you mean 'knn'"),
    (["--param", "novelty=knn"], "--param is gone: give select.<method>.<key>=<value>"),
    (["train.lr=1"], "evoray select takes select.KEY=VALUE only"),
])
def test_select_bad_input_is_one_line(files, capsys, extra, message):
    assert run(files, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("evoray: error:") and message in err


def test_select_pool_missing_ids(files, capsys):
    lines = (files / "pool.jsonl").read_text().splitlines()
    (files / "pool.jsonl").write_text("\n".join(lines[5:]) + "\n")  # drops c0..c4
    assert run(files, "--k", "10", "--pool", str(files / "pool.jsonl")) == 2
    assert "5 feature ids are not in the pool" in capsys.readouterr().err


def test_select_dim_mismatch(files, capsys):
    write_features(str(files / "T"), ["t0"], np.ones((1, 8), np.float32))
    assert run(files, "--k", "5") == 2
    assert "dim 16 but target features have dim 8" in capsys.readouterr().err


def test_content_keys_read_prompt_and_response_only(files):
    """The same content under other ids and meta, in jsonl or parquet, keys the same; another
    response keys differently; a feature id missing from the pool is named."""
    import pyarrow as pa

    from evoray.errors import SelectError
    from evoray.select.io import content_keys

    recs = [json.loads(x) for x in (files / "pool.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in recs[:-1]]
    want = content_keys(str(files / "pool.jsonl"), ids)
    assert want.dtype == np.uint64 and len(set(want.tolist())) == len(ids)
    other = [{**r, "id": "x" + r["id"], "meta": {"kind": "noise", "i": n}}
             for n, r in enumerate(recs)]
    other[3]["response"] = "B"
    pq.write_table(pa.Table.from_pylist(other[::-1]), files / "other.parquet")
    got = content_keys(str(files / "other.parquet"), ["x" + i for i in ids])
    assert (got == want).sum() == len(ids) - 1 and got[3] != want[3]
    with pytest.raises(SelectError, match="1 feature ids are not in the pool"):
        content_keys(str(files / "pool.jsonl"), ids + ["nope"])


def test_random_from_the_pool_file_picks_what_it_picks_with_features(files, tmp_path):
    """select_pool (no features) draws random's picks over the same content keys as
    select_files: the same records in the same order, whatever the pool's row order."""
    from evoray.config import SelectConfig
    from evoray.errors import SelectError
    from evoray.select.io import select_files, select_pool

    lines = (files / "pool.jsonl").read_text().splitlines()[:-1]  # the candidates with features
    (tmp_path / "shuffled.jsonl").write_text("\n".join(lines[::-1]) + "\n")
    cfg = SelectConfig(method="random", ratio=0.1, seed=3)
    want, _, _ = select_files(cfg, str(files / "F"), str(files / "T"), str(tmp_path / "a"),
                              pool=str(files / "pool.jsonl"))
    got, sel = select_pool(cfg, str(tmp_path / "shuffled.jsonl"), str(tmp_path / "b"))
    picked = [pq.read_table(tmp_path / d / "selected.parquet")["id"].to_pylist()
              for d in ("a", "b")]
    assert len(picked[0]) == 20 and picked[0] == picked[1]
    assert [json.loads(x)["id"] for x in (tmp_path / "b" / "selected.jsonl").read_text()
            .splitlines()] == picked[1]
    assert got["k"] == want["k"] == 20 and got["method"] == "random"
    scores = pq.read_table(tmp_path / "b" / "scores.parquet")
    assert scores.num_rows == 200 and sum(scores["selected"].to_pylist()) == 20
    with pytest.raises(SelectError, match="reads gradient features"):
        select_pool(SelectConfig(method="evoselect"), str(files / "pool.jsonl"),
                    str(tmp_path / "c"))
