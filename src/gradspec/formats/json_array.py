"""Alpaca-style JSON arrays: one ``[...]`` of records, written back in the file's own layout."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from .base import SourceRecord
from .text import JSON_SUFFIXES, is_json_array, read_text, write_exactly


class JsonArray:
    """A .json (or .jsonl) file whose content is one JSON array of records."""

    name = "json_array"

    def detect(self, path: Path) -> bool:
        """A file with a JSON suffix whose first non-space character is '['."""
        return path.is_file() and path.suffix in JSON_SUFFIXES and is_json_array(path)

    def read(self, path: Path) -> list[SourceRecord]:
        """Parse the array element by element, so each record keeps its line and raw text."""
        return parse_json_array(str(path), read_text(path))

    def write(self, path: Path, rows: Sequence[int], like: Path) -> None:
        """The source array with only ``rows``, keeping its opening, separators and ending."""
        text = read_text(like)
        raws = [record.raw for record in parse_json_array(str(like), text)]
        write_exactly(path, render_json_array(text, raws, [raws[i] for i in rows]))


def parse_json_array(path: str, text: str) -> list[SourceRecord]:
    """(row, record, line, raw text) of each element of the JSON array ``text``."""
    decoder = json.JSONDecoder()
    records: list[SourceRecord] = []
    pos = text.index("[") + 1

    def fail(at: int, message: str) -> DataError:
        return DataError(path, text.count("\n", 0, at) + 1, f"malformed JSON: {message}")

    def end_array(close: int) -> list[SourceRecord]:
        """The records, if nothing but space follows the closing ']' at ``close``."""
        rest = _skip_space(text, close + 1)
        if rest < len(text):
            raise fail(rest, "extra data after the array")
        return records

    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]" and not records:
            return end_array(pos)
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, exc.msg) from None
        except RecursionError:
            raise fail(pos, "nested too deeply") from None
        line = text.count("\n", 0, pos) + 1
        records.append(SourceRecord(len(records), record, line, text[pos:end]))
        pos = _skip_space(text, end)
        if pos >= len(text):
            raise fail(pos, "unterminated array")
        if text[pos] == "]":
            return end_array(pos)
        if text[pos] != ",":
            raise fail(pos, f"expected ',' or ']' after a record, found {text[pos]!r}")
        pos += 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def render_json_array(text: str, all_raws: list[str], kept_raws: list[str]) -> str:
    """The input array with only the kept records, keeping its opening, separators and end."""
    if not kept_raws:
        return text[: text.index("[") + 1] + text[text.rindex("]") :]
    spans = []
    position = 0
    for raw in all_raws:
        start = text.index(raw, position)
        position = start + len(raw)
        spans.append((start, position))
    separator = text[spans[0][1] : spans[1][0]] if len(spans) > 1 else ", "
    return text[: spans[0][0]] + separator.join(kept_raws) + text[spans[-1][1] :]
