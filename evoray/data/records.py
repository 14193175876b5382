"""Record schemas of evoray's three kinds of data file, and their validation.

* ``candidate``: a training sample a generator wrote: ``id``, ``prompt``, ``response``, optional
  ``source`` (which generator) and ``meta`` (free-form dict; selectors never read it).
* ``target``: a validation example of the target task: the same fields plus optional ``subtask``.
* ``mcq``: a multiple-choice test item: ``id``, ``prompt`` ending in ``Answer:``, ``choices`` (a
  list of single capital letters) and ``answer`` (one of them); optional ``subtask`` and ``meta``.

Ids may be given as strings or integers and are stored as strings. Fields not in the schema are
rejected (a typo such as ``reponse`` would otherwise be lost silently).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from evoray.errors import RecordError, did_you_mean

__all__ = ["KINDS", "Field", "content_key", "validate_record", "validate_records"]


@dataclass(frozen=True)
class Field:
    name: str
    types: tuple[type, ...]
    required: bool = True
    nonempty: bool = False  # strings that must hold more than whitespace


def content_key(prompt, response) -> int:
    """A 64-bit hash of a record's content (its prompt and response; never its id or meta).

    The features stage plans its batches by it and the seeded selectors draw in its order, so
    that the same records give the same features and picks whatever their order in the file.
    """
    body = json.dumps([prompt, response], ensure_ascii=False, default=str)
    return int.from_bytes(hashlib.blake2b(body.encode(), digest_size=8).digest(), "big")


_ID = Field("id", (str, int), nonempty=True)
_PROMPT = Field("prompt", (str,), nonempty=True)
_RESPONSE = Field("response", (str,), nonempty=True)
_SOURCE = Field("source", (str,), required=False)
_META = Field("meta", (dict,), required=False)
_SUBTASK = Field("subtask", (str,), required=False)

KINDS: dict[str, tuple[Field, ...]] = {
    "candidate": (_ID, _PROMPT, _RESPONSE, _SOURCE, _META),
    "target": (_ID, _PROMPT, _RESPONSE, _SOURCE, _META, _SUBTASK),
    "mcq": (_ID, _PROMPT, Field("choices", (list,)), Field("answer", (str,), nonempty=True),
            _SUBTASK, _META),
}

_TYPE_NAMES = {str: "string", int: "integer", dict: "object", list: "list"}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES[t] for t in types)


def validate_record(rec: object, kind: str, *, path: str, line: int | None = None,
                    row: int | None = None) -> dict:
    """Check one record against ``KINDS[kind]`` and return it normalised (``id`` as a string).

    Raises:
        RecordError: naming ``path``, the ``line`` (JSONL) or ``row`` (Parquet), and the field.
    """
    where = {"line": line, "row": row}
    if not isinstance(rec, dict):
        raise RecordError(path, f"expected a JSON object, got {type(rec).__name__}", **where)
    fields = {f.name: f for f in KINDS[kind]}
    for key in rec:
        if key not in fields:
            raise RecordError(path, f"unknown field for a {kind} record{did_you_mean(key, fields)}",
                              field=key, **where)
    out = {}
    for f in KINDS[kind]:
        value = rec.get(f.name)
        if value is None:
            if f.required:
                raise RecordError(path, f"missing required field ({_type_name(f.types)})",
                                  field=f.name, **where)
            continue
        if isinstance(value, bool) or not isinstance(value, f.types):
            raise RecordError(path, f"wrong type {type(value).__name__}; expected "
                              f"{_type_name(f.types)}", field=f.name, **where)
        if f.nonempty and isinstance(value, str) and not value.strip():
            raise RecordError(path, "empty string; a non-empty value is required",
                              field=f.name, **where)
        out[f.name] = str(value) if f.name == "id" else value
    if kind == "mcq":
        _check_mcq(out, path, where)
    return out


def _check_mcq(rec: dict, path: str, where: dict) -> None:
    if not rec["prompt"].rstrip().endswith("Answer:"):
        raise RecordError(path, "an MCQ prompt must end with 'Answer:'", field="prompt", **where)
    choices = rec["choices"]
    if len(choices) < 2 or not all(isinstance(c, str) and len(c) == 1 and c.isupper()
                                   for c in choices) or len(set(choices)) != len(choices):
        raise RecordError(path, f"expected at least two distinct capital letters, got {choices!r}",
                          field="choices", **where)
    if rec["answer"] not in choices:
        raise RecordError(path, f"'{rec['answer']}' is not one of the choices {choices}",
                          field="answer", **where)


def validate_records(records: list, kind: str, *, path: str, unit: str = "line",
                     positions: list[int] | None = None) -> list[dict]:
    """Validate every record, then check that the file is not empty and ids are unique.

    ``unit`` is ``"line"`` (JSONL: ``positions`` are line numbers) or ``"row"`` (1-based rows).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}{did_you_mean(kind, KINDS)}")
    if not records:
        raise RecordError(path, f"the file holds no records; a {kind} file needs at least one")
    positions = positions or list(range(1, len(records) + 1))
    out, seen = [], {}
    for rec, pos in zip(records, positions, strict=True):
        rec = validate_record(rec, kind, path=path, **{unit: pos})
        if rec["id"] in seen:
            raise RecordError(path, f"duplicate id {rec['id']!r} (first at {unit} "
                              f"{seen[rec['id']]}); ids must be unique", field="id", **{unit: pos})
        seen[rec["id"]] = pos
        out.append(rec)
    return out
