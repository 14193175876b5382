"""Record validation and I/O: every bad input names the file, the line or row, and the field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evoray.data import read_records, write_records
from evoray.errors import RecordError

GOOD = {"id": "c1", "prompt": "What is 2 + 2?\nAnswer:", "response": "B",
        "source": "test", "meta": {"kind": "clean"}}
MCQ = {"id": "q1", "prompt": "2 + 2?\nA. 3\nB. 4\nAnswer:", "choices": ["A", "B"], "answer": "B"}


def _jsonl(tmp_path, lines, name="f.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# (case, lines, kind, expected line, expected field, message part)
JSONL_CASES = [
    ("malformed_json", [json.dumps(GOOD), '{"id": "c2", "prompt": "x",'], "candidate", 2, None,
     "malformed JSON"),
    ("missing_field", [json.dumps({"id": "c1", "prompt": "p"})], "candidate", 1, "response",
     "missing required field"),
    ("empty_prompt", [json.dumps({**GOOD, "prompt": "  "})], "candidate", 1, "prompt", "empty"),
    ("empty_response", [json.dumps(GOOD), json.dumps({**GOOD, "id": "c2", "response": ""})],
     "candidate", 2, "response", "empty"),
    ("wrong_type", [json.dumps({**GOOD, "prompt": 42})], "candidate", 1, "prompt", "wrong type"),
    ("wrong_type_meta", [json.dumps({**GOOD, "meta": "kind=clean"})], "candidate", 1, "meta",
     "wrong type"),
    ("duplicate_ids", [json.dumps(GOOD), json.dumps({**GOOD, "prompt": "other"}),
                       json.dumps({**GOOD, "id": "c1"})], "candidate", 2, "id", "duplicate id"),
    ("unknown_field", [json.dumps({**GOOD, "reponse": "B"})], "candidate", 1, "reponse",
     "did you mean 'response'"),
    ("not_object", ["[1, 2]"], "candidate", 1, None, "expected a JSON object"),
    ("target_subtask_type", [json.dumps({**GOOD, "subtask": 3})], "target", 1, "subtask",
     "wrong type"),
    ("mcq_prompt_end", [json.dumps({**MCQ, "prompt": "2 + 2?"})], "mcq", 1, "prompt", "Answer:"),
    ("mcq_choices", [json.dumps({**MCQ, "choices": ["A", "bb"]})], "mcq", 1, "choices",
     "capital letters"),
    ("mcq_answer", [json.dumps({**MCQ, "answer": "C"})], "mcq", 1, "answer", "not one of"),
]


@pytest.mark.parametrize("case,lines,kind,line,field,part", JSONL_CASES,
                         ids=[c[0] for c in JSONL_CASES])
def test_jsonl_bad_input_names_file_line_field(tmp_path, case, lines, kind, line, field, part):
    path = _jsonl(tmp_path, lines)
    with pytest.raises(RecordError) as err:
        read_records(path, kind)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}"), msg
    assert err.value.line == line and err.value.field == field
    if field:
        assert f"field '{field}'" in msg
    assert part in msg


def test_empty_file(tmp_path):
    path = _jsonl(tmp_path, ["", "   "])
    with pytest.raises(RecordError, match="holds no records") as err:
        read_records(path, "candidate")
    assert str(err.value).startswith(path)


def test_non_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(RecordError, match="UTF-8") as err:
        read_records(str(path), "candidate")
    assert err.value.line == 2


@pytest.mark.parametrize("name", ["pool.csv", "pool.json", "pool"])
def test_unknown_format(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps(GOOD))
    with pytest.raises(RecordError, match="unknown format") as err:
        read_records(str(path), "candidate")
    assert ".jsonl, .parquet" in str(err.value)
    with pytest.raises(RecordError, match="unknown format"):
        write_records([GOOD], str(tmp_path / ("out_" + name)), "candidate")
    assert not (tmp_path / ("out_" + name)).exists()


def test_missing_file(tmp_path):
    with pytest.raises(RecordError, match="no such file"):
        read_records(str(tmp_path / "nope.jsonl"), "candidate")


def _parquet(tmp_path, rows, name="f.parquet"):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


PARQUET_CASES = [
    ("missing_field", [{"id": "a", "prompt": "p"}], 1, "response", "missing"),
    ("empty_prompt", [{"id": "a", "prompt": "p", "response": "r"},
                      {"id": "b", "prompt": "", "response": "r"}], 2, "prompt", "empty"),
    ("wrong_type", [{"id": "a", "prompt": "p", "response": 7}], 1, "response", "wrong type"),
    ("duplicate_ids", [{"id": "a", "prompt": "p", "response": "r"},
                       {"id": "a", "prompt": "q", "response": "r"}], 2, "id", "duplicate"),
    ("malformed_meta", [{"id": "a", "prompt": "p", "response": "r", "meta": "{bad"}], 1, "meta",
     "malformed JSON"),
]


@pytest.mark.parametrize("case,rows,row,field,part", PARQUET_CASES,
                         ids=[c[0] for c in PARQUET_CASES])
def test_parquet_bad_input_names_row_field(tmp_path, case, rows, row, field, part):
    path = _parquet(tmp_path, rows)
    with pytest.raises(RecordError) as err:
        read_records(path, "candidate")
    assert str(err.value).startswith(f"{path}: row {row}: field '{field}'"), str(err.value)
    assert part in str(err.value)


def test_parquet_empty_and_unreadable(tmp_path):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string())])
    empty = tmp_path / "empty.parquet"
    pq.write_table(schema.empty_table(), empty)
    with pytest.raises(RecordError, match="holds no records"):
        read_records(str(empty), "candidate")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(RecordError, match="not a readable Parquet file"):
        read_records(str(junk), "candidate")


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("kind,records", [
    ("candidate", [GOOD, {"id": 7, "prompt": "p", "response": "r"}]),
    ("target", [{**GOOD, "subtask": "add"}]),
    ("mcq", [MCQ, {**MCQ, "id": "q2", "subtask": "s", "meta": {"qkey": "k"}}]),
])
def test_roundtrip(tmp_path, ext, kind, records):
    path = str(tmp_path / f"r.{ext}")
    write_records(records, path, kind)
    back = read_records(path, kind)
    expected = [{**r, "id": str(r["id"])} for r in records]
    assert back == expected
    write_records(back, str(tmp_path / f"again.{ext}"), kind)
    assert (tmp_path / f"again.{ext}").read_bytes() == (tmp_path / f"r.{ext}").read_bytes()


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("bad", [
    [],
    [GOOD, {**GOOD, "prompt": "dup id"}],
    [GOOD, {"id": "c2", "prompt": "p", "response": ""}],
    [{"id": "c2", "prompt": "p"}],
])
def test_nothing_written_when_validation_fails(tmp_path, ext, bad):
    path = tmp_path / "sub" / f"out.{ext}"
    with pytest.raises(RecordError):
        write_records(bad, str(path), "candidate")
    assert not path.exists()
    assert not list(tmp_path.rglob("*tmp*"))


def test_failed_write_keeps_existing_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_records([GOOD], str(path), "candidate")
    before = path.read_bytes()
    with pytest.raises(RecordError):
        write_records([GOOD, GOOD], str(path), "candidate")
    assert path.read_bytes() == before


def test_filesystem_uri(tmp_path):
    uri = f"file://{tmp_path}/nested/r.parquet"
    write_records([GOOD], uri, "candidate")
    assert (tmp_path / "nested" / "r.parquet").exists()
    assert read_records(uri, "candidate") == [GOOD]
