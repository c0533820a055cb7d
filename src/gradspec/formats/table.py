"""What the columnar formats (Parquet, datasets folders) share: rows to records."""

from __future__ import annotations

from typing import Any

from .base import SourceRecord


def without_nulls(value: Any) -> Any:
    """``value`` with null fields removed at every depth: a table marks an absent field null."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def table_records(rows: list[dict[str, Any]]) -> list[SourceRecord]:
    """Each row as a record (nulls dropped), numbered from 0 as pandas and datasets do."""
    return [SourceRecord(i, without_nulls(row)) for i, row in enumerate(rows)]
