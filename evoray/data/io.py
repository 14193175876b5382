"""Read and write record files: JSONL and Parquet, on local paths or any pyarrow filesystem URI.

Small files (targets, test sets, selections) go through pyarrow on the driver and are validated
row by row (:func:`read_records`). Large pools go through Ray Data (:func:`read_dataset`), whose
schema is checked before any work starts.

Formats are chosen by extension: ``.jsonl`` (one JSON object a line, UTF-8; blank lines are
ignored) and ``.parquet``. In Parquet, ``meta`` is stored as a JSON string column, since a free-form
dict has no fixed Arrow type; :func:`read_records` decodes it back.

Writes validate everything first and write nothing on failure; then they write to a temporary
name beside the target and rename it, so a final name never holds a partial file.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from evoray.data.records import KINDS, validate_record, validate_records
from evoray.errors import RecordError, did_you_mean
from evoray.storage import atomic_write_bytes, read_bytes, resolve

if TYPE_CHECKING:
    import ray.data

__all__ = ["FORMATS", "detect_format", "read_records", "write_records", "read_dataset",
           "write_dataset", "parse_jsonl"]

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
# A record is a training sample, not a document: a JSONL line beyond this is refused (a runaway
# generator or a broken file), which also bounds what a reader must hold to judge one line.
MAX_LINE_CHARS = 1 << 20


def detect_format(path: str) -> str:
    """``"jsonl"`` or ``"parquet"`` from the file's extension; anything else is an error."""
    ext = os.path.splitext(path.split("?", 1)[0].rstrip("/"))[1].lower()  # URI query ignored
    if ext not in FORMATS:
        raise RecordError(path, f"unknown format {ext or '(no extension)'!r}; valid: "
                          f"{', '.join(FORMATS)}")
    return FORMATS[ext]


def parse_jsonl(path: str, data: bytes) -> tuple[list, list[int]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecordError(path, f"not valid UTF-8 (byte {e.start})", line=line) from None
    records, lines = [], []
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_CHARS:
            raise RecordError(path, f"the line holds {len(raw):,} characters; a record may hold "
                              f"at most {MAX_LINE_CHARS:,}", line=n)
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as e:
            raise RecordError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=n) from None
        lines.append(n)
    return records, lines


def read_records(path: str, kind: str) -> list[dict]:
    """Read and validate a small record file into a list of dicts.

    Args:
        path: local path or URI of a ``.jsonl`` or ``.parquet`` file.
        kind: ``"candidate"``, ``"target"`` or ``"mcq"`` (see :mod:`evoray.data.records`).

    Raises:
        RecordError: naming the file, the line (JSONL) or 1-based row (Parquet), and the field.
    """
    fmt = detect_format(path)
    data = read_bytes(path)
    if fmt == "jsonl":
        records, lines = parse_jsonl(path, data)
        return validate_records(records, kind, path=path, unit="line", positions=lines)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as e:
        raise RecordError(path, f"not a readable Parquet file ({e})") from None
    records = table.to_pylist()
    for n, rec in enumerate(records, start=1):
        if isinstance(rec.get("meta"), str):
            try:
                rec["meta"] = json.loads(rec["meta"])
            except json.JSONDecodeError as e:
                raise RecordError(path, f"malformed JSON: {e.msg}", row=n, field="meta") from None
    return validate_records(records, kind, path=path, unit="row")


def _arrow_schema(kind: str) -> pa.Schema:
    types = {"choices": pa.list_(pa.string()), "meta": pa.string()}
    return pa.schema([(f.name, types.get(f.name, pa.string())) for f in KINDS[kind]])


def _encode(records: list[dict], kind: str, fmt: str) -> bytes:
    if fmt == "jsonl":
        lines = (json.dumps(r, ensure_ascii=False, sort_keys=False) for r in records)
        return ("\n".join(lines) + "\n").encode("utf-8")
    rows = [{**r, "meta": json.dumps(r["meta"], sort_keys=True)} if "meta" in r else r
            for r in records]
    table = pa.Table.from_pylist(rows, schema=_arrow_schema(kind))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_records(records: list[dict], path: str, kind: str) -> None:
    """Validate ``records`` and write them to ``path`` (format from the extension).

    Nothing is written when validation fails. Records are written in the given order with keys
    in schema order, so the same records give byte-identical files.
    """
    fmt = detect_format(path)
    records = validate_records(records, kind, path=path, unit="row")
    order = [f.name for f in KINDS[kind]]
    records = [{k: r[k] for k in order if k in r} for r in records]
    atomic_write_bytes(path, _encode(records, kind, fmt))


class _ParseJsonl:
    """Ray Data batch function: JSONL files (their paths, one row each) -> validated records
    (:func:`validate_records`: errors name the file, line and field) as string columns, ids as
    strings, ``meta`` as a JSON string, yielded ``chunk`` records at a time.

    The task reads the file itself rather than taking its bytes from ``read_binary_files``,
    whose one block of the whole file sat in the object store for the task's whole run (the
    features stage's store peak at 100k candidates: 41 MiB with it, 28 MiB without);
    yielded chunks leave as blocks of at most the context's ``target_max_block_size``, and Ray
    pauses the task while its unread blocks pile up."""

    def __init__(self, path: str, kind: str, columns: list[str], fs: pafs.FileSystem,
                 chunk: int = 4096):
        self.path, self.kind, self.columns, self.fs, self.chunk = path, kind, columns, fs, chunk

    def __call__(self, batch: dict):
        for file in batch["file"]:
            with self.fs.open_input_stream(str(file)) as f:
                records, lines = parse_jsonl(self.path, f.read())
            rows = validate_records(records, self.kind, path=self.path, unit="line",
                                    positions=lines)
            del records
            if not rows:
                yield {c: [] for c in self.columns}
            for s in range(0, len(rows), self.chunk):
                yield {c: [None if r.get(c) is None else r[c] if isinstance(r[c], str) else
                           json.dumps(r[c]) for r in rows[s:s + self.chunk]]
                       for c in self.columns}


class _CheckParquet:
    """Ray Data batch function: every record of a Parquet block against its kind's schema. Rows
    are named by id, since a block does not know its row numbers in the file."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind

    def __call__(self, table: pa.Table) -> pa.Table:
        for rec in table.to_pylist():
            if isinstance(rec.get("meta"), str):
                rec["meta"] = json.loads(rec["meta"])
            try:
                validate_record(rec, self.kind, path=self.path)
            except RecordError as e:
                raise RecordError(self.path, f"record id {rec.get('id')!r}: "
                                  f"{str(e).split(': ', 1)[1]}") from None
        return table


def _first_record(path: str, fs: pafs.FileSystem, p: str) -> dict:
    with fs.open_input_stream(p) as f:
        head = f.read(4 * MAX_LINE_CHARS + 1).decode("utf-8", errors="replace")
    for n, line in enumerate(head.split("\n"), start=1):
        if len(line) > MAX_LINE_CHARS:
            raise RecordError(path, f"the line holds more than {MAX_LINE_CHARS:,} characters; a "
                              f"record may hold at most {MAX_LINE_CHARS:,}", line=n)
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(path, f"malformed JSON: {e.msg}", line=n) from None
            if not isinstance(rec, dict):
                raise RecordError(path, "expected a JSON object", line=n)
            return rec
    raise RecordError(path, "the file holds no records")


def read_dataset(path: str, kind: str = "candidate", *,
                 columns: list[str] | None = None, **read_args) -> ray.data.Dataset:
    """Open a large record file (or a folder of Parquet files) as a Ray Data dataset.

    The schema is checked on the driver before anything runs: every required field of ``kind``
    must be present and none may be unknown (JSONL: judged on the first record). Then every
    record is validated in the Ray tasks that read it, as :func:`read_records` does: a JSONL file
    is read whole by one task (Arrow's JSON reader rejects integer ids and free-form ``meta``), so
    its errors name the line and duplicate ids within it are caught; Parquet rows are named by id.
    Errors raised there reach the caller wrapped by Ray (see ``evoray.ray_utils.user_error``).
    Duplicate ids across the files of a Parquet folder are the caller's to check. Ids come out
    as strings and ``meta`` as a JSON string, as in Parquet.

    Args:
        path: local path or URI of a ``.jsonl`` or ``.parquet`` file, or a folder of ``.parquet``.
        kind: record kind whose schema the data must follow.
        columns: keep only these columns (default: every field of ``kind``; for Parquet, those
            present).
        **read_args: passed to ``ray.data.read_parquet`` (e.g. ``override_num_blocks``); a
            JSONL file is read by one task.
    """
    import ray.data

    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise RecordError(path, "no such file or folder")
    fmt = "parquet" if info.type == pafs.FileType.Directory else detect_format(path)
    if fmt == "parquet":
        ds = ray.data.read_parquet(p, filesystem=fs, **read_args)
        names = ds.schema().names
    else:
        names = list(_first_record(path, fs, p))
    fields = {f.name: f for f in KINDS[kind]}
    for name in names:  # first: a typo (reponse) also leaves a required field missing
        if name not in fields:
            raise RecordError(path, f"unknown field for {kind} records"
                              f"{did_you_mean(name, fields)}", field=name)
    for f in fields.values():
        if f.required and f.name not in names:
            raise RecordError(path, f"missing required field of {kind} records", field=f.name)
    if not columns:  # JSONL: every field of the kind (absent ones as nulls)
        columns = [n for n in fields if n in names] if fmt == "parquet" else list(fields)
    if fmt == "jsonl":  # one task per file (read_args do not apply)
        return ray.data.from_items([{"file": p}]).map_batches(
            _ParseJsonl(path, kind, columns, fs), batch_size=1, batch_format="numpy")
    ds = ds.map_batches(_CheckParquet(path, kind), batch_format="pyarrow")
    ds = ds.select_columns(columns)
    if "id" in columns and not pa.types.is_string(ds.schema().base_schema.field("id").type):
        ds = ds.map_batches(lambda b: {**b, "id": b["id"].astype(str)}, batch_format="numpy")
    return ds


def write_dataset(ds: ray.data.Dataset, path: str) -> None:
    """Write a Ray Data dataset as a folder of Parquet files at ``path`` (local or URI).

    The files go to a temporary folder beside ``path``, renamed when every file is written, so
    ``path`` never holds a partial dataset. An existing ``path`` is an error (nothing is lost).
    :func:`read_dataset` reads the folder back.
    """
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        raise RecordError(path, "already exists; choose a new path or remove it first")
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        ds.write_parquet(tmp, filesystem=fs)
        fs.move(tmp, p)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_dir(tmp)
        raise
