"""Training runs in the report: everything the report does only for the monitor's runs.

A training run (written by the monitor of ``integrations/transformers.py``; its manifest's
kind is ``store.TRAINING_RUN``) has one row per profiled occurrence of an example, with its
optimizer ``step``, and the online ``flag_score`` of each occurrence. The report adds, only
when some run is one, the tables over steps below (:func:`training_tables`), the figure
over steps (``figures.step_figure``), their section and a note in the method; other runs'
reports have none of these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..analysis import statistic_values
from ..runs import Run
from ..store import is_training_run

STEP_BAND = (0.1, 0.9)  # curves over training steps: the band from the 10th to the 90th percentile
STEP_TABLES = ("steps", "step_flags")
METHOD_NOTE = (
    "Training runs (the monitor's): one row per profiled occurrence of an example, so a "
    "layer curve averages every profiled step. Over steps: mean and 10th-90th percentile "
    "of the statistic over the step's (example, matrix) values of each layer kind; flagged "
    "fraction: examples whose online flag score exceeds the run's threshold, over those "
    "scored."
)
SECTION_NOTE = (
    "Training runs (the monitor's) at each profiled optimizer step: lines, mean over the "
    "step's (example, matrix) values of each layer kind; bands, 10th to 90th percentile; "
    "last panel, the share of the step's scored examples the online flag flagged."
)


def training_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs a training monitor wrote (their rows carry the optimizer step)."""
    return [run for run in runs if is_training_run(run.tables.manifest)]


def has_training_runs(tables: dict[str, pd.DataFrame]) -> bool:
    """Whether the report's tables include the training runs' tables over steps."""
    return all(name in tables for name in STEP_TABLES)


def training_tables(runs: Sequence[Run], statistic: str) -> dict[str, pd.DataFrame]:
    """The tables over optimizer steps, or none when no run is a training run."""
    training = training_runs(runs)
    if not training:
        return {}
    return {"steps": step_table(training, statistic), "step_flags": step_flag_table(training)}


def step_table(runs: Sequence[Run], statistic: str) -> pd.DataFrame:
    """Per training run, optimizer step and layer kind: the mean, 10th and 90th percentile
    of the statistic over the step's (example, matrix) values (the monitor's logged
    aggregates are over the same values); non-finite values are left out."""
    frames = []
    for run in runs:
        spectra = run.tables.spectra
        values = pd.DataFrame(
            {
                "step": spectra["step"],
                "kind": spectra["kind"],
                "example_index": spectra["example_index"],
                "value": statistic_values(run.tables, statistic),
            }
        )
        by_step = values[np.isfinite(values["value"])].groupby(["step", "kind"])
        low, high = (by_step["value"].quantile(q) for q in STEP_BAND)
        table = pd.DataFrame(
            {
                "examples": by_step["example_index"].nunique(),
                "mean": by_step["value"].mean(),
                "p10": low,
                "p90": high,
            }
        )
        frames.append(table.reset_index().assign(run=run.name))
    return stacked(frames, ["run", "step", "kind", "examples", "mean", "p10", "p90"])


def step_flag_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Per training run and optimizer step: the profiled examples, those the online flag
    scored (its window was full enough), those it flagged (score above the run's
    threshold), and the flagged fraction of the scored ones (NaN when none was scored)."""
    frames = []
    for run in runs:
        examples = run.tables.examples
        threshold = run.tables.manifest["monitor"]["threshold"]
        marks = pd.DataFrame(
            {
                "step": examples["step"],
                "scored": examples["flag_score"].notna(),
                "flagged": examples["flag_score"] > threshold,
            }
        )
        table = marks.groupby("step").agg(
            examples=("scored", "size"), scored=("scored", "sum"), flagged=("flagged", "sum")
        )
        table["flagged_frac"] = table["flagged"] / table["scored"].where(table["scored"] > 0)
        frames.append(table.reset_index().assign(run=run.name))
    return stacked(frames, ["run", "step", "examples", "scored", "flagged", "flagged_frac"])


def stacked(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The frames one under another with ``columns``; an empty table of them if none."""
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]
