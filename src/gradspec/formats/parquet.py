"""Parquet files: one record per row, written back with the same schema and codec."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from ..files import write_parquet_atomic
from .base import SourceRecord
from .table import table_records

PARQUET_MAGIC = b"PAR1"


class Parquet:
    """A .parquet file (or any file starting with Parquet's magic bytes)."""

    name = "parquet"

    def detect(self, path: Path) -> bool:
        """A file named .parquet, or one that starts with Parquet's magic bytes."""
        if not path.is_file():
            return False
        if path.suffix == ".parquet":
            return True
        with path.open("rb") as stream:
            return stream.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC

    def read(self, path: Path) -> list[SourceRecord]:
        """Every row as a record, numbered from 0."""
        table = read_table(path)
        try:
            return table_records(table.to_pylist())
        except (pa.ArrowException, UnicodeDecodeError, ValueError) as exc:
            raise DataError(str(path), None, f"unreadable values ({exc})") from None

    def write(self, path: Path, rows: Sequence[int], like: Path) -> None:
        """The rows at ``rows`` of ``like``, with its schema (metadata too) and compression."""
        table = read_table(like)
        kept = table.take(pa.array(rows, type=pa.int64()))
        write_parquet_atomic(kept, path, compression=compression_of(like))


def read_table(path: Path) -> pa.Table:
    """The whole Parquet file, or a DataError naming it."""
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), None, f"not a readable Parquet file ({exc})") from None


def compression_of(path: Path) -> str:
    """The codec of the file's first column chunk ('NONE' when uncompressed or empty)."""
    metadata = pq.ParquetFile(path).metadata
    if metadata.num_row_groups == 0 or metadata.num_columns == 0:
        return "NONE"
    codec = metadata.row_group(0).column(0).compression
    return "NONE" if codec == "UNCOMPRESSED" else codec
