"""One registry of data formats and record schemas, shared by loading and ``select``.

A format reads a file (or folder) into records with their position and writes a subset of
them back unchanged; a schema validates a record and reads its prompt and response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import GradspecError
from .base import DataFormat, Location, RecordSchema, SourceRecord
from .hf_datasets import HfDatasetFolder, is_dataset_dict
from .json_array import JsonArray
from .jsonl import JsonLines
from .parquet import Parquet
from .schemas import ALPACA, CHAT, SHAREGPT

FORMATS: dict[str, DataFormat] = {
    f.name: f for f in (JsonArray(), JsonLines(), Parquet(), HfDatasetFolder())
}
# Tried in order: Alpaca, the fallback, comes last.
SCHEMAS: dict[str, RecordSchema] = {s.name: s for s in (CHAT, SHAREGPT, ALPACA)}

__all__ = [
    "FORMATS",
    "SCHEMAS",
    "DataFormat",
    "Location",
    "RecordSchema",
    "SourceRecord",
    "format_of",
    "is_data_path",
    "schema_of",
]


def format_of(path: Path) -> DataFormat:
    """The format of a data file or folder, or an error saying which formats are read."""
    if is_dataset_dict(path):
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise GradspecError(
            f"{path}: a DatasetDict folder; give one split's folder "
            f"({', '.join(str(path / s) for s in splits)})"
        )
    for data_format in FORMATS.values():
        if data_format.detect(path):
            return data_format
    raise GradspecError(
        f"{path}: not a data format gradspec reads (a .json array, .jsonl, .parquet, "
        "or a datasets save_to_disk folder)"
    )


def is_data_path(path: Path) -> bool:
    """Whether some format reads ``path``, or it is a DatasetDict that format_of explains."""
    return is_dataset_dict(path) or any(f.detect(path) for f in FORMATS.values())


def schema_of(record: Any, where: Location) -> RecordSchema:
    """The schema of ``record``, validated; errors name the file, line or row, and field."""
    if not isinstance(record, dict):
        raise where.error(f"expected a JSON object, found {type(record).__name__}")
    schema = next(s for s in SCHEMAS.values() if s.matches(record))
    schema.validate(record, where)
    return schema
