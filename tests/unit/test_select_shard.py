"""A sharded selection's shard, without Ray: its −inf tail's best candidate (a forward pointer
kept across calls) against a scan of the whole tail, as picks and novelty updates arrive."""

import numpy as np
import pyarrow.parquet as pq

from evoray.data.features import features_files, read_features, write_features
from evoray.select.evoselect import novelty_bins
from evoray.select.shard import FeatureShard


def scan(shard, min_novelty, bins):
    """The tail's best by a scan of every row: ``(penalised, bin, novelty, gpos, local)``."""
    tail = np.flatnonzero(shard.alive & np.isneginf(shard.align))
    if not len(tail):
        return None
    ok = shard.novelty[tail] >= min_novelty
    if ok.any():
        tail = tail[ok]
    b = novelty_bins(shard.novelty[tail], bins)
    i = tail[np.flatnonzero(b == b.max())[0]]
    return (not ok.any(), int(b.max()), float(shard.novelty[i]), int(shard.gpos[i]), int(i))


def test_tail_best_follows_picks_and_falling_novelty(tmp_path):
    rng = np.random.default_rng(0)
    n, bins, min_novelty = 600, 16, 0.3
    write_features(str(tmp_path / "f"), [f"c{i}" for i in range(n)],
                   rng.normal(size=(n, 8)).astype(np.float32))
    _, files = features_files(str(tmp_path / "f"))
    shard = FeatureShard(str(tmp_path / "f"), files)
    shard.place(100)
    shard.geometry("none", None)
    shard.novelty_space(None, dense=True)
    listed = rng.choice(n, 200, replace=False)  # finite alignment; the other 400 are the tail
    finite, tail = shard.set_alignment(n, 0.01, listed=(listed, np.full(200, 1.0 / n)))
    assert (finite, tail) == (200, 400)
    checked = 0
    for step in range(300):
        rows = rng.choice(n, 20, replace=False)
        pending = (rows, (shard.novelty[rows] * rng.uniform(0.3, 1.0, 20)).astype(np.float32))
        expect_nov = shard.novelty.copy()
        expect_nov[rows] = pending[1]
        got = shard.tail_best(min_novelty, bins, pending)
        np.testing.assert_array_equal(shard.novelty, expect_nov)
        want = scan(shard, min_novelty, bins)
        assert (got is None) == (want is None)
        if got is None:
            break
        assert got[:5] == want
        np.testing.assert_array_equal(got[5], shard.space.take(np.array([got[4]]))[0])
        checked += 1
        pick = got[4] if step % 3 else int(rng.choice(listed))  # a tail pick, or a listed one
        shard.neighbours(shard.space.take(np.array([pick]))[0], pick, 8)
        assert not shard.alive[pick]
    assert checked > 200  # the tail ran dry only near the end, penalised rows included
    assert shard.gpos[0] == 100


def test_scores_come_in_slices_that_add_up(tmp_path):
    rng = np.random.default_rng(1)
    n = 50
    write_features(str(tmp_path / "f"), [f"c{i}" for i in range(n)],
                   rng.normal(size=(n, 4)).astype(np.float32))
    _, files = features_files(str(tmp_path / "f"))
    shard = FeatureShard(str(tmp_path / "f"), files)
    shard.place(0)
    shard.alive[[3, 30]] = False
    parts = [shard.scores(s, s + 16) for s in range(0, n, 16)]
    assert [len(p) for p in parts] == [16, 16, 16, 2]
    ids = sum((p["id"].to_pylist() for p in parts), [])
    selected = sum((p["selected"].to_pylist() for p in parts), [])
    assert ids == [f"c{i}" for i in range(n)]
    assert [i for i, s in enumerate(selected) if s] == [3, 30]


def test_read_features_by_batches_equals_the_table(tmp_path, monkeypatch):
    """Features read a batch at a time (here 7 rows) land where the whole table puts them."""
    import evoray.data.features as features

    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 6)).astype(np.float16)
    rows = rng.permutation(40)
    write_features(str(tmp_path / "f"), [f"c{i}" for i in rows], X, rows=rows)
    monkeypatch.setattr(features, "READ_ROWS", 7)
    f = read_features(str(tmp_path / "f"))
    _, files = features_files(str(tmp_path / "f"))
    table = pq.read_table(files[0]).to_pydict()
    order = np.argsort(table["row"])
    np.testing.assert_array_equal(f.X, np.array(table["feature"], np.float16)[order])
    assert f.ids.tolist() == [table["id"][i] for i in order]


def test_a_draw_over_the_listed_candidates_is_the_draw_over_all():
    """Sharded TSDS draws over the candidates with a nonzero probability only: numpy's
    multinomial and weighted choice spend no random number on a zero, so the seeded draws are
    the local backend's over all N (with replacement and without)."""
    for t in range(20):
        r = np.random.default_rng(t)
        n = 3000
        listed = np.sort(r.choice(n, 200, replace=False))
        full = np.zeros(n)
        full[listed] = r.random(200) ** 3
        full /= full.sum()
        part = full[listed] / full[listed].sum()
        counts = np.random.default_rng(t).multinomial(400, full)
        assert counts.sum() == 400
        np.testing.assert_array_equal(np.random.default_rng(t).multinomial(400, part),
                                      counts[listed])
        np.testing.assert_array_equal(
            listed[np.random.default_rng(t).choice(200, 80, replace=False, p=part)],
            np.random.default_rng(t).choice(n, 80, replace=False, p=full))
