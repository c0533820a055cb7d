"""Where the training monitor's results go: one sink per output.

Each profiled step (``ProfiledStep``: its examples, their per-matrix statistics, online
flag scores and flags) is handed to every sink the run opened: the run directory
(``RunDirectory``, written by store.RunStore as ``gradspec profile`` writes one), the
flags file (``FlagsFile``) and the Trainer's logs (``TrainerLogs``, which every
``report_to`` integration receives).

To add an output, subclass ``MonitorSink`` (``open`` decides whether this run wants it,
``write`` takes each step, ``add_logs`` and ``close`` if it needs them) and add the class
to ``SINKS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters import Target
from ..distributed import Ranks
from ..files import write_text_atomic
from ..statistics import STAT_COLUMNS
from ..store import (
    Occurrence,
    RunStore,
    run_schemas,
    training_fingerprint,
    training_manifest,
    training_rows,
)

FLAGGED_FILE = "flagged.jsonl"
AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {
    "mean": np.mean,
    "p95": partial(np.percentile, q=95),
    "max": np.max,
}


@dataclass(frozen=True)
class MonitorRun:
    """What the sinks are told when training starts."""

    out: Path | None  # the run directory asked for, if any
    targets: list[Target]
    settings: dict[str, Any]  # how the monitor profiles and flags
    output_dir: str  # the Trainer's
    ranks: Ranks  # this process's place in the Trainer's process group
    coverage: dict[str, Any] | None = None  # what the targets cover (``Coverage.as_dict``)


@dataclass(frozen=True)
class ProfiledStep:
    """One profiled optimizer step's examples (of every rank), scored and flagged."""

    step: int
    epoch: float
    occurrences: list[Occurrence]
    scores: np.ndarray  # online flag score per occurrence (nan until the window fills)
    flagged: np.ndarray  # per occurrence

    def statistics(self) -> np.ndarray:
        """occurrences x targets x STAT_COLUMNS."""
        return np.stack([o.statistics for o in self.occurrences])


class MonitorSink:
    """One output of the monitor."""

    @classmethod
    def open(cls, run: MonitorRun) -> MonitorSink | None:
        """This output for the run, or None where it has nothing to do."""
        raise NotImplementedError

    def write(self, step: ProfiledStep) -> None:
        """Take one profiled step."""
        raise NotImplementedError

    def add_logs(self, logs: dict[str, float]) -> None:
        """Add to the Trainer's logs, as it logs."""

    def close(self) -> None:
        """Training ended."""


class RunDirectory(MonitorSink):
    """The run directory (on rank 0): one part per profiled step, through the store."""

    def __init__(self, store: RunStore, targets: list[Target]):
        self.store, self.targets = store, targets
        self.written = store.next_index()

    @classmethod
    def open(cls, run: MonitorRun) -> RunDirectory | None:
        if run.out is None or not run.ranks.is_main:
            return None
        manifest = training_manifest(run.output_dir, run.targets, run.settings, run.coverage)
        store = RunStore(run.out, training_fingerprint(run.targets), run_schemas(manifest))
        store.open(manifest, run.ranks.size)
        return cls(store, run.targets)

    def write(self, step: ProfiledStep) -> None:
        first, n = self.written, len(step.occurrences)
        spectra, examples = training_rows(
            first, step.step, step.epoch, step.occurrences, step.scores, self.targets
        )
        self.store.write_chunk(first, first + n - 1, spectra, examples)
        self.written += n

    def close(self) -> None:
        self.store.close()


class FlagsFile(MonitorSink):
    """``flagged.jsonl`` in the run directory (on rank 0): one line per flagged example."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def open(cls, run: MonitorRun) -> FlagsFile | None:
        if run.out is None or not run.ranks.is_main:
            return None
        return cls(Path(run.out) / FLAGGED_FILE)

    def write(self, step: ProfiledStep) -> None:
        lines = [
            {
                "step": step.step,
                "epoch": step.epoch,
                "example_id": step.occurrences[i].example_id,
                "row": step.occurrences[i].row,
                "score": float(step.scores[i]),
                "loss": step.occurrences[i].loss,
            }
            for i in np.flatnonzero(step.flagged)
        ]
        # Rewritten whole, atomically: flags are few.
        before = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        write_text_atomic(self.path, before + "".join(json.dumps(line) + "\n" for line in lines))


class TrainerLogs(MonitorSink):
    """``gradspec/<kind>/<stat>_{mean,p95,max}`` over each profiled step's (example,
    matrix) values of each kind, and the share of scored examples flagged, in the
    Trainer's next logs (on every rank, as the Trainer logs)."""

    def __init__(self, kinds: np.ndarray):
        self.kinds = kinds
        self.pending: dict[str, float] = {}

    @classmethod
    def open(cls, run: MonitorRun) -> TrainerLogs:
        return cls(np.array([t.kind for t in run.targets]))

    def write(self, step: ProfiledStep) -> None:
        stats = step.statistics()
        logs = {}
        for kind in sorted(set(self.kinds)):
            values = stats[:, self.kinds == kind, :].reshape(-1, len(STAT_COLUMNS))
            for i, name in enumerate(STAT_COLUMNS):
                for aggregate, compute in AGGREGATES.items():
                    logs[f"gradspec/{kind}/{name}_{aggregate}"] = float(compute(values[:, i]))
        scored = np.isfinite(step.scores)
        flagged = float(step.flagged[scored].mean()) if scored.any() else 0.0
        self.pending = {**logs, "gradspec/flagged_frac": flagged}

    def add_logs(self, logs: dict[str, float]) -> None:
        logs.update(self.pending)
        self.pending = {}


SINKS: tuple[type[MonitorSink], ...] = (RunDirectory, FlagsFile, TrainerLogs)
