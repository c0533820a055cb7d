"""The report: every table and figure of the study for a set of runs, in one HTML file.

:func:`write_report` loads the runs (runs.py; study folders expand to their labelled
cells), takes their tidy tables (tables.py: layer curves, MAD, relative differences,
example counts, skipped examples, manifest facts; findings.py), and renders
``report.html`` (self-contained: plotly.js is inlined, so it opens without a network),
``report.md`` with every table, and one CSV per table in ``report_tables/``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from . import __version__
from .analysis import (
    SEGMENTS,
    segment_slices,
)
from .errors import GradspecError
from .findings import Finding, evaluate_findings
from .runs import Run, load_runs, study_order
from .statistics import DERIVED_STATISTICS, REPORT_STATISTICS
from .store import now_iso
from .tables import build_tables, training_runs, twin_key

SKIPPED_SHOWN = 200  # rows of the skipped-examples table shown in the HTML; the CSV has all


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
) -> Path:
    """Write the HTML report, its Markdown twin and CSV tables; returns the HTML path.

    ``run_dirs`` are run directories or study output folders (whose cells bring their
    labels); ``labels`` maps a run directory to labels (model, task, domain, style,
    correctness, length, name) that are added to, or override, those.
    """
    if statistic not in REPORT_STATISTICS:
        raise GradspecError(f"--statistic {statistic}: use one of {', '.join(REPORT_STATISTICS)}")
    runs = load_runs(run_dirs, labels)
    out = Path(out_html)
    tables = build_tables(runs, statistic, split, n_boot, seed)
    findings = evaluate_findings(runs, n_boot, seed)
    for finding in findings:
        tables[f"finding_{finding.number}"] = finding.table
    csv_dir = out.parent / f"{out.stem}_tables"
    csv_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        if not is_empty_training_table(name, table):
            table.to_csv(csv_dir / f"{name}.csv", index=False)
    context = ReportContext(title, runs, statistic, split, n_boot, seed)
    out.with_suffix(".md").write_text(render_markdown(context, tables, findings))
    out.write_text(render_html(context, tables, findings))
    return out


# ---------------------------------------------------------------- display


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for reading: 'x [low, high]' where a column has its interval, 4 digits."""
    shown = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column.endswith(("_low", "_high")) and column.rsplit("_", 1)[0] in table.columns:
            continue
        values = table[column]
        if f"{column}_low" in table.columns:
            shown[column] = [
                f"{format_number(v)} [{format_number(lo)}, {format_number(hi)}]"
                for v, lo, hi in zip(
                    values, table[f"{column}_low"], table[f"{column}_high"], strict=True
                )
            ]
        elif pd.api.types.is_float_dtype(values):
            shown[column] = values.map(format_number)
        else:
            shown[column] = values.astype(object).where(values.notna(), "")
    return shown


def format_number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.4g}"


def mad_display(mad: pd.DataFrame, segment: str) -> pd.DataFrame:
    """Runs x modules table of one part's MAD with its interval."""
    part = display_table(mad[mad["segment"] == segment])
    wide = part.pivot(index="run", columns="module", values="mad")
    runs = list(dict.fromkeys(part["run"]))
    modules = list(dict.fromkeys(part["module"]))
    return wide.loc[runs, modules].reset_index().fillna("")


class ReportContext:
    """What the report is about: title, runs and analysis settings."""

    def __init__(
        self, title: str, runs: Sequence[Run], statistic: str, split: str, n_boot: int, seed: int
    ):
        self.title, self.runs, self.statistic = title, list(runs), statistic
        self.split, self.n_boot, self.seed = split, n_boot, seed
        self.created = now_iso()

    @property
    def statistic_name(self) -> str:
        return DERIVED_STATISTICS.get(self.statistic, self.statistic.replace("_", " "))

    def method_notes(self) -> list[str]:
        """Definitions, the layer split for each depth in the report, pairing and CIs."""
        depths = sorted(
            {
                int(run.tables.spectra["layer"].max()) + 1
                for run in self.runs
                if not run.tables.spectra.empty
            }
        )
        splits = "; ".join(
            f"{d} layers: "
            + ", ".join(
                f"{name} {s.start}–{s.stop - 1}"
                for name, s in segment_slices(d, self.split).items()
                if name != "all" and s.stop > s.start
            )
            for d in depths
        )
        return [
            f"Curves: mean over examples of the {self.statistic_name} at each layer; examples "
            "with a non-finite value are dropped and counted (examples table).",
            "MAD: mean over consecutive layers of |v[l+1] − v[l]| of a curve. Early, middle "
            "and late MADs use only the layer pairs inside each part (as the study), so the "
            f"pairs across a boundary count only in 'all'. Split rule '{self.split}': "
            f"{splits or 'no runs'}.",
            "Relative difference (rd) of an irrelevant run from its correct twin: mean over "
            "layers of |a − b| / |a| between their curves (a: correct). The runs are paired "
            "by example_index, i.e. both data files must list the same instructions in the "
            "same order, as the shared study data do.",
            "Uncertainty: 95% basic (reverse-percentile) bootstrap intervals over examples "
            f"({self.n_boot} "
            f"replicates, seed {self.seed}); paired runs are resampled together. p-values: "
            f"paired permutation tests ({self.n_boot} random swaps of the two runs' values "
            "per example) on the module-mean relative difference. Basic intervals correct for "
            "the upward bias of MAD and relative differences on few examples, so when two "
            "runs barely differ the interval can lie below the study's (biased) estimate; "
            "intervals of quantities that cannot be negative are cut at zero.",
            "Findings use the nuclear norm whatever statistic the curves show.",
            *(
                [
                    "Training runs (the monitor's): one row per profiled occurrence of an "
                    "example, so a layer curve averages every profiled step. Over steps: mean "
                    "and 10th-90th percentile of the statistic over the step's (example, "
                    "matrix) values of each layer kind; flagged fraction: examples whose "
                    "online flag score exceeds the run's threshold, over those scored."
                ]
                if training_runs(self.runs)
                else []
            ),
        ]


def curve_figures(
    runs: Sequence[Run], curves: pd.DataFrame, statistic_name: str
) -> list[tuple[str, go.Figure]]:
    """One figure per (model, task): a panel per module, a line and CI band per run."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = " / ".join(str(run.labels[k]) for k in ("model", "task") if k in run.labels)
        groups.setdefault(key or "all runs", []).append(run)
    figures = []
    for key, members in groups.items():
        modules = study_order(m for run in members for m in run.modules())
        columns = min(4, len(modules))
        rows = -(-len(modules) // columns)
        figure = make_subplots(
            rows=rows,
            cols=columns,
            subplot_titles=modules,
            horizontal_spacing=0.06,
            vertical_spacing=0.12,
        )
        traces, rows_, cols_ = [], [], []
        twins: dict[tuple, int] = {}  # runs differing only in correctness share a colour
        for run in members:
            twin = twins.setdefault(twin_key(run), len(twins))
            color = qualitative.Plotly[twin % len(qualitative.Plotly)]
            dash = "dot" if run.labels.get("correctness") == "irrelevant" else "solid"
            for j, module in enumerate(modules):
                data = curves[(curves["run"] == run.name) & (curves["module"] == module)]
                if data.empty:
                    continue
                traces += line_with_band(
                    data["layer"],
                    data[["mean", "mean_low", "mean_high"]],
                    name=run.name,
                    color=color,
                    dash=dash,
                    showlegend=j == 0,
                    x_label="layer",
                )
                rows_ += [j // columns + 1] * 2
                cols_ += [j % columns + 1] * 2
        figure.add_traces(traces, rows=rows_, cols=cols_)
        figure.update_layout(
            height=260 * rows + 120,
            margin=dict(l=50, r=20, t=60, b=40),
            legend=dict(orientation="h", y=-0.08),
            template="plotly_white",
            title=dict(text=f"{statistic_name} per layer — {key}", x=0.01),
        )
        depth = int(curves.loc[curves["run"].isin([r.name for r in members]), "layer"].max()) + 1
        figure.update_xaxes(title_text="layer", title_standoff=4, dtick=max(1, -(-depth // 8)))
        figures.append((key, figure))
    return figures


def step_figure(
    runs: Sequence[Run], steps: pd.DataFrame, flags: pd.DataFrame, statistic_name: str
) -> go.Figure:
    """The training runs over optimizer steps: a panel per layer kind (mean line, 10th-90th
    percentile band), and one of the online flag's flagged fraction; a colour per run."""
    kinds = list(dict.fromkeys(sorted(steps["kind"])))
    panels = [f"{statistic_name}: {kind}" for kind in kinds] + ["flagged fraction (online)"]
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=panels, horizontal_spacing=0.06)
    names = [run.name for run in runs if run.name in set(steps["run"])]
    for i, name in enumerate(names):
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        for j, kind in enumerate(kinds):
            data = steps[(steps["run"] == name) & (steps["kind"] == kind)]
            figure.add_traces(
                line_with_band(
                    data["step"],
                    data[["mean", "p10", "p90"]],
                    name=name,
                    color=color,
                    showlegend=j == 0,
                    x_label="step",
                ),
                rows=1,
                cols=j + 1,
            )
        data = flags[flags["run"] == name]
        figure.add_trace(
            go.Scatter(
                x=data["step"],
                y=data["flagged_frac"],
                mode="lines+markers",
                name=name,
                line=dict(color=color, width=2),
                legendgroup=name,
                showlegend=False,
                hovertemplate=f"{html.escape(name)}<br>step %{{x}}: %{{y:.3g}}<extra></extra>",
            ),
            row=1,
            col=len(panels),
        )
    figure.update_layout(
        height=380,
        margin=dict(l=50, r=20, t=60, b=40),
        legend=dict(orientation="h", y=-0.2),
        template="plotly_white",
        title=dict(text=f"{statistic_name} over training steps", x=0.01),
    )
    figure.update_xaxes(title_text="optimizer step", title_standoff=4)
    return figure


def line_with_band(
    x: pd.Series,
    values: pd.DataFrame,
    *,
    name: str,
    color: str,
    showlegend: bool,
    x_label: str,
    dash: str = "solid",
) -> list[go.Scatter]:
    """A line through ``values``' first column and a shaded band between its other two
    (low, high); hovering shows 'name, x_label x: value [low, high]'."""
    line, low, high = (values.iloc[:, i].to_numpy(dtype=float) for i in range(3))
    x = np.asarray(x)
    return [
        go.Scatter(
            x=np.concatenate([x, x[::-1]]),
            y=np.concatenate([high, low[::-1]]),
            mode="lines",
            fill="toself",
            fillcolor=_transparent(color),
            line=dict(width=0),
            hoverinfo="skip",
            showlegend=False,
            legendgroup=name,
        ),
        go.Scatter(
            x=x,
            y=line,
            mode="lines",
            name=name,
            line=dict(color=color, dash=dash, width=2),
            legendgroup=name,
            showlegend=showlegend,
            customdata=np.column_stack([low, high]),
            hovertemplate=f"{html.escape(name)}<br>{x_label} %{{x}}: %{{y:.4g}} "
            "[%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra></extra>",
        ),
    ]


def _transparent(hex_color: str, alpha: float = 0.18) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


# ---------------------------------------------------------------- writing


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


def _html_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "<p><em>none</em></p>"
    return display_table(table).to_html(index=False, border=0, escape=True)


def render_html(
    context: ReportContext, tables: dict[str, pd.DataFrame], findings: list[Finding]
) -> str:
    """The self-contained report page."""
    esc = html.escape
    training = not tables["steps"].empty
    sections = [
        ("findings", "Findings of the study"),
        *([("steps", "Training steps")] if training else []),
        ("curves", "Layer curves"),
        ("mad", "MAD across layers"),
        ("rd", "Relative differences"),
        ("examples", "Examples"),
        ("runs", "Runs"),
        ("method", "Method"),
    ]
    body = [
        f"<h1>{esc(context.title)}</h1>",
        f"<p class='meta'>{len(context.runs)} runs · curves of the "
        f"{esc(context.statistic_name)} · generated {context.created} by gradspec "
        f"{__version__}</p>",
        "<nav>" + "".join(f"<a href='#{a}'>{t}</a>" for a, t in sections) + "</nav>",
    ]
    body.append("<h2 id='findings'>Findings of the study (arXiv:2410.23743)</h2>")
    for finding in findings:
        css = {"holds": "holds", "does not hold": "not"}.get(finding.status(), "open")
        body += [
            f"<h3>{finding.number}. {esc(finding.claim)}</h3>",
            f"<p class='verdict {css}'>{esc(finding.summary())}</p>",
            f"<p class='method'>{esc(finding.method)}</p>",
            _html_table(finding.table),
        ]
    config = {"displaylogo": False, "responsive": True}
    if training:
        figure = step_figure(
            context.runs, tables["steps"], tables["step_flags"], context.statistic_name
        )
        body += [
            "<h2 id='steps'>Training steps</h2><p class='method'>Training runs (the monitor's) "
            "at each profiled optimizer step: lines, mean over the step's (example, matrix) "
            "values of each layer kind; bands, 10th to 90th percentile; last panel, the share "
            "of the step's scored examples the online flag flagged.</p>",
            "<div class='plot'>"
            + figure.to_html(full_html=False, include_plotlyjs=False, config=config)
            + "</div>",
            _html_table(tables["step_flags"]),
        ]
    body.append(
        "<h2 id='curves'>Layer curves</h2><p class='method'>Lines: mean over examples; "
        "bands: 95% bootstrap intervals; dotted: irrelevant responses. Click a legend "
        "entry to hide a run.</p>"
    )
    for _, figure in curve_figures(context.runs, tables["curves"], context.statistic_name):
        body.append(
            "<div class='plot'>"
            + figure.to_html(full_html=False, include_plotlyjs=False, config=config)
            + "</div>"
        )
    body.append("<h2 id='mad'>MAD across layers</h2>")
    for segment in SEGMENTS:
        body += [
            f"<h3>{segment}</h3>",
            _html_table(mad_display(tables["mad"], segment))
            if not tables["mad"].empty
            else _html_table(tables["mad"]),
        ]
    body += [
        "<h2 id='rd'>Relative differences (irrelevant vs correct)</h2>",
        _html_table(tables["relative_difference"])
        if not tables["relative_difference"].empty
        else "<p><em>No pair of runs differing only in correctness; label runs "
        "correctness=correct / irrelevant to get one.</em></p>",
        "<h2 id='examples'>Examples</h2>",
        _html_table(tables["examples"]),
        "<h3>Skipped examples</h3>",
        _html_table(tables["skipped"].head(SKIPPED_SHOWN)),
    ]
    if len(tables["skipped"]) > SKIPPED_SHOWN:
        body.append(
            f"<p class='method'>First {SKIPPED_SHOWN} of {len(tables['skipped'])}; "
            "all are in skipped.csv.</p>"
        )
    body += [
        "<h2 id='runs'>Runs</h2>",
        _html_table(tables["runs"]),
        "<h2 id='method'>Method</h2><ul class='method'>"
        + "".join(f"<li>{esc(note)}</li>" for note in context.method_notes())
        + "</ul>",
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(context.title)}</title><style>{CSS}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>" + "\n".join(body) + "</body></html>\n"
    )


TRAINING_TABLES = ("steps", "step_flags")


def is_empty_training_table(name: str, table: pd.DataFrame) -> bool:
    """A training-steps table of runs that are not training runs: left out of the report."""
    return name in TRAINING_TABLES and table.empty


def render_markdown(
    context: ReportContext, tables: dict[str, pd.DataFrame], findings: list[Finding]
) -> str:
    """Every table of the report as Markdown."""

    def md(table: pd.DataFrame) -> str:
        return display_table(table).to_markdown(index=False) if not table.empty else "_none_"

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
            md(finding.table),
            "",
        ]
    parts += ["## MAD across layers", ""]
    for segment in SEGMENTS:
        mad_table_ = (
            mad_display(tables["mad"], segment) if not tables["mad"].empty else tables["mad"]
        )
        parts += [f"### {segment}", "", md(mad_table_), ""]
    for name, heading in (
        ("steps", "Training steps"),
        ("step_flags", "Online flags over training steps"),
        ("relative_difference", "Relative differences"),
        ("examples", "Examples"),
        ("skipped", "Skipped examples"),
        ("runs", "Runs"),
    ):
        if is_empty_training_table(name, tables[name]):
            continue
        parts += [f"## {heading}", "", md(tables[name]), ""]
    parts += ["## Method", "", *(f"- {note}" for note in context.method_notes()), ""]
    return "\n".join(parts)
