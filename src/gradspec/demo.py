"""`gradspec demo`: profile one shared task in three response styles on the default model.

The demo trains (once) the embedded default model, profiles the first examples of gsm8k
answered without a rationale, with the dataset's short rationale and with a long
step-by-step one (the study's None, Simplified and Detailed CoT), and prints per style the
mean gradient nuclear norm of each module, the mean loss and the mean response length.
Runs are ordinary resumable run directories under ``runs/demo/<label>/``; extend
:data:`DEMO_RUNS` to profile more.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from .adapters import ATTENTION_MODULES, MLP_MODULES
from .default_model import (
    DEFAULT_RECIPE,
    TRAINING_REPORT,
    Progress,
    default_model_dir,
    ensure_default_model,
    is_trained_from,
    project_root,
    shared_data_dir,
)
from .engine import profile
from .errors import GradspecError
from .store import RunTables, load_run

ProgressBar = Callable[..., AbstractContextManager[Progress]]
DEMO_LIMIT = 50
stderr = Console(stderr=True)


@dataclass(frozen=True)
class RunSpec:
    """One demo run: its directory name, its data file (relative to the shared data), a title."""

    label: str
    data: str
    title: str


DEMO_RUNS = (
    RunSpec("gsm8k_no_cot", "reasoning_cot/correct/gsm8k_no_cot.json", "None CoT"),
    RunSpec("gsm8k_with_cot", "reasoning_cot/correct/gsm8k_with_cot.json", "Simplified CoT"),
    RunSpec("gsm8k_with_cot_gpt4o", "reasoning_cot/correct/gsm8k_with_cot_gpt4o.json",
            "Detailed CoT"),
)


def demo_runs_root() -> Path:
    """Where the demo's run directories live: ``<project>/runs/demo``."""
    return project_root() / "runs" / "demo"


def run_demo_profiles(progress_bar: ProgressBar, specs: tuple[RunSpec, ...] = DEMO_RUNS,
                      limit: int = DEMO_LIMIT) -> dict[RunSpec, Path]:
    """Ensure the default model, then profile each spec (resuming finished runs).

    Returns each spec's run directory. ``progress_bar(description, unit=...)`` gives a
    context manager yielding a ``progress(done, total)`` callback.
    """
    model_dir = trained_default_model(progress_bar)
    data_dir = shared_data_dir()
    run_dirs = {}
    for spec in specs:
        run_dirs[spec] = demo_runs_root() / spec.label
        profile_afresh_if_stale(progress_bar, model_dir, data_dir / spec.data,
                                run_dirs[spec], limit)
    return run_dirs


def trained_default_model(progress_bar: ProgressBar) -> Path:
    """The default model's directory, trained first (with a progress bar) if need be."""
    model_dir = default_model_dir()
    if not is_trained_from(model_dir, DEFAULT_RECIPE):
        with progress_bar("training the default model", unit="step") as update:
            ensure_default_model(DEFAULT_RECIPE, progress=update)
    report = json.loads((model_dir / TRAINING_REPORT).read_text())
    stderr.print(f"default model: {model_dir} (held-out loss {report['heldout_loss']:.3f}, "
                 f"trained in {report['train_seconds']:.0f} s)", highlight=False)
    return model_dir


def profile_afresh_if_stale(progress_bar: ProgressBar, model_dir: Path, data: Path,
                            run_dir: Path, limit: int) -> None:
    """Profile into ``run_dir``, resuming it; a demo run left by other inputs (another
    model recipe or gradspec version), which the engine refuses to mix, is redone."""
    for attempt in (1, 2):
        try:
            with progress_bar(f"profiling {run_dir.name}") as update:
                profile(model_dir, data, run_dir, device="cpu", limit=limit, progress=update)
            return
        except GradspecError as exc:
            if attempt == 2 or not (run_dir / "manifest.json").is_file():
                raise
            stderr.print(f"[yellow]redoing {run_dir.name}:[/] {exc}", highlight=False)
            shutil.rmtree(run_dir)


def module_order(modules: list[str]) -> list[str]:
    """Canonical modules first (attention, then MLP), any others after, alphabetically."""
    canonical = [m for m in (*ATTENTION_MODULES, *MLP_MODULES) if m in modules]
    return canonical + sorted(set(modules) - set(canonical))


def style_summary(runs: dict[str, RunTables]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean nuclear norm per module, averaged over layers and profiled examples; mean loss
    and response tokens of the profiled examples), one column per run."""
    norms = pd.DataFrame({title: tables.spectra.groupby("module")["nuclear_norm"].mean()
                          for title, tables in runs.items()})
    norms = norms.loc[module_order(list(norms.index))]
    ok = {title: tables.examples[tables.examples["status"] == "ok"]
          for title, tables in runs.items()}
    facts = pd.DataFrame({title: {"examples": len(rows), "mean loss": rows["loss"].mean(),
                                  "mean response tokens": rows["n_response_tokens"].mean()}
                          for title, rows in ok.items()})
    return norms, facts


def summary_table(norms: pd.DataFrame, facts: pd.DataFrame, caption: str) -> Table:
    """A Rich table: nuclear norms per module, then the per-run facts."""
    table = Table(title="Mean gradient nuclear norm per module (over layers and examples)",
                  caption=caption)
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
    """The `gradspec demo` command: profile the demo runs and print their summary."""
    run_dirs = run_demo_profiles(progress_bar, limit=limit)
    norms, facts = style_summary({spec.title: load_run(path) for spec, path in run_dirs.items()})
    caption = f"gsm8k, first {limit} examples per style; runs in {demo_runs_root()}"
    Console().print(summary_table(norms, facts, caption))
