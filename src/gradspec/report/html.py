"""The report as one self-contained HTML page (plotly.js inlined: it opens offline).

The page is a list of sections, each drawn by one function from the report's tables and
figures (figures.py). A new figure goes into its section function with :func:`plot`; a
new section is one function and one entry in :func:`sections`.
"""

from __future__ import annotations

import html
from collections.abc import Callable

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .. import __version__
from ..analysis import SEGMENTS
from ..findings import Finding
from .context import ReportContext
from .display import display_table, mad_display
from .figures import curve_figures, expert_heatmaps, paper_figures, step_figure
from .training import SECTION_NOTE, has_training_runs

SKIPPED_SHOWN = 200  # rows of the skipped-examples table shown in the HTML; the CSV has all
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;
padding:16px 28px;color:#1f2328;line-height:1.45}
h1{margin-bottom:4px} h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
.meta,.method{color:#57606a;font-size:0.92em}
table{border-collapse:collapse;font-size:0.85em;margin:8px 0 16px;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f6f8fa} td:first-child,th:first-child{text-align:left}
.verdict{font-weight:600;padding:6px 10px;border-radius:6px;display:inline-block}
.holds{background:#dafbe1} .not{background:#ffebe9} .open{background:#fff8c5}
nav a{margin-right:14px} .plot{margin-bottom:24px}
"""

Tables = dict[str, pd.DataFrame]
Section = Callable[[ReportContext, Tables, list[Finding]], list[str]]
esc = html.escape


def render_html(context: ReportContext, tables: Tables, findings: list[Finding]) -> str:
    """The self-contained report page: a header, a navigation bar and every section."""
    chosen = sections(tables)
    body = [
        f"<h1>{esc(context.title)}</h1>",
        f"<p class='meta'>{len(context.runs)} runs · curves of the "
        f"{esc(context.statistic_name)} · generated {context.created} by gradspec "
        f"{__version__}</p>",
        "<nav>" + "".join(f"<a href='#{a}'>{t}</a>" for a, t, _ in chosen) + "</nav>",
    ]
    for _, _, section in chosen:
        body += section(context, tables, findings)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(context.title)}</title><style>{CSS}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>" + "\n".join(body) + "</body></html>\n"
    )


def sections(tables: Tables) -> list[tuple[str, str, Section]]:
    """(anchor, navigation title, section) in page order; training steps only with
    training runs."""
    return [
        ("findings", "Findings of the study", findings_section),
        ("paper", "Paper's figures", paper_section),
        *([("steps", "Training steps", steps_section)] if has_training_runs(tables) else []),
        ("curves", "Layer curves", curves_section),
        *([("experts", "Experts", experts_section)] if "experts" in tables else []),
        ("mad", "MAD across layers", mad_section),
        ("rd", "Relative differences", relative_difference_section),
        ("examples", "Examples", examples_section),
        ("runs", "Runs", runs_section),
        ("method", "Method", method_section),
    ]


def table_html(table: pd.DataFrame) -> str:
    """A table as shown (display.py), or 'none' when empty."""
    if table.empty:
        return "<p><em>none</em></p>"
    return display_table(table).to_html(index=False, border=0, escape=True)


def plot(figure: go.Figure) -> str:
    """A figure's div; plotly.js itself is inlined once in the page's head."""
    html_ = figure.to_html(full_html=False, include_plotlyjs=False, config=PLOTLY_CONFIG)
    return f"<div class='plot'>{html_}</div>"


def findings_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """Each finding: its claim, verdict, method and table."""
    body = ["<h2 id='findings'>Findings of the study (arXiv:2410.23743)</h2>"]
    for finding in findings:
        css = {"holds": "holds", "contradicted": "not"}.get(finding.status(), "open")
        body += [
            f"<h3>{finding.number}. {esc(finding.claim)}</h3>",
            f"<p class='verdict {css}'>{esc(finding.summary())}</p>",
            f"<p class='method'>{esc(finding.method)}</p>",
            table_html(finding.table),
        ]
    return body


def steps_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """The training runs over optimizer steps: the figure and the online flags."""
    figure = step_figure(
        context.runs, tables["steps"], tables["step_flags"], context.statistic_name
    )
    return [
        f"<h2 id='steps'>Training steps</h2><p class='method'>{SECTION_NOTE}</p>",
        plot(figure),
        table_html(tables["step_flags"]),
    ]


def paper_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """The paper's figures: Q, K, V, O nuclear norms and ratios per response style."""
    figures = paper_figures(context.runs, tables["curves"], tables["ratio_curves"])
    return [
        "<h2 id='paper'>Figures in the paper's layout</h2><p class='method'>As "
        f"arXiv:2410.23743 draws them: mean curves of the {esc(context.statistic_name)} "
        "(top) and of S_max / S_sum (below) of Q, K, V, O over layers; one column per "
        "response style or knowledge length, one figure per task and correctness.</p>",
        *(plot(figure) for _, figure in figures),
        "<h3>S_max / S_sum, mean over examples and layers</h3>",
        table_html(tables["ratio"]),
    ]


def curves_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """One figure of layer curves per (model, task)."""
    figures = curve_figures(context.runs, tables["curves"], context.statistic_name)
    return [
        "<h2 id='curves'>Layer curves</h2><p class='method'>Lines: mean over examples; "
        "bands: 95% bootstrap intervals; dotted: irrelevant responses. Click a legend "
        "entry to hide a run.</p>",
        *(plot(figure) for _, figure in figures),
    ]


def experts_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """Per-expert heat maps (layer x expert) of runs of mixture-of-experts models."""
    figures = expert_heatmaps(tables["experts"], context.statistic_name)
    return [
        "<h2 id='experts'>Experts</h2><p class='method'>Routed experts: the mean over the "
        "examples that routed tokens to an expert (the curves, MAD, findings and scores "
        "pool each layer's experts: per example, the mean over the experts that received "
        "its tokens). Tokens per expert and example are in experts.csv.</p>",
        *(plot(figure) for _, figure in figures),
    ]


def mad_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """A runs x modules MAD table per part of the layers."""
    body = ["<h2 id='mad'>MAD across layers</h2>"]
    for segment in SEGMENTS:
        body += [f"<h3>{segment}</h3>", table_html(mad_display(tables["mad"], segment))]
    return body


def relative_difference_section(
    context: ReportContext, tables: Tables, findings: list[Finding]
) -> list[str]:
    """Every irrelevant run against its correct twin, or how to label runs to get one."""
    table = tables["relative_difference"]
    return [
        "<h2 id='rd'>Relative differences (irrelevant vs correct)</h2>",
        table_html(table)
        if not table.empty
        else "<p><em>No pair of runs differing only in correctness; label runs "
        "correctness=correct / irrelevant to get one.</em></p>",
    ]


def examples_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """Example counts per run and the first skipped examples."""
    skipped = tables["skipped"]
    body = [
        "<h2 id='examples'>Examples</h2>",
        table_html(tables["examples"]),
        "<h3>Skipped examples</h3>",
        table_html(skipped.head(SKIPPED_SHOWN)),
    ]
    if len(skipped) > SKIPPED_SHOWN:
        body.append(
            f"<p class='method'>First {SKIPPED_SHOWN} of {len(skipped)}; "
            "all are in skipped.csv.</p>"
        )
    return body


def runs_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """Each run's manifest facts."""
    return ["<h2 id='runs'>Runs</h2>", table_html(tables["runs"])]


def method_section(context: ReportContext, tables: Tables, findings: list[Finding]) -> list[str]:
    """Definitions, the layer split, pairing and intervals."""
    notes = "".join(f"<li>{esc(note)}</li>" for note in context.method_notes())
    return [f"<h2 id='method'>Method</h2><ul class='method'>{notes}</ul>"]
