"""Diagnosing damaged files of a run directory: its manifest and its Parquet parts.

Each check returns (or raises) one line that names the file and what is wrong with it, so
a damaged run is reported before any command uses it, never crashed on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import GradspecError

DAMAGED_MANIFEST = "the run's manifest is damaged; profile into a new --out"


def read_manifest(path: Path) -> dict[str, Any]:
    """A run's manifest.json as a dict, or a GradspecError saying what is wrong with it.

    It must be a JSON object holding a ``fingerprint`` (written by ``gradspec profile``)
    or a ``kind`` (the training monitor), and whatever of ``data`` and ``options`` it
    holds must be objects.
    """
    if not path.is_file():
        raise GradspecError(f"{path.parent} is not a gradspec run directory (no {path.name})")
    manifest = read_json_object(path, DAMAGED_MANIFEST)
    if not isinstance(manifest.get("fingerprint"), dict) and "kind" not in manifest:
        raise GradspecError(
            f"{path}: no 'fingerprint' (nor a 'kind'), so not a manifest gradspec wrote; "
            f"{DAMAGED_MANIFEST}"
        )
    for key in ("data", "options"):
        if not isinstance(manifest.get(key, {}), dict):
            raise GradspecError(f"{path}: '{key}' is not an object; {DAMAGED_MANIFEST}")
    return manifest


def read_json_object(path: Path, remedy: str) -> dict[str, Any]:
    """The JSON object in a file gradspec wrote, or a GradspecError naming the file (and
    line) and what is wrong, followed by ``remedy``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise GradspecError(f"{path}: unreadable ({exc}); {remedy}") from None
    if not text.strip():
        raise GradspecError(f"{path}: empty; {remedy}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GradspecError(f"{path}:{exc.lineno}: not JSON ({exc.msg}); {remedy}") from None
    if not isinstance(value, dict):
        raise GradspecError(f"{path}: a JSON {type(value).__name__}, not an object; {remedy}")
    return value


def parquet_problem(path: Path, n_rows: int | None = None) -> str | None:
    """What is wrong with a Parquet part (missing, truncated or unreadable, without an
    example_index column, or not ``n_rows`` rows), or None if its footer reads and agrees."""
    if not path.is_file():
        return f"{path}: missing"
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        return f"{path}: truncated or unreadable ({str(exc).splitlines()[0]})"
    if "example_index" not in metadata.schema.names:
        return f"{path}: no example_index column, not a gradspec part"
    if n_rows is not None and metadata.num_rows != n_rows:
        return f"{path}: {metadata.num_rows} rows where its name promises {n_rows}"
    return None
