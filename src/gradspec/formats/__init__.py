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
    field = lone_surrogate_field(record)
    if field is not None:
        raise where.error(
            "holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not "
            "Unicode text",
            field=field,
        )
    schema = next(s for s in SCHEMAS.values() if s.matches(record))
    schema.validate(record, where)
    return schema


def lone_surrogate_field(value: Any, field: str = "") -> str | None:
    """The dotted path of the first key or string in ``value`` that is not valid Unicode
    (a lone surrogate, as JSON's "\\ud800" escape reads), or None."""
    if isinstance(value, str):
        return None if _encodes(value) else field or "(record)"
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        name = str(key) if str(key).isprintable() else ascii(str(key))[1:-1]
        path = f"{field}.{name}" if field else name
        if isinstance(key, str) and not _encodes(key):
            return path
        found = lone_surrogate_field(item, path)
        if found is not None:
            return found
    return None


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode (encodes as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
