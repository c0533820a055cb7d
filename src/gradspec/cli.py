"""Command-line interface: `gradspec profile ...` and friends (Typer, Rich progress)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .errors import GradspecError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Per-example, per-layer gradient spectra of causal LMs.")
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors_exit_cleanly(command: F) -> F:
    """Print a GradspecError as one red line and exit with status 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GradspecError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    """Examples per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} ex/s" if speed else "-- ex/s", style="cyan")


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar; yields a ``progress(done, total)`` callback for the engine."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command()
@user_errors_exit_cleanly
def profile(
    model: Annotated[Path, typer.Option(help="Local checkpoint directory (config.json inside).")],
    data: Annotated[str, typer.Option(help="Alpaca/chat JSON or JSONL file, directory or glob.")],
    out: Annotated[Path, typer.Option(help="Run directory; rerun the command to resume.")],
    template: Annotated[str, typer.Option(help="plain or chat.")] = "plain",
    modules: Annotated[str, typer.Option(help="all, attn, mlp, or a regex on names.")] = "all",
    limit: Annotated[int | None, typer.Option(help="Profile the first N examples.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Examples per batch; default: as many as fit --token-budget.")] = None,
    token_budget: Annotated[int, typer.Option(help="Padded tokens per batch.")] = 4096,
    max_length: Annotated[int | None, typer.Option(help="Truncate examples to L tokens.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="Model dtype: auto, float32, bfloat16, float16, float64.")] = "auto",
    spectra_dtype: Annotated[str, typer.Option(
        help="Spectra precision: auto (float64 on CPU, float32 on GPU), float32, float64."
    )] = "auto",
    method: Annotated[str, typer.Option(
        help="fast, or reference (the published per-example full-SVD algorithm).")] = "fast",
    top_k: Annotated[int, typer.Option(help="Also store the K largest singular values.")] = 0,
    ifd: Annotated[bool, typer.Option(
        help="Also record the response-only loss and IFD (one extra forward).")] = False,
    padding_side: Annotated[str, typer.Option(help="left or right.")] = "right",
) -> None:
    """Profile per-example gradient spectra of every decoder-layer matrix into RUN_DIR."""
    from .engine import profile as run_profile

    with progress_bar("profiling") as update:
        tables = run_profile(model, data, out, device=device, progress=update,
                             template=template, modules=modules, limit=limit,
                             batch_size=batch_size, token_budget=token_budget,
                             max_length=max_length, dtype=dtype, spectra_dtype=spectra_dtype,
                             method=method, top_k=top_k, ifd=ifd, padding_side=padding_side)
    statuses = tables.examples["status"].value_counts().to_dict()
    summary = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
    console.print(f"[green]done:[/] {summary or 'no examples'}; "
                  f"{len(tables.spectra)} spectra rows in {out}")
