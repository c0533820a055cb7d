"""The report: every table and figure of the study for a set of runs, in one HTML file.

:func:`write_report` loads the runs (runs.py; study folders expand to their labelled
cells), computes the report in parts and writes it:

- ``tables.py``: the tidy tables (layer curves, MAD, relative differences, example
  counts, skipped examples, manifest facts); ``findings.py`` adds one per finding;
- ``training.py``: what the report does only for training runs (the monitor's): the
  tables over optimizer steps and their notes;
- ``figures.py``: the plotly figures, one function per figure;
- ``html.py``: ``report.html``, self-contained (plotly.js is inlined, so it opens
  without a network); ``markdown.py``: ``report.md`` with every table; ``display.py``:
  how both show a number or an interval; ``context.py``: title, runs, settings, method.

Every table is also written as ``<report>_tables/<name>.csv``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import GradspecError, GradspecWarning
from ..files import atomic_path, refuse_unsafe_output, write_text_atomic
from ..findings import MATRIX_SETS, evaluate_findings
from ..runs import Run, load_runs, recorded_finding_modules
from ..statistics import REPORT_STATISTICS
from .context import ReportContext
from .html import render_html
from .markdown import render_markdown
from .tables import build_tables

__all__ = ["write_report"]


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out_html: str | os.PathLike,
    labels: Mapping[str | os.PathLike, Mapping[str, Any]] | None = None,
    *,
    statistic: str = "nuclear_norm",
    split: str = "thirds",
    n_boot: int = 2000,
    seed: int = 0,
    title: str = "gradspec report",
    finding_modules: Sequence[str] = (),
) -> Path:
    """Write the HTML report, its Markdown twin and CSV tables; returns the HTML path.

    ``run_dirs`` are run directories or study output folders (whose cells bring their
    labels); ``labels`` maps a run directory to labels (model, task, domain, style,
    correctness, length, name) that are added to, or override, those.
    ``finding_modules`` decide the findings (default: what a study folder's file named,
    else q, k, v, o with the MLP matrices beside them).
    """
    if statistic not in REPORT_STATISTICS:
        raise GradspecError(f"--statistic {statistic}: use one of {', '.join(REPORT_STATISTICS)}")
    out = refuse_unsafe_output(out_html, [], "--out")
    runs = with_profiled_examples(load_runs(run_dirs, labels))
    tables = build_tables(runs, statistic, split, n_boot, seed, out.parent)
    chosen = tuple(finding_modules) or recorded_finding_modules(run_dirs)
    findings = evaluate_findings(runs, n_boot, seed, {"chosen": chosen} if chosen else MATRIX_SETS)
    for finding in findings:
        tables[f"finding_{finding.number}"] = finding.table
    context = ReportContext(title, runs, statistic, split, n_boot, seed)
    markdown = render_markdown(context, tables, findings)
    page = render_html(context, tables, findings)
    csv_dir = out.parent / f"{out.stem}_tables"
    for name, table in tables.items():
        with atomic_path(csv_dir / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
    write_text_atomic(out.with_suffix(".md"), markdown)
    write_text_atomic(out, page)
    return out


def with_profiled_examples(runs: list[Run]) -> list[Run]:
    """The runs that have spectra rows; the others are left out with a warning (all of them
    empty: an error), since a run with no profiled example has no curve to draw."""
    empty = [run.name for run in runs if run.tables.spectra.empty]
    if len(empty) == len(runs):
        raise GradspecError(
            f"{', '.join(empty)}: no profiled examples (every example skipped, or no data); "
            "nothing to report"
        )
    if empty:
        warnings.warn(
            f"left out of the report, having no profiled examples: {', '.join(empty)}",
            GradspecWarning,
            stacklevel=2,
        )
    return [run for run in runs if not run.tables.spectra.empty]
