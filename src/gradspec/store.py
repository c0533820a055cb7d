"""Run directories: Parquet tables written in atomic chunks, a manifest, and resume.

Layout of a run directory::

    manifest.json                        model, data, options, versions, times
    examples/part-<first>-<last>.parquet one row per example
    spectra/part-<first>-<last>.parquet  one row per (example, matrix)

A chunk covers example indices first..last. Its spectra part is renamed into place before
its examples part, so a chunk is finished exactly when its examples part exists; a killed
run leaves at most a ``.tmp`` file or an orphan spectra part, both redone on resume.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import GradspecError

EXAMPLES_SCHEMA = pa.schema(
    [
        ("example_index", pa.int64()),
        ("example_id", pa.string()),
        ("source", pa.string()),
        ("source_line", pa.int64()),
        ("loss", pa.float64()),
        ("n_prompt_tokens", pa.int64()),
        ("n_response_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("status", pa.string()),
        ("response_only_loss", pa.float64()),
        ("ifd", pa.float64()),
    ]
)

SPECTRA_FIELDS = [
    ("example_index", pa.int64()),
    ("example_id", pa.string()),
    ("param", pa.string()),
    ("layer", pa.int64()),
    ("module", pa.string()),
    ("kind", pa.string()),
    ("nuclear_norm", pa.float64()),
    ("spectral_norm", pa.float64()),
    ("frobenius_norm", pa.float64()),
    ("effective_rank", pa.float64()),
]
TOP_K_FIELD = ("top_singular_values", pa.list_(pa.float64()))
PART_NAME = re.compile(r"part-(\d+)-(\d+)\.parquet$")


def spectra_schema(top_k: int) -> pa.Schema:
    """Schema of the spectra table; the top-k list column exists only when asked for."""
    return pa.schema(SPECTRA_FIELDS + ([TOP_K_FIELD] if top_k else []))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file and rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file to a temporary name and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@dataclass
class RunTables:
    """The tables of a run directory, as pandas DataFrames sorted by example and parameter."""

    manifest: dict[str, Any]
    examples: pd.DataFrame
    spectra: pd.DataFrame


class RunStore:
    """Writes and resumes one run directory whose results belong to one fingerprint."""

    def __init__(self, root: str | os.PathLike, fingerprint: dict[str, Any], top_k: int):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.schema = spectra_schema(top_k)
        self.manifest_path = self.root / "manifest.json"

    def open(self, manifest: dict[str, Any]) -> None:
        """Create the directory, or check that an existing one was made with the same inputs."""
        if self.manifest_path.exists():
            old = json.loads(self.manifest_path.read_text())
            self._refuse_if_different(old.get("fingerprint", {}))
            manifest = {
                **manifest,
                "created": old.get("created"),
                "sessions": old.get("sessions", []),
            }
        elif self.root.exists() and any(self.root.iterdir()):
            raise GradspecError(
                f"{self.root} exists, is not empty and has no manifest.json; choose another --out"
            )
        (self.root / "examples").mkdir(parents=True, exist_ok=True)
        (self.root / "spectra").mkdir(parents=True, exist_ok=True)
        manifest.setdefault("created", now_iso())
        manifest.setdefault("sessions", [])
        manifest["sessions"].append({"started": now_iso(), "ended": None})
        manifest["fingerprint"] = self.fingerprint
        self.manifest = manifest
        write_json_atomic(self.manifest_path, manifest)

    def _refuse_if_different(self, old: dict[str, Any]) -> None:
        changed = sorted(
            k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k)
        )
        if changed:
            details = "; ".join(
                f"{k}: was {old.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in changed
            )
            raise GradspecError(
                f"{self.root} holds a run with other inputs ({details}). "
                "Results are never mixed: use another --out, or delete it."
            )

    def finished_chunks(self) -> set[tuple[int, int]]:
        """(first, last) example indices of every chunk whose examples part exists."""
        return {_part_range(p) for p in (self.root / "examples").glob("part-*.parquet")}

    def write_chunk(
        self,
        first: int,
        last: int,
        spectra_rows: list[dict[str, Any]],
        example_rows: list[dict[str, Any]],
    ) -> None:
        """Persist one finished chunk; spectra first, so the examples part marks completion."""
        self._drop_overlapping(first, last)
        name = f"part-{first:09d}-{last:09d}.parquet"
        spectra = pa.Table.from_pylist(spectra_rows, schema=self.schema)
        write_parquet_atomic(spectra, self.root / "spectra" / name)
        examples = pa.Table.from_pylist(example_rows, schema=EXAMPLES_SCHEMA)
        write_parquet_atomic(examples, self.root / "examples" / name)

    def _drop_overlapping(self, first: int, last: int) -> None:
        """Remove parts of an earlier, shorter run (a smaller --limit) that this chunk covers."""
        for table in ("examples", "spectra"):
            for part in (self.root / table).glob("part-*.parquet"):
                lo, hi = _part_range(part)
                if lo <= last and hi >= first and (lo, hi) != (first, last):
                    part.unlink()

    def close(self) -> None:
        """Record the end of this session in the manifest."""
        self.manifest["sessions"][-1]["ended"] = now_iso()
        write_json_atomic(self.manifest_path, self.manifest)


def _part_range(path: Path) -> tuple[int, int]:
    match = PART_NAME.search(path.name)
    assert match, path
    return int(match.group(1)), int(match.group(2))


def load_run(run_dir: str | os.PathLike) -> RunTables:
    """Read a run directory's manifest and its finished chunks."""
    root = Path(run_dir)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise GradspecError(f"{root} is not a gradspec run directory (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    done = sorted(p.name for p in (root / "examples").glob("part-*.parquet"))
    examples = _read_parts(root / "examples", done, EXAMPLES_SCHEMA)
    spectra_schema_ = spectra_schema(manifest.get("options", {}).get("top_k", 0))
    spectra = _read_parts(root / "spectra", done, spectra_schema_)
    return RunTables(
        manifest,
        examples.sort_values("example_index", ignore_index=True),
        spectra.sort_values(["example_index", "layer", "param"], ignore_index=True),
    )


def _read_parts(folder: Path, names: list[str], schema: pa.Schema) -> pd.DataFrame:
    tables = [pq.read_table(folder / name, schema=schema) for name in names]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.to_pandas()
