"""`gradspec demo`: the study's design on one task, on the embedded default model.

The demo trains (once) the embedded default model, then profiles, as a study grid, the
first examples of gsm8k answered without a rationale, with the dataset's short rationale
and with a long step-by-step one (the study's None, Simplified and Detailed CoT), each with
correct and with irrelevant responses, and popular Wikipedia knowledge with short and long
responses. It prints per style the mean gradient nuclear norm of each module, the mean loss
and the mean response length, and writes the HTML report with the study's findings.
Cells are ordinary resumable run directories under ``runs/demo/runs/default/<label>/``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from .default_model import (
    DEFAULT_RECIPE,
    TRAINING_REPORT,
    Progress,
    ensure_default_model,
    is_trained_from,
)
from .errors import GradspecError
from .labels import normalize_labels
from .paths import default_model_dir, project_root, shared_data_dir
from .report import write_report
from .runs import study_order
from .store import RunTables, load_run
from .study import Cell, DatasetSpec, ModelSpec, Study, run_study

ProgressBar = Callable[..., AbstractContextManager[Progress]]
DEMO_LIMIT = 50
MODEL_LABEL = "default"
stderr = Console(stderr=True)


@dataclass(frozen=True)
class RunSpec:
    """One demo cell: its label, its data file (relative to the shared data), its labels."""

    label: str
    data: str
    labels: tuple[tuple[str, Any], ...]
    title: str = ""  # set for the runs summarised in the terminal


def _reasoning(style: str, suffix: str, title: str) -> list[RunSpec]:
    return [
        RunSpec(
            f"gsm8k-{style}-{correctness}",
            f"reasoning_cot/{correctness}/gsm8k_{suffix}.json",
            (("task", "gsm8k"), ("style", style), ("correctness", correctness)),
            title if correctness == "correct" else "",
        )
        for correctness in ("correct", "irrelevant")
    ]


def _knowledge(length: int) -> list[RunSpec]:
    return [
        RunSpec(
            f"wiki-{length}-{correctness}",
            f"wiki_knowledge/{correctness}/popular_wikipedia_{length}.json",
            (("task", "wiki_popular"), ("length", length), ("correctness", correctness)),
        )
        for correctness in ("correct", "irrelevant")
    ]


DEMO_RUNS = (
    *_reasoning("none", "no_cot", "None CoT"),
    *_reasoning("simplified", "with_cot", "Simplified CoT"),
    *_reasoning("detailed", "with_cot_gpt4o", "Detailed CoT"),
    *_knowledge(100),
    *_knowledge(1000),
)


def demo_root() -> Path:
    """The demo's study folder: ``<project>/runs/demo``."""
    return project_root() / "runs" / "demo"


def demo_study(model_dir: Path, limit: int) -> Study:
    """The demo grid as a study: the default model on every :data:`DEMO_RUNS` data file."""
    data_dir = shared_data_dir()
    datasets = [
        DatasetSpec(
            spec.label, data_dir / spec.data, normalize_labels(dict(spec.labels), spec.label)
        )
        for spec in DEMO_RUNS
    ]
    return Study(
        data_dir,
        "gradspec demo: fast vs slow thinking on the default model",
        [ModelSpec(MODEL_LABEL, model_dir)],
        datasets,
        {"limit": limit},
    )


def run_demo_study(progress_bar: ProgressBar, limit: int = DEMO_LIMIT) -> dict[RunSpec, Path]:
    """Ensure the default model, then profile every demo cell (resuming finished ones).

    Returns each spec's run directory. A demo folder left by other inputs (another model
    recipe or gradspec version), whose runs the engine refuses to mix, is redone.
    """
    study = demo_study(trained_default_model(progress_bar), limit)
    root = demo_root()

    def progress(cell: Cell) -> AbstractContextManager[Callable[[int, int], None]]:
        return progress_bar(f"profiling {cell.dataset.label}")

    try:
        run_study(study, root, device="cpu", progress=progress)
    except GradspecError as exc:
        if not root.is_dir():
            raise
        stderr.print(f"[yellow]redoing the demo runs:[/] {exc}", highlight=False)
        shutil.rmtree(root)
        run_study(study, root, device="cpu", progress=progress)
    return {spec: root / cell.run for spec, cell in zip(DEMO_RUNS, study.cells(), strict=True)}


def trained_default_model(progress_bar: ProgressBar) -> Path:
    """The default model's directory, trained first (with a progress bar) if need be."""
    model_dir = default_model_dir()
    if not is_trained_from(model_dir, DEFAULT_RECIPE):
        data = shared_data_dir()  # a missing data folder is reported before the bar shows
        with progress_bar("training the default model", unit="step") as update:
            ensure_default_model(DEFAULT_RECIPE, data_dir=data, progress=update)
    report = json.loads((model_dir / TRAINING_REPORT).read_text())
    stderr.print(
        f"default model: {model_dir} (held-out loss {report['heldout_loss']:.3f}, "
        f"trained in {report['train_seconds']:.0f} s)",
        highlight=False,
    )
    return model_dir


def style_summary(runs: dict[str, RunTables]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean nuclear norm per module, averaged over layers and profiled examples; mean loss
    and response tokens of the profiled examples), one column per run."""
    norms = pd.DataFrame(
        {
            title: tables.spectra.groupby("module")["nuclear_norm"].mean()
            for title, tables in runs.items()
        }
    )
    norms = norms.loc[study_order(norms.index)]
    ok = {
        title: tables.examples[tables.examples["status"] == "ok"] for title, tables in runs.items()
    }
    facts = pd.DataFrame(
        {
            title: {
                "examples": len(rows),
                "mean loss": rows["loss"].mean(),
                "mean response tokens": rows["n_response_tokens"].mean(),
            }
            for title, rows in ok.items()
        }
    )
    return norms, facts


def summary_table(norms: pd.DataFrame, facts: pd.DataFrame, caption: str) -> Table:
    """A Rich table: nuclear norms per module, then the per-run facts."""
    table = Table(
        title="Mean gradient nuclear norm per module (over layers and examples)", caption=caption
    )
    table.add_column("module")
    for title in norms.columns:
        table.add_column(title, justify="right")
    for module, row in norms.iterrows():
        table.add_row(str(module), *(f"{value:.4g}" for value in row))
    table.add_section()
    for fact, row in facts.iterrows():
        table.add_row(str(fact), *(f"{value:.4g}" for value in row))
    return table


def run_demo(progress_bar: ProgressBar, limit: int = DEMO_LIMIT) -> None:
    """The `gradspec demo` command: profile the demo grid, print the summary, write the report."""
    run_dirs = run_demo_study(progress_bar, limit=limit)
    summarised = {spec.title: load_run(path) for spec, path in run_dirs.items() if spec.title}
    norms, facts = style_summary(summarised)
    caption = f"gsm8k, correct responses, first {limit} examples per style"
    Console().print(summary_table(norms, facts, caption))
    report = write_report(
        [demo_root()],
        demo_root() / "report.html",
        title=f"gradspec demo: fast vs slow thinking ({limit} examples a run)",
    )
    stderr.print(
        f"[green]report:[/] {report}  (tables beside it: "
        f"{report.with_suffix('.md').name}, {report.stem}_tables/)",
        highlight=False,
    )
