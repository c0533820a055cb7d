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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import GradspecError
from ..findings import MATRIX_SETS, evaluate_findings
from ..runs import load_runs, recorded_finding_modules
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
    runs = load_runs(run_dirs, labels)
    out = Path(out_html)
    tables = build_tables(runs, statistic, split, n_boot, seed, out.parent)
    chosen = tuple(finding_modules) or recorded_finding_modules(run_dirs)
    findings = evaluate_findings(runs, n_boot, seed, {"chosen": chosen} if chosen else MATRIX_SETS)
    for finding in findings:
        tables[f"finding_{finding.number}"] = finding.table
    csv_dir = out.parent / f"{out.stem}_tables"
    csv_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(csv_dir / f"{name}.csv", index=False)
    context = ReportContext(title, runs, statistic, split, n_boot, seed)
    out.with_suffix(".md").write_text(render_markdown(context, tables, findings))
    out.write_text(render_html(context, tables, findings))
    return out
