"""Error types that the CLI turns into one readable line (no traceback unless ``--debug``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["EvorayError", "RecordError", "ConfigError", "ModelError", "SelectError",
           "TrainError",
           "did_you_mean"]


class EvorayError(Exception):
    """Base of every error caused by the user's input rather than by a bug in evoray."""


class RecordError(EvorayError, ValueError):
    """A data file is malformed. The message names the file, the line or row, and the field."""

    def __init__(self, path: str, message: str, *, line: int | None = None,
                 row: int | None = None, field: str | None = None):
        self.path, self.line, self.row, self.field = path, line, row, field
        where = path
        if line is not None:
            where += f":{line}"
        elif row is not None:
            where += f": row {row}"
        if field is not None:
            where += f": field '{field}'"
        self.message = message
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # picklable, so that Ray brings it back from a task unchanged
        return _record_error, (self.path, self.message, self.line, self.row, self.field)


def _record_error(path, message, line, row, field) -> RecordError:
    return RecordError(path, message, line=line, row=row, field=field)


class ConfigError(EvorayError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class ModelError(EvorayError):
    """A model or adapter cannot be found or loaded."""


class SelectError(EvorayError, ValueError):
    """Selection cannot run on these inputs (budget, shapes, non-finite features, ids)."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest valid name, or a list of valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid: {', '.join(valid)}"


class TrainError(EvorayError, ValueError):
    """Training or evaluation cannot run on these inputs (no example left, fewer examples than
    workers, a test answer not among its choices)."""


class FeatureError(EvorayError, ValueError):
    """A sample whose loss or gradient is not finite, or features that cannot be computed."""
