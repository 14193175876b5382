"""``select.backend: sharded`` on the suite's local Ray: the same folder as the local backend,
and the same picks (dense or kNN novelty; dense or kNN-sparse OT; random; attribution). Each
selection starts its shards' actors (about 10 s each on a busy 2-core machine, most of it
importing torch), so only the dense case is in the fast tier."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from evoray.config import SelectConfig
from evoray.data.features import features_table, write_features
from evoray.errors import ConfigError
from evoray.select.io import select_files
from evoray.select.sharded import plan_shards, shard_cpus

N, D, M = 1500, 24, 30


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A pool in 4 files whose rows are spread over the files out of order (plus an exact
    duplicate and a zero row), and a targets folder."""
    rng = np.random.default_rng(0)
    G = (rng.normal(size=(N, D)) + rng.normal(size=D)).astype(np.float32)
    G[5] = G[7]
    G[11] = 0.0
    V = (rng.normal(size=(M, D)) + 0.3).astype(np.float32)
    root = tmp_path_factory.mktemp("sharded")
    pool = root / "features"
    pool.mkdir()
    for j, part in enumerate(np.array_split(rng.permutation(N), 4)):
        pq.write_table(features_table([f"c{i}" for i in part], part, G[part],
                                      np.ones(len(part)), np.ones(len(part))),
                       pool / f"part-{j}.parquet")
    write_features(str(root / "targets"), [f"t{j}" for j in range(M)], V)
    return str(pool), str(root / "targets"), root


def run(folders, name, **select):
    pool, targets, root = folders
    cfg = SelectConfig(**select)
    out = root / name
    summary, _, _ = select_files(cfg, pool, targets, str(out))
    return pq.read_table(out / "selected.parquet").to_pydict(), summary, out


@pytest.mark.parametrize("extra", [
    {}, pytest.param({"sparse_above": 500}, marks=pytest.mark.slow)], ids=["dense-ot", "sparse-ot"])
def test_evoselect_sharded_picks_what_local_picks(ray_session, folders, extra):
    from evoray.config.sections import EvoSelectSettings

    settings = EvoSelectSettings(**extra)
    local, _, _ = run(folders, f"local-{len(extra)}", method="evoselect", ratio=0.1,
                      evoselect=settings)
    sharded, summary, out = run(folders, f"sharded-{len(extra)}", method="evoselect",
                                ratio=0.1, evoselect=settings, backend="sharded", shards=3)
    assert sharded["id"] == local["id"]  # the same picks in the same order
    assert sharded["nearest_targets"] == local["nearest_targets"]
    np.testing.assert_allclose(sharded["alignment"], local["alignment"], rtol=1e-4)
    diag = summary["diagnostics"]
    assert diag["shards"] == 3 and diag["sparse"] == bool(extra)
    assert diag["target_marginal_err"] < 1e-6
    assert diag["dropped"]["candidates"] == 1  # the zero row
    scores = pq.read_table(out / "scores.parquet").to_pydict()
    assert len(scores["id"]) == N - 1 and sum(scores["selected"]) == len(local["id"])
    assert set(np.array(scores["id"])[scores["selected"]]) == set(local["id"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "attribution"])
def test_random_and_attribution_sharded_are_exact(ray_session, folders, method):
    local, _, _ = run(folders, f"local-{method}", method=method, k=97, seed=3)
    sharded, _, _ = run(folders, f"sharded-{method}", method=method, k=97, seed=3,
                        backend="sharded", shards=4)
    assert sharded["id"] == local["id"]
    assert sharded["nearest_targets"] == local["nearest_targets"]


@pytest.mark.slow
def test_knn_novelty_over_shards_is_the_local_knn_path(ray_session, folders):
    """One IVF index trained as the local backend trains it, each shard adding its rows: a
    search probes the same lists in every shard, so the merged neighbours, and the picks, are
    the local ones."""
    from evoray.config.sections import EvoSelectSettings

    settings = EvoSelectSettings(novelty="knn", sparse_above=500)
    local, _, _ = run(folders, "local-knn", method="evoselect", ratio=0.1, evoselect=settings)
    sharded, summary, _ = run(folders, "sharded-knn", method="evoselect", ratio=0.1,
                              evoselect=settings, backend="sharded", shards=3)
    assert summary["diagnostics"]["novelty"] == "knn"
    assert sharded["id"] == local["id"]


@pytest.mark.parametrize("extra", [
    {}, pytest.param({"exact_max": 500}, marks=pytest.mark.slow)], ids=["exact", "ivf"])
def test_tsds_sharded_picks_what_local_picks(ray_session, folders, extra):
    """Exact kNN, or one IVF index trained as the local one is with each shard adding its rows:
    the same neighbours, probabilities and densities, so the same seeded draw."""
    from evoray.config.selectors import TsdsSettings

    settings = TsdsSettings(**extra)
    local, _, lout = run(folders, f"local-tsds-{len(extra)}", method="tsds", k=200, seed=4,
                         tsds=settings)
    sharded, summary, out = run(folders, f"sharded-tsds-{len(extra)}", method="tsds", k=200,
                                seed=4, tsds=settings, backend="sharded", shards=3)
    assert sharded["id"] == local["id"] and sharded["count"] == local["count"]
    assert sharded["nearest_targets"] == local["nearest_targets"]
    np.testing.assert_allclose(sharded["alignment"], local["alignment"], rtol=1e-9)
    diag = summary["diagnostics"]
    assert diag["shards"] == 3 and diag["exact_knn"] == (not extra)
    mine, theirs = (pq.read_table(f / "scores.parquet").to_pandas().set_index("id")
                    for f in (out, lout))
    theirs = theirs.loc[mine.index]  # local's file has the zero row too (NaN scores)
    assert (mine["selected"] == theirs["selected"]).all()
    np.testing.assert_allclose(mine["probability"], theirs["probability"], rtol=1e-9,
                               atol=1e-15)
    np.testing.assert_allclose(mine["kde"], theirs["kde"], rtol=1e-6)  # NaN where unlisted
    assert (theirs["probability"] > 0).sum() < len(theirs)  # some candidates are unlisted


def test_sharded_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="select.backend.*use backend=local"):
        SelectConfig(method="diversity", backend="sharded")
    with pytest.raises(ConfigError, match="lava needs backend=local"):
        from evoray.config.sections import EvoSelectSettings

        SelectConfig(backend="sharded", evoselect=EvoSelectSettings(alignment="lava"))
    with pytest.raises(ConfigError, match="shards"):
        SelectConfig(backend="sharded", shards=0)


def test_plan_shards_keeps_files_whole_and_balances_rows():
    assert plan_shards([100, 100, 100, 100], 2) == [[0, 1], [2, 3]]
    assert plan_shards([10, 10], 5) == [[0], [1]]  # never more shards than files
    assert plan_shards([400_000, 400_000, 400_000]) == [[0], [1], [2]]  # 1.2M: 3 shards
    groups = plan_shards([250_000] * 8)  # 2M rows: one shard per 500,000
    assert len(groups) == 4 and sorted(sum(groups, [])) == list(range(8))


def test_shard_cpus_is_a_fraction_ray_accepts():
    """A leftover 0.00015 free CPU split over 3 shards once asked Ray for 5e-05 CPU, which it
    refuses (4 decimals at most): the reservation is rounded down to 0.01."""
    assert shard_cpus(0.00015, 3) == 0.0
    assert shard_cpus(2.0, 3) == 0.66
    assert shard_cpus(16.0, 4) == 1.0


@pytest.mark.slow
def test_files_of_disjoint_rows_are_numbered_without_a_permutation(ray_session, folders,
                                                                  tmp_path):
    """Files that each hold a range of rows (what the benchmark writes): every shard numbers
    its own candidates from an offset, and random picks what the local backend picks."""
    rng = np.random.default_rng(1)
    G = rng.normal(size=(600, D)).astype(np.float32)
    (tmp_path / "f").mkdir()
    for j, part in enumerate(np.array_split(np.arange(600), 3)):
        pq.write_table(features_table([f"c{i}" for i in part], part, G[part],
                                      np.ones(len(part)), np.ones(len(part))),
                       tmp_path / "f" / f"part-{2 - j}.parquet")  # names against row order
    _, targets, _ = folders
    picked = {}
    for backend in ("local", "sharded"):
        cfg = SelectConfig(method="random", k=50, seed=2, backend=backend, shards=3)
        select_files(cfg, str(tmp_path / "f"), targets, str(tmp_path / backend))
        picked[backend] = pq.read_table(tmp_path / backend / "selected.parquet")["id"]
    assert picked["sharded"].to_pylist() == picked["local"].to_pylist()
