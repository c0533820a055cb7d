"""What the JSON array and JSONL formats share: their suffixes and how their text is written."""

from __future__ import annotations

from pathlib import Path

JSON_SUFFIXES = (".json", ".jsonl")


def is_json_array(path: Path) -> bool:
    """Whether a .json/.jsonl file holds one JSON array (its first non-space character is '[')."""
    with path.open("rb") as stream:
        while chunk := stream.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def write_like(path: Path, body: str, like: Path) -> None:
    """Write ``body`` as UTF-8 with the line ends of ``like`` (CRLF if it has any)."""
    newline = "\r\n" if b"\r\n" in like.read_bytes() else "\n"
    path.write_text(body, encoding="utf-8", newline=newline)
