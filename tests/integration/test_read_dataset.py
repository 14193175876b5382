"""Reading pools through Ray Data on a local Ray."""

import json

import pytest

from evoray.data import read_dataset, read_records
from evoray.errors import RecordError
from evoray.tasks import write_task

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return {fmt: write_task("arithmetic", str(root / fmt), pool_size=400, fmt=fmt)
            for fmt in ("jsonl", "parquet")}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ray_data_reads_what_pyarrow_reads(ray_session, task_files, fmt):
    path = task_files[fmt]["pool"]
    expected = {r["id"]: r for r in read_records(path, "candidate")}
    ds = read_dataset(path, "candidate", columns=["id", "prompt", "response"],
                      override_num_blocks=4)
    rows = ds.take_all()
    assert len(rows) == len(expected) == 400
    for row in rows:
        rec = expected[row["id"]]
        assert (row["prompt"], row["response"]) == (rec["prompt"], rec["response"])


def test_ray_data_uri_and_int_ids(ray_session, tmp_path):
    path = tmp_path / "ints.jsonl"
    path.write_text('{"id": 1, "prompt": "p", "response": "r"}\n\n'
                    '{"id": 2, "prompt": "q", "response": "s", "meta": {"k": 1}}\n')
    rows = read_dataset(f"file://{path}", "candidate").take_all()
    assert sorted(r["id"] for r in rows) == ["1", "2"]
    assert [r["meta"] for r in sorted(rows, key=lambda r: r["id"])] == [None, '{"k": 1}']


@pytest.mark.parametrize("content,part", [
    ('{"id": "a", "prompt": "p"}\n', "field 'response': missing"),
    ('{"id": "a", "prompt": "p", "response": "r", "reponse": "x"}\n', "field 'reponse': unknown"),
    ('{"id": "a", "prompt": \n', ":1: malformed JSON"),
    ("\n\n", "holds no records"),
])
def test_ray_data_schema_errors_before_running(ray_session, tmp_path, content, part):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError) as err:
        read_dataset(str(path), "candidate")
    assert str(err.value).startswith(str(path)) and part in str(err.value)


def test_write_dataset_folder_roundtrip(ray_session, task_files, tmp_path):
    from evoray.data import write_dataset

    ds = read_dataset(task_files["jsonl"]["pool"], "candidate")
    out = tmp_path / "pool_parquet"
    write_dataset(ds, str(out))
    assert out.is_dir() and not list(tmp_path.glob("*.tmp-*"))
    back = {r["id"]: r for r in read_dataset(str(out), "candidate").take_all()}
    original = read_records(task_files["jsonl"]["pool"], "candidate")
    assert len(back) == len(original) == 400
    for rec in original:
        row = back[rec["id"]]
        assert (row["prompt"], row["response"], row["source"]) == (
            rec["prompt"], rec["response"], rec["source"])
        assert json.loads(row["meta"]) == rec["meta"]
    with pytest.raises(RecordError, match="already exists"):
        write_dataset(ds, str(out))


def test_parquet_with_integer_ids(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": [3, 4], "prompt": ["p", "q"], "response": ["r", "s"]}), path)
    rows = read_dataset(str(path), "candidate").take_all()
    assert sorted(r["id"] for r in rows) == ["3", "4"]
