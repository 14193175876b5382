"""The cache key of a features folder: a content hash of everything its features depend on.

The pool's bytes, the model (its name, and its ``config.json`` when it is a folder), the proxy's
adapter and Adam state (their files' bytes), every setting that changes a feature's value
(:func:`value_settings`), the projection's dimension, evoray's version and
:data:`FEATURES_VERSION`. :func:`evoray.features.stage.featurize` reuses a folder whose
``meta.json`` holds the same key; the evolve loop's features stage hashes the same settings.
"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.fs as pafs

from evoray import __version__
from evoray.config import FeaturesConfig, config_to_dict
from evoray.storage import resolve

__all__ = ["FEATURES_VERSION", "input_hash", "value_settings"]

# The version of how features are computed from the same inputs: part of ``input_hash`` and of
# ``meta.json``, so that a change of the computation never reuses older features.
# 2: batches planned by (length, content key) instead of (length, row).
FEATURES_VERSION = 2

# Settings that do not change a feature's value (only speed or placement).
_NOT_HASHED = {"num_actors", "num_gpus", "num_cpus", "batch_size", "proj_block_mb",
               "proj_cache_mb", "proj_batch_mb", "on_bad"}

# Settings added after features were first cached: hashed only when not at their default, so
# that features computed before they existed stay valid.
_HASHED_WHEN_SET = {"bf16": False}


def value_settings(cfg: FeaturesConfig) -> dict:
    """The features settings that change a feature's value (not speed or placement): what a
    cache key of features holds."""
    return {k: v for k, v in config_to_dict(cfg).items() if k not in _NOT_HASHED
            and not (k in _HASHED_WHEN_SET and v == _HASHED_WHEN_SET[k])}


def _hash_path(h, path: str | None) -> None:
    """Feed a file's bytes, or a folder's files (names and bytes), into ``h``."""
    if path is None:
        h.update(b"<none>")
        return
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
                       if i.type == pafs.FileType.File)
    else:
        files = [p]
    for f in files:
        h.update(os.path.relpath(f, p).encode())
        with fs.open_input_stream(f) as stream:
            while chunk := stream.read(1 << 24):
                h.update(chunk)


def input_hash(pool: str, model: str, adapter: str | None, adam_state: str | None,
               cfg: FeaturesConfig, dim: int) -> str:
    """Content hash of everything a features folder depends on."""
    h = hashlib.sha256()
    _hash_path(h, pool)
    h.update(model.encode())
    if os.path.isdir(os.path.expanduser(model)):
        _hash_path(h, os.path.join(os.path.expanduser(model), "config.json"))
    _hash_path(h, adapter)
    _hash_path(h, adam_state)
    h.update(json.dumps({**value_settings(cfg), "dim": dim, "version": __version__,
                         "features_version": FEATURES_VERSION}, sort_keys=True).encode())
    return h.hexdigest()
