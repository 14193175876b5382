"""The features folder format: pool order from any sharding, dtypes, and clear errors."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evoray.data.features import features_table, read_features, write_features
from evoray.errors import RecordError


def _shards(tmp_path, X, ids, order, n_files, dtype=np.float32):
    """Write rows in a scrambled order over several files, as Ray actors would."""
    folder = tmp_path / "feat"
    folder.mkdir()
    for k, part in enumerate(np.array_split(order, n_files)):
        pq.write_table(features_table(ids[part], part, X[part].astype(dtype),
                                      np.ones(len(part)), np.zeros(len(part))),
                       folder / f"part-{k}.parquet")
    return str(folder)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_come_back_in_pool_order_from_any_sharding(tmp_path, dtype):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(101, 12)).astype(np.float32)
    ids = np.array([f"c{i:03d}" for i in range(101)])
    path = _shards(tmp_path, X, ids, rng.permutation(101), 4, dtype)
    got = read_features(path)
    assert got.X.dtype == dtype and got.X.flags["C_CONTIGUOUS"] and got.dim == 12
    assert list(got.ids) == list(ids) and list(got.rows) == list(range(101))
    assert np.array_equal(got.X, X.astype(dtype))
    assert read_features(path, dtype="float32").X.dtype == np.float32


def test_written_table_is_plain_arrow(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_features(str(tmp_path / "f"), ["a", "b", "c"], X, meta={"model": "m"})
    table = pq.read_table(tmp_path / "f" / "part-0.parquet")
    assert table.schema.field("feature").type == pa.list_(pa.float32(), 4)
    assert table.to_pandas()["feature"][1].tolist() == [4, 5, 6, 7]
    got = read_features(str(tmp_path / "f"))
    assert got.meta["model"] == "m" and got.meta["dim"] == 4
    assert np.allclose(got.grad_norm, np.linalg.norm(X, axis=1))
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_errors_name_file_and_field(tmp_path):
    X = np.ones((3, 4), np.float32)
    with pytest.raises(RecordError, match="no such features"):
        read_features(str(tmp_path / "missing"))
    write_features(str(tmp_path / "dup"), ["a", "a", "b"], X)
    with pytest.raises(RecordError, match="field 'id': duplicate ids"):
        read_features(str(tmp_path / "dup"))
    bad = X.copy()
    bad[1, 2] = np.nan
    write_features(str(tmp_path / "nan"), ["a", "b", "c"], bad)
    with pytest.raises(RecordError, match="field 'feature': non-finite feature for id 'b'"):
        read_features(str(tmp_path / "nan"))
    folder = tmp_path / "dims"
    folder.mkdir()
    pq.write_table(features_table(["a"], [0], X[:1], [1], [0]), folder / "a.parquet")
    pq.write_table(features_table(["b"], [1], np.ones((1, 5), np.float32), [1], [0]),
                   folder / "b.parquet")
    with pytest.raises(RecordError, match="b.parquet: field 'feature': dim 5 differs"):
        read_features(str(folder))
    pq.write_table(pa.table({"id": ["a"], "feature": [[1.0]]}), tmp_path / "raw.parquet")
    with pytest.raises(RecordError, match="raw.parquet: field 'row': missing column"):
        read_features(str(tmp_path / "raw.parquet"))
