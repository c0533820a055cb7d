"""The report as Markdown: every table, the findings and the method, without figures."""

from __future__ import annotations

import pandas as pd

from .. import __version__
from ..analysis import SEGMENTS
from ..findings import Finding
from .context import ReportContext
from .display import display_table, mad_display

# The tables shown after the findings and the MAD, in order, with their headings; a table
# the report does not have (the training steps of a report without training runs) is left out.
TABLE_HEADINGS = {
    "steps": "Training steps",
    "step_flags": "Online flags over training steps",
    "ratio": "Ratio S_max / S_sum (mean over examples and layers)",
    "relative_difference": "Relative differences",
    "examples": "Examples",
    "skipped": "Skipped examples",
    "runs": "Runs",
    "experts": "Experts (mean over the examples routing to each; tokens per example)",
}


def table_markdown(table: pd.DataFrame) -> str:
    """A table as shown (display.py), or '_none_' when empty."""
    return display_table(table).to_markdown(index=False) if not table.empty else "_none_"


def render_markdown(
    context: ReportContext, tables: dict[str, pd.DataFrame], findings: list[Finding]
) -> str:
    """Every table of the report as Markdown."""
    parts = [
        f"# {context.title}",
        "",
        f"{len(context.runs)} runs; {context.statistic_name}; generated {context.created} "
        f"by gradspec {__version__}.",
        "",
        "## Findings of the study",
        "",
    ]
    for finding in findings:
        parts += [
            f"### {finding.number}. {finding.claim}",
            "",
            f"**{finding.summary()}**",
            "",
            finding.method,
            "",
            table_markdown(finding.table),
            "",
        ]
    parts += ["## MAD across layers", ""]
    for segment in SEGMENTS:
        parts += [f"### {segment}", "", table_markdown(mad_display(tables["mad"], segment)), ""]
    for name, heading in TABLE_HEADINGS.items():
        if name in tables:
            parts += [f"## {heading}", "", table_markdown(tables[name]), ""]
    parts += ["## Method", "", *(f"- {note}" for note in context.method_notes()), ""]
    return "\n".join(parts)
