"""The report's figures: one function per figure, each from the report's tables.

Each function takes the labelled runs and the tidy tables it draws (tables.py,
training.py) and returns plotly figures; the HTML renderer places them in their section
(``html.py``). A new figure is one function here and one call in its section there.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..runs import Run, study_order
from .tables import twin_key


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


def expert_heatmaps(experts: pd.DataFrame, statistic_name: str) -> list[tuple[str, go.Figure]]:
    """One figure per run of a mixture-of-experts model: a layer x expert heat map per
    expert matrix of the statistic's mean over the examples that routed to the expert."""
    figures = []
    for run, table in experts.groupby("run", sort=False):
        modules = study_order(table["module"])
        figure = make_subplots(rows=1, cols=len(modules), subplot_titles=modules)
        for j, module in enumerate(modules, start=1):
            grid = table[table["module"] == module].pivot(
                index="layer", columns="expert", values="mean"
            )
            figure.add_trace(
                go.Heatmap(
                    z=grid.to_numpy(),
                    x=grid.columns,
                    y=grid.index,
                    coloraxis="coloraxis",
                    hovertemplate="layer %{y}, expert %{x}: %{z:.4g}<extra></extra>",
                ),
                row=1,
                col=j,
            )
            figure.update_xaxes(title_text="expert", row=1, col=j)
        figure.update_yaxes(title_text="layer", row=1, col=1)
        figure.update_layout(
            title=f"{html.escape(str(run))}: {statistic_name} per expert",
            coloraxis={"colorscale": "Viridis"},
            height=420,
        )
        figures.append((str(run), figure))
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


PAPER_MODULES = {"q_proj": "Q", "k_proj": "K", "v_proj": "V", "o_proj": "O"}
PAPER_COLORS = {"q_proj": "red", "k_proj": "green", "v_proj": "blue", "o_proj": "gray"}
STYLE_TITLES = {"none": "None CoT", "simplified": "Simplified CoT", "detailed": "Detailed CoT"}


def paper_figures(
    runs: Sequence[Run], curves: pd.DataFrame, ratio_curves: pd.DataFrame
) -> list[tuple[str, go.Figure]]:
    """arXiv:2410.23743's figures: per (model, task, correctness) a column per response
    style (or knowledge length) with the nuclear-norm curves of Q, K, V, O over layers, and
    below them the S_max / S_sum ratio of Q, K and of V, O (the paper's ``include_ratio``)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(run.labels.get(k) for k in ("model", "task", "correctness"))
        groups.setdefault(key, []).append(run)
    figures = []
    for key, members in groups.items():
        members = sorted(members, key=_paper_column_order)
        figure = make_subplots(
            rows=3,
            cols=len(members),
            subplot_titles=[
                f"{_paper_column_title(run)} | {row}"
                for row in ("Nuclear norm", "Ratio (Q, K)", "Ratio (V, O)")
                for run in members
            ],
            vertical_spacing=0.08,
        )
        for col, run in enumerate(members, start=1):
            for module, letter in PAPER_MODULES.items():
                ratio_row = 2 if letter in "QK" else 3
                for row, table in ((1, curves), (ratio_row, ratio_curves)):
                    data = table[(table["run"] == run.name) & (table["module"] == module)]
                    if data.empty:
                        continue
                    figure.add_trace(
                        go.Scatter(
                            x=data["layer"],
                            y=data["mean"],
                            mode="lines",
                            name=f"Proj_{letter}",
                            legendgroup=letter,
                            showlegend=col == 1 and row == 1,
                            line=dict(color=PAPER_COLORS[module]),
                        ),
                        row=row,
                        col=col,
                    )
        title = " / ".join(str(part) for part in key if part is not None)
        figure.update_layout(
            height=780,
            width=max(520, 380 * len(members)),
            template="plotly_white",
            margin=dict(l=50, r=20, t=70, b=40),
            title=dict(text=f"Paper's layout — {title}", x=0.01),
        )
        figure.update_xaxes(title_text="layer", title_standoff=2)
        figures.append((title, figure))
    return figures


def _paper_column_order(run: Run) -> tuple:
    """Fast to slow thinking, or short to long knowledge responses."""
    styles = list(STYLE_TITLES)
    style = run.labels.get("style")
    return (styles.index(style) if style in styles else len(styles), run.labels.get("length", 0))


def _paper_column_title(run: Run) -> str:
    """The column's response style or knowledge length, as the paper titles its panels."""
    if run.labels.get("style") in STYLE_TITLES:
        return STYLE_TITLES[run.labels["style"]]
    return f"Length {run.labels['length']}" if "length" in run.labels else run.name
