"""JSON Lines: one record per line (Alpaca, chat or ShareGPT), written back line for line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from .base import SourceRecord
from .text import JSON_SUFFIXES, is_json_array, read_text, write_exactly

EXPECTED = "expected a JSON array of records, or JSON Lines: one record per line"


class JsonLines:
    """A .jsonl (or .json) file with one JSON record per non-blank line."""

    name = "jsonl"

    def detect(self, path: Path) -> bool:
        """A file with a JSON suffix that is not one JSON array."""
        return path.is_file() and path.suffix in JSON_SUFFIXES and not is_json_array(path)

    def read(self, path: Path) -> list[SourceRecord]:
        """Each non-blank line parsed, with its 1-based line number and exact text. Only
        "\n" ends a line (JSON strings may hold U+2028 or NEL); an empty file is refused."""
        text = read_text(path)
        if not text.strip():
            raise DataError(str(path), None, f"empty: no records ({EXPECTED})")
        records: list[SourceRecord] = []
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                if not records:
                    refuse_one_document(path, text)
                message = f"malformed JSON: {exc.msg} (column {exc.colno})"
                raise DataError(str(path), line_no, message) from None
            except RecursionError:
                raise DataError(str(path), line_no, "malformed JSON: nested too deeply") from None
            records.append(SourceRecord(len(records), value, line_no, line.removesuffix("\r")))
        return records

    def write(self, path: Path, rows: Sequence[int], like: Path) -> None:
        """The kept lines with the source's line end (CRLF if it has any), ending in one
        when the source does."""
        text = read_text(like)
        raws = [record.raw for record in self.read(like)]
        kept = [raws[i] for i in rows]
        newline = "\r\n" if "\r\n" in text else "\n"
        body = newline.join(kept)
        write_exactly(path, body + newline if kept and text.endswith("\n") else body)


def refuse_one_document(path: Path, text: str) -> None:
    """If the whole file is one JSON value spread over lines (say a pretty-printed object),
    refuse it as such, rather than as a malformed first line."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return
    found = "object" if isinstance(value, dict) else type(value).__name__
    raise DataError(
        str(path), None, f"one JSON {found} over several lines, not records ({EXPECTED})"
    )
