"""Runs: a run directory's tables with its labels, found in run and study folders."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .analysis import LayerValues, is_expert_row, layer_values, pooled_tables
from .errors import GradspecError
from .integrity import read_json_object
from .labels import describe, normalize_labels
from .store import RunTables, load_run

STUDY_FILE = "study.json"  # in a study folder: its cells, their runs and labels
STUDY_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Run:
    """A run directory's tables with its labels; caches the per-example layer values."""

    name: str
    path: Path
    labels: dict[str, Any]
    tables: RunTables  # routed experts pooled per layer (analysis.pool_experts)
    experts: pd.DataFrame = field(default_factory=pd.DataFrame)  # routed experts, unpooled
    _values: dict[tuple[str, str], LayerValues] = field(default_factory=dict, repr=False)

    def values(self, module: str, statistic: str) -> LayerValues:
        """Examples x layers of ``statistic`` for ``module``, computed once."""
        key = (module, statistic)
        if key not in self._values:
            self._values[key] = layer_values(self.tables, module, statistic)
        return self._values[key]

    def modules(self) -> list[str]:
        """Modules profiled in this run: the study's seven first, then the others."""
        return study_order(self.tables.spectra["module"])


def study_order(modules: Iterable[str]) -> list[str]:
    """Distinct module names, the study's seven first, then the others as they come."""
    present = list(dict.fromkeys(modules))
    return [m for m in STUDY_MODULES if m in present] + [
        m for m in present if m not in STUDY_MODULES
    ]


def select(runs: Sequence[Run], **labels: Any) -> Run | None:
    """The one run whose labels include ``labels``, or None."""
    matches = [r for r in runs if all(r.labels.get(k) == v for k, v in labels.items())]
    if len(matches) > 1:
        raise GradspecError(
            f"runs {', '.join(r.name for r in matches)} all have the labels "
            f"{describe(labels)}; give each run distinct labels"
        )
    return matches[0] if matches else None


def load_runs(
    run_dirs: Sequence[str | os.PathLike],
    labels: Mapping[str | os.PathLike, Mapping[str, Any]] | None = None,
) -> list[Run]:
    """Runs with their labels; a study folder stands for its started cells."""
    extra = {Path(k).resolve(): dict(v) for k, v in (labels or {}).items()}
    found: list[tuple[Path, dict[str, Any]]] = []
    for path in map(Path, run_dirs):
        found.extend(study_runs(path) if is_study_dir(path) else [(path, {})])
    if not found:
        raise GradspecError("no runs to report (a study folder with no started cell?)")
    runs, names = [], set()
    for path, own in found:
        merged = normalize_labels({**own, **extra.get(path.resolve(), {})}, f"labels of {path}")
        name = str(merged.get("name") or path.name)
        while name in names:
            name = f"{path.parent.name}/{name}"
        names.add(name)
        tables = load_run(path)
        experts = tables.spectra[is_expert_row(tables.spectra)]
        runs.append(Run(name, path, merged, pooled_tables(tables), experts))
    return runs


def study_runs(study_dir: str | os.PathLike) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(run directory, labels) of each cell of a study folder that has started."""
    root = Path(study_dir)
    for entry in read_study_record(root)["cells"]:
        run = root / entry["run"]
        if (run / "manifest.json").exists():
            yield run, entry["labels"]


def recorded_finding_modules(run_dirs: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    """The modules a study file named to decide its findings ([findings] modules), if any."""
    for path in map(Path, run_dirs):
        if is_study_dir(path):
            named = read_study_record(path).get("findings", {})
            if named.get("modules"):
                return tuple(named["modules"])
    return ()


def read_study_record(root: Path) -> dict[str, Any]:
    """A study folder's study.json, checked: a "cells" list of objects, each with a "name",
    a "run" folder and "labels"; a GradspecError names what is wrong."""
    path = root / STUDY_FILE
    remedy = "the study's record is damaged; rerun the study into another --out"
    record = read_json_object(path, remedy)
    cells = record.get("cells")
    shapes = {"name": str, "run": str, "labels": dict}
    if not isinstance(cells, list) or not all(
        isinstance(cell, dict) and all(isinstance(cell.get(k), t) for k, t in shapes.items())
        for cell in cells
    ):
        raise GradspecError(f"{path}: 'cells' is not a list of name, run and labels; {remedy}")
    return record


def is_study_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a study folder (it holds study.json)."""
    return (Path(path) / STUDY_FILE).is_file()
