"""The interfaces every data format and record schema implements, and where a record sits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import DataError


@dataclass(frozen=True)
class Location:
    """Where a record sits: its file and its line (text formats) or row (tables)."""

    path: str
    line: int | None = None
    row: int | None = None

    def error(self, message: str, field: str | None = None) -> DataError:
        """A DataError naming this file, line or row, and ``field``."""
        return DataError(self.path, self.line, message, field=field, row=self.row)


@dataclass(frozen=True)
class SourceRecord:
    """One parsed record: its 0-based row in the file, its line and exact text (text formats)."""

    row: int
    value: Any
    line: int | None = None
    raw: str = ""  # the record's exact source text; empty for a table row

    def location(self, path: Path) -> Location:
        """Name the line in a text file, the row in a table."""
        if self.line is not None:
            return Location(str(path), line=self.line)
        return Location(str(path), row=self.row)


class DataFormat(Protocol):
    """A file (or folder) layout: recognise it, read its records, write a subset back."""

    name: str

    def detect(self, path: Path) -> bool:
        """Whether ``path`` is in this format (cheap: its suffix, a few bytes, marker files)."""
        ...

    def read(self, path: Path) -> list[SourceRecord]:
        """Every record of ``path`` in order, with its position."""
        ...

    def write(self, path: Path, rows: Sequence[int], like: Path) -> None:
        """Write the records at ``rows`` (0-based, ascending) of ``like`` to ``path``, unchanged."""
        ...


class RecordSchema(Protocol):
    """A record layout (Alpaca, chat messages, ShareGPT): validate it and read its turns."""

    name: str

    def matches(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` uses this layout (by its distinguishing key)."""
        ...

    def validate(self, record: dict[str, Any], where: Location) -> None:
        """Raise a DataError naming ``where`` and the field if ``record`` is malformed."""
        ...

    def prompt_messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """The conversation before the response, as chat messages (role, content)."""
        ...

    def response(self, record: dict[str, Any]) -> str:
        """The text the model is trained to produce."""
        ...
