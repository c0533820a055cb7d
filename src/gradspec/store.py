"""Run directories: Parquet tables written in atomic chunks, a manifest, and resume.

This module is the only writer of runs: it builds their rows (``example_row``,
``profiled_rows``, ``spectra_rows``; a training run's ``training_rows``), their manifests
and fingerprints (``run_manifest``, ``run_fingerprint``, ``training_manifest``,
``training_fingerprint``) and writes them (``RunStore``), for ``gradspec profile`` and
the training monitor alike.

Layout of a run directory::

    manifest.json                        model, data, options, versions, times
    examples/part-<first>-<last>.parquet one row per example
    spectra/part-<first>-<last>.parquet  one row per (example, matrix)

A chunk covers example indices first..last. Its spectra part is renamed into place before
its examples part, so a chunk is finished exactly when its examples part exists; a killed
run leaves at most a ``.tmp`` file or an orphan spectra part, both removed on resume.

Resume works by coverage: a finished part is never deleted or overwritten, and a rerun
profiles only the examples no finished part covers, whatever the earlier ``--limit``. The
manifest's ``data.n_examples`` says how many examples (the first N) the run holds.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__
from .data import DataSource, Encoded, Example
from .errors import GradspecError, RunMismatchError
from .files import RUN_LOCK, TMP_SUFFIX, RunLock, write_json_atomic, write_parquet_atomic
from .integrity import parquet_problem, read_manifest
from .statistics import STAT_COLUMNS, STATISTICS

if TYPE_CHECKING:  # the store loads no torch: readers (report, quality) import it
    from .adapters import Target
    from .modeling import Checkpoint

# Bumped whenever the tables change (2: the stable_rank column; 3: the expert columns and
# the examples' fields mapping), so runs of two formats are never mixed by a resume.
FORMAT_VERSION = 3
# Earlier formats whose runs this one resumes: their tables lack only columns that later
# parts add and reading fills with nulls (3 added the expert columns, null for dense models,
# and the examples' fields, null without --fields).
RESUMABLE_FORMATS = (2, 3)

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
        ("fields", pa.string()),  # the --fields mapping the records were read with
    ]
)

SPECTRA_FIELDS = [
    ("example_index", pa.int64()),
    ("example_id", pa.string()),
    ("param", pa.string()),
    ("layer", pa.int64()),
    ("module", pa.string()),
    ("kind", pa.string()),
    ("expert", pa.int64()),  # a routed expert's index; null for other matrices
    ("expert_tokens", pa.int64()),  # the example's tokens routed to that expert
    *((stat.name, pa.type_for_alias(stat.column_type)) for stat in STATISTICS),
]
TOP_K_FIELD = ("top_singular_values", pa.list_(pa.float64()))
# A training run (the monitor of integrations/transformers.py; manifest kind "training")
# adds the optimizer step of each profiled occurrence, its epoch and its online flag score.
TRAINING_RUN = "training"
TRAINING_EXAMPLE_FIELDS = [
    ("step", pa.int64()),
    ("epoch", pa.float64()),
    ("flag_score", pa.float64()),
]
TRAINING_SPECTRA_FIELDS = [("step", pa.int64())]
TRAINING_ID_COLUMNS = ("step", "epoch")  # with the example index: which occurrence a row is
PART_NAME = re.compile(r"part-(\d+)-(\d+)\.parquet$")
# Tables a command may write at the top of a run directory (score's and flag's defaults).
DERIVED_TABLES = ("scores.parquet", "flags.parquet")
NONFINITE_STATUS = "skipped:nonfinite_gradient"
TRAINING_SOURCE = "train"  # a training run's examples come from the Trainer's train_dataset


def spectra_schema(top_k: int) -> pa.Schema:
    """Schema of the spectra table; the top-k list column exists only when asked for."""
    return pa.schema(SPECTRA_FIELDS + ([TOP_K_FIELD] if top_k else []))


def is_training_run(manifest: dict[str, Any]) -> bool:
    """Whether a manifest is that of a training run (rows carry their optimizer step)."""
    return manifest.get("kind") == TRAINING_RUN


def run_schemas(manifest: dict[str, Any]) -> tuple[pa.Schema, pa.Schema]:
    """The examples and spectra schemas of the run a manifest describes."""
    examples, spectra = (
        EXAMPLES_SCHEMA,
        spectra_schema(manifest.get("options", {}).get("top_k", 0)),
    )
    if is_training_run(manifest):
        for name, type_ in TRAINING_EXAMPLE_FIELDS:
            examples = examples.append(pa.field(name, type_))
        for name, type_ in TRAINING_SPECTRA_FIELDS:
            spectra = spectra.append(pa.field(name, type_))
    return examples, spectra


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- rows and manifests


def example_row(example: Example, encoded: Encoded, fields: str | None) -> dict[str, Any]:
    """An example's row before profiling: its source, token counts, status and the
    ``--fields`` mapping its record was read with."""
    status = f"skipped:{encoded.skip_reason}" if encoded.skip_reason else "ok"
    return {
        "example_index": example.index,
        "example_id": example.example_id,
        "source": example.source,
        "source_line": example.source_line,
        "loss": None,
        "n_prompt_tokens": encoded.n_prompt_tokens,
        "n_response_tokens": encoded.n_response_tokens,
        "truncated": encoded.truncated,
        "status": status,
        "response_only_loss": None,
        "ifd": None,
        "fields": fields,
    }


def profiled_rows(
    example_row: dict[str, Any],
    targets: Sequence[Target],
    loss: float,
    statistics: Sequence[Mapping[str, Any]] | None,
    expert_tokens: Sequence[int | None],
) -> list[dict[str, Any]]:
    """Record a profiled example's loss in its row; its spectra rows, one per target.

    ``statistics`` (per target, from statistics.spectrum_statistics) is None where the
    loss or a gradient was not finite: the example is then marked skipped and has no
    spectra rows. ``expert_tokens``: per target, the tokens its routed expert received.
    """
    if statistics is None:
        example_row["status"] = NONFINITE_STATUS
        return []
    example_row["loss"] = loss
    index, example_id = example_row["example_index"], example_row["example_id"]
    return spectra_rows(index, example_id, targets, statistics, expert_tokens)


def spectra_rows(
    example_index: int,
    example_id: str,
    targets: Sequence[Target],
    statistics: Sequence[Mapping[str, Any]],
    expert_tokens: Sequence[int | None],
    **extra: Any,
) -> list[dict[str, Any]]:
    """One spectra row per target of one profiled example (``extra``: a training run's
    step); a routed expert's row names the expert and the tokens it received."""
    return [
        {
            "example_index": example_index,
            "example_id": example_id,
            "param": target.param,
            "layer": target.layer,
            "module": target.module_name,
            "kind": target.kind,
            "expert": target.expert,
            "expert_tokens": n_tokens,
            **stats,
            **extra,
        }
        for target, stats, n_tokens in zip(targets, statistics, expert_tokens, strict=True)
    ]


@dataclass
class Occurrence:
    """One example as a profiled training step saw it: what the monitor hands the store."""

    row: int  # of the Trainer's train_dataset
    example_id: str
    loss: float
    n_prompt_tokens: int
    n_response_tokens: int
    statistics: np.ndarray  # targets x STAT_COLUMNS
    expert_tokens: list[int | None]  # per target: the tokens its routed expert received


def training_rows(
    first: int,
    step: int,
    epoch: float,
    occurrences: Sequence[Occurrence],
    scores: np.ndarray,
    targets: Sequence[Target],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A profiled step's spectra and example rows: each occurrence is one example of the
    run (``example_index`` counts occurrences from ``first``), with ``step``, ``epoch`` and
    its online ``flag_score``, and its dataset row in ``source_line``."""
    spectra: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for index, occurrence, score in zip(
        range(first, first + len(occurrences)), occurrences, scores, strict=True
    ):
        examples.append(
            {
                "example_index": index,
                "example_id": occurrence.example_id,
                "source": TRAINING_SOURCE,
                "source_line": occurrence.row,
                "loss": occurrence.loss,
                "n_prompt_tokens": occurrence.n_prompt_tokens,
                "n_response_tokens": occurrence.n_response_tokens,
                "truncated": False,
                "status": "ok",
                "response_only_loss": None,
                "ifd": None,
                "fields": None,  # the trainer's dataset is tokenized already
                "step": step,
                "epoch": epoch,
                "flag_score": float(score),
            }
        )
        statistics = [
            dict(zip(STAT_COLUMNS, map(float, row), strict=True)) for row in occurrence.statistics
        ]
        spectra.extend(
            spectra_rows(
                index,
                occurrence.example_id,
                targets,
                statistics,
                occurrence.expert_tokens,
                step=step,
            )
        )
    return spectra, examples


def run_fingerprint(
    options: Mapping[str, Any], signature: Mapping[str, Any], data_hash: str, adapter: bool
) -> dict[str, Any]:
    """What decides a run's results: its options (but ``limit`` and ``route``), the model
    and data fingerprints, and the table format. A run directory holds one fingerprint's
    results. The route changes values only within float32 rounding: a rerun may take
    another. Without an ``adapter`` its matrices decide nothing, so runs made before that
    option resume."""
    fingerprint = {k: v for k, v in options.items() if k not in ("limit", "route")}
    if not adapter:
        del fingerprint["adapter_matrices"]
    fingerprint.update(format_version=FORMAT_VERSION, model=dict(signature), data_sha256=data_hash)
    return fingerprint


def run_manifest(
    checkpoint: Checkpoint,
    signature: Mapping[str, Any],
    data: DataSource,
    n_examples: int,
    options: Mapping[str, Any],
    device: str,
) -> dict[str, Any]:
    """A profile run's manifest: model, data, options, device and software versions."""
    return {
        "gradspec_version": __version__,
        "model": {**signature, **checkpoint.record()},
        "data": {
            "paths": [str(f.resolve()) for f in data.files],
            "sha256": data.sha256,
            "n_examples": n_examples,
            **({"hub": data.hub} if data.hub else {}),
            **({"fields": options["fields"]} if options.get("fields") else {}),
        },
        "options": dict(options),
        "device": device,
        "versions": software_versions(),
    }


def training_fingerprint(targets: Sequence[Target]) -> dict[str, Any]:
    """What a training run's rows mean: its table format and profiled matrices."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": TRAINING_RUN,
        "modules": [t.param for t in targets],
    }


def training_manifest(
    output_dir: str,
    targets: Sequence[Target],
    monitor: Mapping[str, Any],
    coverage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A training run's manifest: the Trainer's output folder, the monitor's settings and
    what its matrices cover of the decoder layers (as a profile run states it)."""
    return {
        "gradspec_version": __version__,
        "kind": TRAINING_RUN,
        "monitor": dict(monitor),
        "model": {"path": output_dir},
        "data": {},
        "options": {"top_k": 0, "modules": [t.param for t in targets]},
        "coverage": None if coverage is None else dict(coverage),
        "versions": software_versions(),
    }


def software_versions() -> dict[str, str]:
    """Versions of what computed a run (imported here: only writers, which run them, ask)."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------- run directories


@dataclass
class RunTables:
    """The tables of a run directory, as pandas DataFrames sorted by example and parameter."""

    manifest: dict[str, Any]
    examples: pd.DataFrame
    spectra: pd.DataFrame


class RunStore:
    """Writes and resumes one run directory whose results belong to one fingerprint."""

    def __init__(
        self,
        root: str | os.PathLike,
        fingerprint: dict[str, Any],
        schemas: tuple[pa.Schema, pa.Schema] | None = None,
    ):
        """``schemas``: the examples and spectra schemas of the run's parts (``run_schemas``
        of its manifest; by default a profile run's without the top-k column)."""
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.schemas = schemas or (EXAMPLES_SCHEMA, spectra_schema(0))
        self.manifest_path = self.root / "manifest.json"
        self.lock = RunLock(self.root)

    def check(self) -> dict[str, Any] | None:
        """Refuse a directory holding something else, without writing; the old manifest."""
        if self.root.exists() and not self.root.is_dir():
            raise GradspecError(f"--out {self.root} is a file, not a run directory")
        if self.manifest_path.exists():
            old = read_manifest(self.manifest_path)
            if not isinstance(old.get("fingerprint"), dict):
                raise GradspecError(
                    f"{self.root} holds a {old.get('kind')} run, not one `gradspec profile` "
                    "can resume; use another --out"
                )
            self._refuse_if_different(old["fingerprint"])
            return old
        if self.root.exists() and any(p.name != RUN_LOCK for p in self.root.iterdir()):
            raise GradspecError(
                f"{self.root} exists, is not empty and has no manifest.json; choose another --out"
            )
        return None

    def lock_if_exists(self) -> None:
        """Take the run's lock now if the directory exists (else :meth:`open` takes it), so
        the chunks left to profile are decided by the one writer."""
        if self.root.is_dir():
            self.lock.acquire()

    def open(self, manifest: dict[str, Any], world_size: int = 1, shard: str = "none") -> None:
        """Create the directory, or continue an existing one made with the same inputs;
        the session records how many processes (ranks) write its parts, and how they held
        the model (``shard``)."""
        self.check()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GradspecError(f"cannot create {self.root}: {exc.strerror or exc}") from None
        self.lock.acquire()
        old = self.check()  # again, now that no other writer can change it
        if old is not None:
            manifest = {
                "coverage": old.get("coverage"),  # kept when this session loads no model
                **manifest,
                "created": old.get("created"),
                "sessions": old.get("sessions", []),
            }
            self._remove_leftovers()
        for folder in ("examples", "spectra"):
            try:
                (self.root / folder).mkdir(exist_ok=True)
            except OSError as exc:
                raise GradspecError(f"cannot write {self.root}: {exc.strerror or exc}") from None
        manifest.setdefault("created", now_iso())
        manifest.setdefault("sessions", [])
        session = {"started": now_iso(), "ended": None, "ranks": world_size, "shard": shard}
        manifest["sessions"].append(session)
        manifest["fingerprint"] = self.fingerprint
        self.manifest = manifest
        write_json_atomic(self.manifest_path, manifest)

    def _refuse_if_different(self, old: dict[str, Any]) -> None:
        old_format = old.get("format_version")
        if old_format not in RESUMABLE_FORMATS:
            raise RunMismatchError(
                f"{self.root} holds a run in format {old_format} of an earlier gradspec, which "
                f"cannot be resumed into format {FORMAT_VERSION}: use another --out, or delete "
                "it (reports still read it)."
            )
        changed = sorted(
            k
            for k in set(old) | set(self.fingerprint)
            if k != "format_version" and old.get(k) != self.fingerprint.get(k)
        )
        if changed:
            details = "; ".join(
                f"{k}: was {old.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in changed
            )
            raise RunMismatchError(
                f"{self.root} holds a run with other inputs ({details}). "
                "Results are never mixed: use another --out, or delete it."
            )

    def finished_ranges(self) -> list[tuple[int, int]]:
        """(first, last) example indices of every chunk whose examples part exists and is
        intact (see :func:`damaged_parts`: a damaged chunk is profiled again), sorted."""
        damaged = damaged_parts(self.root)
        return sorted(
            _part_range(p)
            for p in (self.root / "examples").glob("part-*.parquet")
            if p.name not in damaged
        )

    def next_index(self) -> int:
        """The example index after every finished part's (where a training run appends)."""
        return max((last + 1 for _, last in self.finished_ranges()), default=0)

    def missing_chunks(self, n_examples: int, chunk_size: int) -> list[tuple[int, int]]:
        """The chunks still to profile for examples 0..n_examples-1: the examples no finished
        part covers, cut at multiples of ``chunk_size`` (as an uninterrupted run cuts)."""
        covered = [False] * n_examples
        for first, last in self.finished_ranges():
            covered[first : last + 1] = [True] * len(covered[first : last + 1])
        chunks: list[tuple[int, int]] = []
        for index in (i for i in range(n_examples) if not covered[i]):
            if chunks and chunks[-1][1] == index - 1 and index % chunk_size:
                chunks[-1] = (chunks[-1][0], index)
            else:
                chunks.append((index, index))
        return chunks

    def _remove_leftovers(self) -> None:
        """Delete what a killed session left (temporary files, spectra parts whose chunk
        never finished) and the parts of damaged chunks, which are profiled again; intact
        finished parts are never touched. The caller holds the run's lock."""
        for tmp in self.root.glob(f"*/*{TMP_SUFFIX}"):
            tmp.unlink()
        for name in damaged_parts(self.root):
            for folder in ("examples", "spectra"):
                (self.root / folder / name).unlink(missing_ok=True)
        finished = {p.name for p in (self.root / "examples").glob("part-*.parquet")}
        for part in (self.root / "spectra").glob("part-*.parquet"):
            if part.name not in finished:
                part.unlink()

    def write_chunk(
        self,
        first: int,
        last: int,
        spectra_rows: list[dict[str, Any]],
        example_rows: list[dict[str, Any]],
    ) -> None:
        """Persist one finished chunk; spectra first, so the examples part marks completion."""
        self._refuse_overlap(first, last)
        name = f"part-{first:09d}-{last:09d}.parquet"
        examples_schema, spectra_schema_ = self.schemas
        spectra = pa.Table.from_pylist(spectra_rows, schema=spectra_schema_)
        write_parquet_atomic(spectra, self.root / "spectra" / name)
        examples = pa.Table.from_pylist(example_rows, schema=examples_schema)
        write_parquet_atomic(examples, self.root / "examples" / name)

    def _refuse_overlap(self, first: int, last: int) -> None:
        """Finished work is never replaced: a chunk may not overlap a finished part."""
        for lo, hi in self.finished_ranges():
            if lo <= last and hi >= first:
                raise GradspecError(
                    f"{self.root}: examples {first}..{last} overlap the finished part "
                    f"{lo}..{hi}; is another session writing this run directory?"
                )

    def close(self, **session: Any) -> None:
        """Record the end of this session in the manifest, with what ``session`` adds (the
        routes it chose), and let other writers in."""
        self.manifest["sessions"][-1].update(session, ended=now_iso())
        write_json_atomic(self.manifest_path, self.manifest)
        self.lock.release()


def _part_range(path: Path) -> tuple[int, int]:
    match = PART_NAME.search(path.name)
    assert match, path
    return int(match.group(1)), int(match.group(2))


def load_run(run_dir: str | os.PathLike) -> RunTables:
    """Read a run directory's manifest and the finished examples among its first
    ``data.n_examples`` (parts a larger earlier ``--limit`` left are kept, not read); a
    training run's tables keep their step columns."""
    root = Path(run_dir)
    manifest = read_manifest(root / "manifest.json")
    refuse_damaged(root)
    n_examples = manifest.get("data", {}).get("n_examples")
    done = sorted(
        p.name
        for p in (root / "examples").glob("part-*.parquet")
        if n_examples is None or _part_range(p)[0] < n_examples
    )
    examples_schema, spectra_schema_ = run_schemas(manifest)
    examples = _read_parts(root / "examples", done, examples_schema, n_examples)
    spectra = _read_parts(root / "spectra", done, spectra_schema_, n_examples)
    return RunTables(
        manifest,
        examples.sort_values("example_index", ignore_index=True),
        spectra.sort_values(
            ["example_index", "layer", "param", "module", "expert"], ignore_index=True
        ),
    )


def damaged_parts(root: Path) -> dict[str, str]:
    """Each finished chunk (part name) whose examples or spectra part is missing, truncated
    or unreadable, with the problem; an examples part must hold one row per example."""
    problems = {}
    for part in sorted((root / "examples").glob("part-*.parquet")):
        first, last = _part_range(part)
        problem = parquet_problem(part, last - first + 1) or parquet_problem(
            root / "spectra" / part.name
        )
        if problem:
            problems[part.name] = problem
    return problems


def run_problems(root: Path) -> list[str]:
    """Everything wrong with a run directory, one line each: its manifest's problem, then
    each damaged chunk, then the examples among the manifest's first ``n_examples`` that no
    intact part covers (an interrupted run, or lost parts: ``profile`` redoes them)."""
    try:
        manifest = read_manifest(root / "manifest.json")
    except GradspecError as exc:
        return [str(exc)]
    problems = list(damaged_parts(root).values())
    n_examples = manifest.get("data", {}).get("n_examples")
    if n_examples is not None and not is_training_run(manifest):
        store = RunStore(root, {}, 0)
        problems += [
            f"{root}: examples {first}..{last} have no intact part (interrupted, or parts "
            "lost); rerun `gradspec profile` to profile them"
            for first, last in store.missing_chunks(n_examples, n_examples or 1)
        ]
    return problems


def refuse_damaged(root: Path) -> None:
    """A GradspecError naming the first damaged chunk of a run and how to repair it."""
    damaged = damaged_parts(root)
    if damaged:
        raise GradspecError(
            f"{root}: {len(damaged)} damaged chunk(s), e.g. {next(iter(damaged.values()))}; "
            f"`gradspec check {root}` lists them, rerunning `gradspec profile` redoes them"
        )


def _read_parts(
    folder: Path, names: list[str], schema: pa.Schema, n_examples: int | None
) -> pd.DataFrame:
    """The rows of the named parts whose example index is below ``n_examples`` (if given)."""
    below = None if n_examples is None else pc.field("example_index") < n_examples
    tables = [pq.read_table(folder / name, schema=schema, filters=below) for name in names]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.to_pandas()
