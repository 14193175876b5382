"""Records, their files, and tokenization of (prompt, response) pairs."""

from evoray.data.io import (
    FORMATS,
    detect_format,
    read_dataset,
    read_records,
    write_dataset,
    write_records,
)
from evoray.data.records import KINDS, validate_record, validate_records
from evoray.data.tokenize import Encoded, collate, encode_pair, encode_pairs

__all__ = [
    "FORMATS", "KINDS", "Encoded", "collate", "detect_format", "encode_pair", "encode_pairs",
    "read_dataset", "read_records", "validate_record", "validate_records", "write_dataset",
    "write_records",
]
