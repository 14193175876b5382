"""Records, their files, and tokenization of (prompt, response) pairs."""

from evoray.data.io import (
    FORMATS,
    atomic_write_bytes,
    detect_format,
    exists,
    read_dataset,
    read_records,
    resolve,
    write_dataset,
    write_records,
)
from evoray.data.records import KINDS, validate_record, validate_records
from evoray.data.tokenize import Encoded, collate, encode_pair, encode_pairs

__all__ = [
    "FORMATS", "KINDS", "Encoded", "atomic_write_bytes", "collate", "detect_format", "encode_pair",
    "encode_pairs", "exists", "read_dataset", "read_records", "resolve", "validate_record",
    "validate_records", "write_dataset", "write_records",
]
