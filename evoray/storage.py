"""Files on local paths or any pyarrow filesystem URI (``s3://``, ``gs://``...): the bottom layer
that config, data and the stages read and write through. A write goes to a temporary name beside
the target and is renamed, so a final name never holds a partial file."""

from __future__ import annotations

import logging
import os
import re
import uuid

import pyarrow.fs as pafs

from evoray.errors import RecordError

__all__ = ["resolve", "exists", "read_bytes", "atomic_write", "atomic_write_bytes", "with_path",
           "temporaries", "remove_temporaries"]

log = logging.getLogger(__name__)
TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")  # the temporary names of the atomic writers here


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or a URI (``s3://``, ``gs://``...)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    """The bytes of a file (path or URI); a missing file or a folder is a RecordError naming it."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise RecordError(path, "no such file")
    if info.type == pafs.FileType.Directory:
        raise RecordError(path, "is a directory; expected a .jsonl or .parquet file")
    with fs.open_input_stream(p) as f:
        return f.read()


def with_path(e: BaseException, path: str) -> BaseException:
    """``e``, or for an OSError that names no file (pyarrow's ``No space left on device``) an
    OSError of the same errno that names ``path``, so the user learns where the write failed."""
    if isinstance(e, OSError) and not e.filename:
        reason = os.strerror(e.errno) if e.errno else str(e).split(". Detail:")[0]
        return OSError(e.errno, reason, path)
    return e


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it to ``path``."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str, write) -> None:
    """Call ``write(stream)`` on a file at a temporary name beside ``path``, then rename it to
    ``path`` (a file written piece by piece, never held whole in memory)."""
    fs, p = resolve(path)
    parent = os.path.dirname(p)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            write(f)
        fs.move(tmp, p)
    except BaseException as e:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        named = with_path(e, path)
        if named is e:
            raise
        raise named from e


def temporaries(root: str) -> list:
    """Temporary outputs of evoray's atomic writers under ``root`` (``FileInfo`` entries): partial
    files and folders that a killed process left; no final name ever holds them."""
    fs, path = resolve(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if TEMPORARY.search(i.path.rstrip("/"))]


def remove_temporaries(root: str) -> None:
    """Remove :func:`temporaries` under ``root``, each logged as a warning."""
    fs, _ = resolve(root)
    gone: list[str] = []
    for info in temporaries(root):
        if any(info.path.startswith(g + "/") for g in gone):
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(info.path)
        gone.append(info.path.rstrip("/"))
        log.warning("removed %s, a partial output left by an interrupted run", info.path)
