"""JSON Lines: one record per line (Alpaca, chat or ShareGPT), written back line for line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from .base import SourceRecord
from .text import JSON_SUFFIXES, is_json_array, write_like


class JsonLines:
    """A .jsonl (or .json) file with one JSON record per non-blank line."""

    name = "jsonl"

    def detect(self, path: Path) -> bool:
        """A file with a JSON suffix that is not one JSON array."""
        return path.is_file() and path.suffix in JSON_SUFFIXES and not is_json_array(path)

    def read(self, path: Path) -> list[SourceRecord]:
        """Each non-blank line parsed, with its 1-based line number and exact text."""
        records: list[SourceRecord] = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                message = f"malformed JSON: {exc.msg} (column {exc.colno})"
                raise DataError(str(path), line_no, message) from None
            records.append(SourceRecord(len(records), value, line_no, line))
        return records

    def write(self, path: Path, rows: Sequence[int], like: Path) -> None:
        """The kept lines, ending in a newline when the source does."""
        text = like.read_text(encoding="utf-8")
        raws = [record.raw for record in self.read(like)]
        kept = [raws[i] for i in rows]
        body = "\n".join(kept)
        write_like(path, body + "\n" if kept and text.endswith("\n") else body, like)
