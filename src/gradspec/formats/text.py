"""What the JSON array and JSONL formats share: their suffixes, and reading and writing
their text exactly (UTF-8, line ends as they are)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..files import write_text_atomic

JSON_SUFFIXES = (".json", ".jsonl")


def is_json_array(path: Path) -> bool:
    """Whether a .json/.jsonl file holds one JSON array (its first non-space character is '[')."""
    with path.open("rb") as stream:
        while chunk := stream.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def read_text(path: Path) -> str:
    """The file's text decoded as UTF-8 with its line ends untouched (a record's line is
    ended by "\\n" alone: U+2028 or NEL inside a string is text); a DataError names the line
    of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            str(path), line, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column})"
        ) from None


def write_exactly(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 with its line ends as they are, atomically."""
    write_text_atomic(path, text, newline="")
