"""Command-line interface: `gradspec profile ...` and friends (Typer, Rich progress)."""

from __future__ import annotations

import functools
import inspect
import math
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

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
from rich.table import Table
from rich.text import Text

from .errors import GradspecError, GradspecWarning
from .options import DATA_PANEL, MODEL_PANEL, ProfileOptions, ReportStatistic, Shard
from .statistics import statistic_help

try:  # Typer 0.22 and later bundle their own click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older Typer runs on click
    from click import exceptions as click_exceptions

if TYPE_CHECKING:  # the CLI starts without torch
    from .modeling import Checkpoint
    from .store import RunTables

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Per-example, per-layer gradient spectra of causal LMs.",
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
LEARN_PANEL = "Learned detector (--learn)"


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"gradspec {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Per-example, per-layer gradient spectra of causal LMs."""


def run(args: Sequence[str] | None = None) -> None:
    """The ``gradspec`` command: Typer's app, where a value Typer itself refuses (an
    unknown choice, a non-number, a missing argument) is one line and exit 2, as every
    other refusal is, instead of a usage box."""
    try:
        code = app(args=args, prog_name="gradspec", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:  # bare `gradspec`: the help, as before
        console.print(exc.ctx.get_help() if exc.ctx else str(exc), highlight=False)
        sys.exit(2)
    except click_exceptions.ClickException as exc:
        context = getattr(exc, "ctx", None)
        command = context.command_path if context else ""
        hint = f"{command}: {{}} (see '{command} --help')" if command else "{}"
        print_error(hint.format(exc.format_message()))
        sys.exit(2)
    except typer.Abort:  # click's Abort, as every Typer version exports it
        print_error("aborted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def user_errors_exit_cleanly(command: F) -> F:
    """Print a GradspecError, or a system error on a file (a full disk, a permission), as
    one red line and exit with status 2, without a traceback; GradspecWarnings are shown
    as yellow lines as they come."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", GradspecWarning)
                warnings.showwarning = show_warning
                return command(*args, **kwargs)
        except (GradspecError, OSError) as exc:
            print_error(str(exc) if isinstance(exc, GradspecError) else os_error_message(exc))
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def print_error(message: str) -> None:
    """One red 'error:' line on stderr; a library's message may span lines, joined here."""
    say("error:", "bold red", " ".join(message.splitlines()))


def say(label: str, style: str, message: str) -> None:
    """One stderr line: ``label`` in ``style``, then ``message`` as typed (a path may hold
    "[...]" or ":x:", which Rich would read as markup or an emoji)."""
    console.print(Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True)


def os_error_message(exc: OSError) -> str:
    """A system error in one line: the file, then the system's reason."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


_show_python_warning = warnings.showwarning


def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
    """A GradspecWarning as one yellow line; other warnings as Python shows them."""
    if issubclass(category, GradspecWarning):
        say("warning:", "bold yellow", str(message))
    else:
        _show_python_warning(message, category, *args, **kw)


class RateColumn(ProgressColumn):
    """Items (examples unless the task says otherwise) per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "ex")
        return Text(f"{speed:.2f} {unit}/s" if speed else f"-- {unit}/s", style="cyan")


@contextmanager
def progress_bar(description: str, unit: str = "ex") -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar; yields a ``progress(done, total)`` callback for the engine. The
    bar shows from the first call on, so a command refused before any work prints only
    its error line."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=console)
    task = bar.add_task(description, total=None, unit=unit)

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


@contextmanager
def rank_progress_bar(description: str) -> Iterator[Callable[[int, int], None] | None]:
    """The progress bar on rank 0 (showing its share of the work), none on other ranks."""
    from .distributed import is_main_process

    if is_main_process():
        with progress_bar(description) as update:
            yield update
    else:
        yield None


def profile_option_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per ProfileOptions field with CLI help, in its help panel."""
    hints = typing.get_type_hints(ProfileOptions)
    return [
        inspect.Parameter(
            option.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=option.default,
            annotation=Annotated[
                hints[option.name],
                typer.Option(
                    help=option.metadata["help"], rich_help_panel=option.metadata["panel"]
                ),
            ],
        )
        for option in fields(ProfileOptions)
        if "help" in option.metadata
    ]


def with_profile_options(command: F) -> F:
    """Give ``command(..., **options)`` one CLI option per ProfileOptions field."""
    signature = inspect.signature(command, eval_str=True)
    given = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*given, *profile_option_parameters()]
    )
    return command


def prepare_checkpoints(
    models: list[Path | str], revision: str | None = None, trust_remote_code: bool = False
) -> dict[Path | str, Checkpoint]:
    """Each model resolved once, before any progress bar: a GGUF file is converted (once;
    cached) and a Hub model fetched, saying so meanwhile."""
    from .gguf_checkpoint import find_gguf
    from .hub import is_hub_id
    from .modeling import resolve_checkpoint

    checkpoints = {}
    for model in models:
        if find_gguf(model) is not None:
            doing = "a GGUF file is dequantised once"
        elif not Path(model).exists() and is_hub_id(str(model)):
            doing = "fetched from the Hugging Face Hub, or found in its cache"
        else:
            checkpoints[model] = resolve_checkpoint(model, revision, trust_remote_code)
            continue
        with console.status(Text(f"preparing {model} ({doing})")):
            checkpoints[model] = resolve_checkpoint(model, revision, trust_remote_code)
        directory = checkpoints[model].directory
        say("model:", "", f"{model} -> {directory}")
    return checkpoints


@app.command()
@user_errors_exit_cleanly
@with_profile_options
def profile(
    model: Annotated[
        str,
        typer.Option(
            help="Hub model id (org/name[@revision]), checkpoint folder, .gguf file, or PEFT "
            "adapter folder; a local path wins over a Hub id."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Data file (.json, .jsonl, .parquet), datasets folder, directory or glob, "
            "or a Hub data set id (org/name)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Run directory; rerun the command to resume.")],
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:N or auto.", rich_help_panel=MODEL_PANEL)
    ] = "auto",
    shard: Annotated[
        Shard,
        typer.Option(
            help="For a model that does not fit one device, under torchrun: fsdp splits it "
            "over all ranks (FSDP2), hsdp over each node's ranks (a copy per node); none: "
            "each rank holds the whole model.",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = Shard.none,
    revision: Annotated[
        str | None,
        typer.Option(help="Branch, tag or commit of a Hub model id.", rich_help_panel=MODEL_PANEL),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            help="Run the Python code of a Hub model's repository (only if you trust it).",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = False,
    split: Annotated[
        str | None,
        typer.Option(help="Split of a Hub data set (default: train).", rich_help_panel=DATA_PANEL),
    ] = None,
    data_config: Annotated[
        str | None,
        typer.Option(
            help="Config (subset) of a Hub data set, e.g. main for openai/gsm8k.",
            rich_help_panel=DATA_PANEL,
        ),
    ] = None,
    **options: Any,
) -> None:
    """Profile per-example gradient spectra of every decoder-layer matrix into RUN_DIR."""
    from .engine import profile as run_profile

    checkpoint = prepare_checkpoints([model], revision, trust_remote_code)[model]
    hub = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "split": split,
        "data_config": data_config,
    }
    with rank_progress_bar("profiling") as update:
        tables = run_profile(
            checkpoint, data, out, device=device, shard=shard, progress=update, **hub, **options
        )
    if tables is None:  # not rank 0
        return
    print_coverage(tables.manifest)
    statuses = tables.examples["status"].value_counts().to_dict()
    summary = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
    say(
        "done:", "green", f"{summary or 'no examples'}; {len(tables.spectra)} spectra rows in {out}"
    )


def print_coverage(manifest: dict[str, Any], prefix: str = "") -> None:
    """Say what a run profiled of the decoder layers and name everything it left out."""
    from .adapters import coverage_lines

    if manifest.get("coverage"):
        for line in coverage_lines(manifest["coverage"]):
            style = "yellow" if line.startswith("left out") else "green"
            say(f"{prefix}coverage:", style, line)


def table_output(run_dir: Path, out: Path | None, default: str) -> Path:
    """Where a command writes its table: ``out`` (a .parquet or .csv file outside any run
    directory, not the run's own files), else ``default`` in the run directory."""
    from .files import refuse_unsafe_output
    from .quality import check_table_path
    from .store import DERIVED_TABLES

    if out is None:
        return run_dir / default
    check_table_path(out, "--out")
    return refuse_unsafe_output(out, [], "--out", allowed_in_run=DERIVED_TABLES)


def run_with_examples(run_dir: Path) -> RunTables:
    """The run's tables, refused when it has no example rows to score (every examples part
    missing), rather than scoring nothing and saying done."""
    from .store import load_run

    tables = load_run(run_dir)
    if tables.examples.empty:
        raise GradspecError(
            f"{run_dir}: the run has no example rows to score (its examples parts are "
            f"missing; `gradspec check {run_dir}` names them)"
        )
    return tables


@app.command()
@user_errors_exit_cleanly
def score(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `gradspec profile`.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Scores table, .parquet or .csv; default RUN_DIR/scores.parquet."),
    ] = None,
) -> None:
    """Score every example: nuclear norms, effective rank, layer MAD, loss, IFD and flag."""
    from .quality import SCORES, example_scores, save_table

    path = table_output(run_dir, out, "scores.parquet")
    scores = example_scores(run_with_examples(run_dir))
    save_table(scores, path)
    table = Table("score", "scored", "median", "10%", "90%", title="per-example scores")
    for name in SCORES:
        values = scores[name].dropna()
        quantiles = [f"{values.quantile(q):.4g}" if len(values) else "-" for q in (0.5, 0.1, 0.9)]
        table.add_row(name, str(len(values)), *quantiles)
    console.print(table)
    say("done:", "green", f"{len(scores)} examples scored into {path}")


@app.command()
@user_errors_exit_cleanly
def flag(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `gradspec profile`.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            help="CSV of example_id (or example_index) and label (1 = does not answer its "
            "instruction, 0 = good) to calibrate a probability."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Full ranking, .parquet or .csv; default RUN_DIR/flags.parquet."),
    ] = None,
    top: Annotated[int, typer.Option(help="Show the N most suspect examples.")] = 20,
    learn: Annotated[
        bool,
        typer.Option(
            help="Learn a detector from corrupted twins of a sample of the run's examples, "
            "profiled with the run's model and options into RUN_DIR-twins/ (resumable).",
            rich_help_panel=LEARN_PANEL,
        ),
    ] = False,
    kinds: Annotated[
        str,
        typer.Option(
            help="With --learn: corruptions, comma-separated, of "
            "stitched, swapped, wrong_answer, truncated.",
            rich_help_panel=LEARN_PANEL,
        ),
    ] = "stitched,swapped,wrong_answer,truncated",
    twins: Annotated[
        int,
        typer.Option(help="With --learn: examples given a twin.", rich_help_panel=LEARN_PANEL),
    ] = 256,
    seed: Annotated[
        int,
        typer.Option(
            help="With --learn: which examples and corruptions.", rich_help_panel=LEARN_PANEL
        ),
    ] = 0,
    model: Annotated[
        Path | None,
        typer.Option(
            help="With --learn: the model, if not where the run's manifest says.",
            rich_help_panel=LEARN_PANEL,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="With --learn: cpu, cuda, ...; default the run's.", rich_help_panel=LEARN_PANEL
        ),
    ] = None,
) -> None:
    """Rank the examples whose responses most likely do not answer their instruction."""
    from .quality import example_scores, flag_ranking, read_labels, save_table

    if top < 0:
        raise GradspecError(f"--top {top}: must be at least 0")
    if learn and labels:
        raise GradspecError("--learn and --labels: use one of them")
    path = table_output(run_dir, out, "flags.parquet")
    if learn:
        from .detector import learn_flags, learnable_run

        learnable_run(run_dir, kinds.split(","), twins)  # refuses before the progress bar
        with progress_bar("profiling twins") as update:
            learned = learn_flags(
                run_dir, kinds.split(","), twins, seed, model, device, progress=update
            )
        ranking, summary = learned.ranking, learned.summary
        per_kind = ", ".join(
            f"{kind} {value:.2f}" for kind, value in summary["held_out_auroc_per_kind"].items()
        )
        say(
            "learned",
            "",
            f"from {summary['pairs']} twins in {learned.folder}: "
            f"held-out AUROC {summary['held_out_auroc']:.3f} ({per_kind})",
        )
    else:
        scores = example_scores(run_with_examples(run_dir))
        ranking = flag_ranking(scores, read_labels(labels, scores) if labels else None)
    save_table(ranking, path)
    columns = ["rank", "example", "source:line", "flag", "percentile", "probability"]
    table = Table(*columns, *(["drivers"] if learn else []), title="most suspect examples")
    for row in ranking.head(top).itertuples():
        probability = "-" if math.isnan(row.probability) else f"{row.probability:.3f}"
        table.add_row(
            str(row.rank),
            str(row.example_index),
            f"{Path(row.source).name}:{row.source_line}",
            f"{row.flag:+.3f}",
            f"{row.flag_pct:.3f}",
            probability,
            *([row.drivers] if learn else []),
        )
    console.print(table)
    say("done:", "green", f"{len(ranking)} examples ranked into {path}")


@app.command()
@user_errors_exit_cleanly
def select(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `gradspec profile`.")],
    data: Annotated[
        str,
        typer.Option(
            help="The data the run profiled (file, directory, glob, or the Hub data set id: "
            "its split and config are the run's)."
        ),
    ],
    keep: Annotated[
        str,
        typer.Option(
            help="A count N (an integer: 1 keeps one example), or a fraction in (0, 1] "
            "written with a point (0.5; 1.0 keeps all)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Output in the input's format (a file, or a datasets folder); "
            "a directory for several inputs."
        ),
    ],
    by: Annotated[str, typer.Option(help="Score to rank by (see `gradspec score`).")] = "flag",
    prefer: Annotated[
        str | None,
        typer.Option(help="Keep the low or high end; default: the less suspect end of the score."),
    ] = None,
    diverse: Annotated[
        bool, typer.Option(help="Pick a covering subset of the best by greedy facility location.")
    ] = False,
    pool: Annotated[
        float, typer.Option(help="With --diverse: choose among the best POOL x N examples.")
    ] = 2.0,
    sidecar: Annotated[
        Path | None,
        typer.Option(
            help="Why each example was kept or dropped (.csv or .parquet); default beside --out."
        ),
    ] = None,
    within: Annotated[
        str | None,
        typer.Option(
            help="Rank within strata: 'source' (each input file) or a record field (e.g. "
            "style); the kept count is spread over the strata in proportion to their sizes."
        ),
    ] = None,
) -> None:
    """Write the best examples by a score back out in the input's own format."""
    from .selection import select as run_select

    selection = run_select(
        run_dir,
        data,
        out,
        keep,
        by=by,
        prefer=prefer,
        diverse=diverse,
        pool=pool,
        sidecar=sidecar,
        within=within,
    )
    kept = int(selection.report["kept"].sum())
    written = ", ".join(str(p) for p in selection.outputs)
    n_data = len(selection.report)
    unprofiled = n_data - selection.n_profiled
    never = f", {unprofiled} never profiled by the run (dropped)" if unprofiled else ""
    say(
        "done:",
        "green",
        f"kept {kept} of {n_data} examples ({selection.n_profiled} profiled{never}) in "
        f"{written}; reasons in {selection.sidecar}",
    )


@app.command()
@user_errors_exit_cleanly
def check(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories and/or study folders to check.")
    ],
) -> None:
    """Check run directories: the manifest, every part, and the examples no part covers."""
    from .runs import is_study_dir, study_runs
    from .store import run_problems

    run_dirs = [
        run
        for path in run_dirs
        for run in ([r for r, _ in study_runs(path)] if is_study_dir(path) else [path])
    ]
    damaged = 0
    for run_dir in run_dirs:
        problems = run_problems(run_dir)
        damaged += bool(problems)
        for problem in problems:
            say("problem:", "yellow", problem)
        if not problems:
            say("ok:", "green", str(run_dir))
    if damaged:
        raise GradspecError(
            f"{damaged} of {len(run_dirs)} run(s) have problems; rerunning `gradspec profile` "
            "with the same arguments redoes missing or damaged parts (a damaged manifest's "
            "line says what to do instead)"
        )


def parse_pairs(values: list[str], option: str) -> dict[str, str]:
    """'KEY=VALUE' strings (split at the first '=') as a dict."""
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise GradspecError(f"{option} {value!r}: expected KEY=VALUE")
        pairs[key] = rest
    return pairs


def parse_run_labels(value: str) -> dict[str, str]:
    """'name' or 'key:value,key:value' (labels model, task, domain, style, ...)."""
    if ":" not in value:
        return {"name": value}
    labels = {}
    for item in value.split(","):
        key, sep, label = item.partition(":")
        if not sep:
            raise GradspecError(f"--label {value!r}: expected key:value items separated by ','")
        labels[key.strip()] = label.strip()
    return labels


StatisticOption = Annotated[
    ReportStatistic,
    typer.Option(help=f"Curves and MAD of one of: {statistic_help()}."),
]
ReportSplit = Annotated[
    str,
    typer.Option(
        help="Early/middle/late boundaries: thirds, study (the study's cuts for 26/28/32/42 "
        "layers, else thirds) or 'b1,b2'."
    ),
]
ReportBootstrap = Annotated[int, typer.Option(help="Bootstrap replicates and permutations.")]


@app.command()
@user_errors_exit_cleanly
def study(
    study_file: Annotated[Path, typer.Argument(help="A study TOML file (see studies/).")],
    out: Annotated[Path, typer.Option(help="Study folder; rerun the command to resume.")],
    model: Annotated[
        list[str] | None,
        typer.Option(help="LABEL=PATH: use this model instead of the file's models (repeatable)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder the datasets' paths are relative to, instead of the file's data_dir."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Override the study's device: cpu, cuda, cuda:N or auto.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Override the study's limit.")] = None,
    statistic: StatisticOption = ReportStatistic.nuclear_norm,
    split: ReportSplit = "thirds",
    bootstrap: ReportBootstrap = 2000,
) -> None:
    """Profile every model x dataset cell of a study (skipping finished ones), then report."""
    from .distributed import is_main_process
    from .integrity import read_manifest
    from .report import write_report
    from .study import load_study, run_study

    spec = load_study(study_file, parse_pairs(model or [], "--model"), data_dir)
    checkpoints: dict[Path | str, Checkpoint] = {}
    for spec_model in spec.models:
        checkpoints.update(
            prepare_checkpoints(
                [spec_model.path], spec_model.revision, spec_model.trust_remote_code
            )
        )
    cells = run_study(
        spec,
        out,
        device=device,
        limit=limit,
        progress=lambda cell: rank_progress_bar(cell.name),
        checkpoints=checkpoints,
    )
    if not is_main_process():
        return  # rank 0 writes the report, after every rank's cells are recorded
    ran = sum(1 for _, was_run in cells if was_run)
    say("profiled:", "green", f"{ran} cells; {len(cells) - ran} already done")
    first_cells = {cell.model.label: cell for cell, _ in reversed(cells)}
    for label, cell in sorted(first_cells.items()):
        print_coverage(read_manifest(out / cell.run / "manifest.json"), f"{label} ")
    path = write_report(
        [out],
        out / "report.html",
        statistic=statistic,
        split=split,
        n_boot=bootstrap,
        title=spec.title,
    )
    say("report:", "green", str(path))


@app.command()
@user_errors_exit_cleanly
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories and/or study folders.")],
    out: Annotated[Path, typer.Option(help="The HTML file; .md and _tables/*.csv go beside.")],
    label: Annotated[
        list[str] | None,
        typer.Option(
            help="RUN_DIR=NAME, or RUN_DIR=key:value,... with keys name, model, task, domain, "
            "style, correctness, length (repeatable)."
        ),
    ] = None,
    statistic: StatisticOption = ReportStatistic.nuclear_norm,
    split: ReportSplit = "thirds",
    bootstrap: ReportBootstrap = 2000,
    title: Annotated[str, typer.Option(help="Title of the report.")] = "gradspec report",
    finding_modules: Annotated[
        str,
        typer.Option(
            help="Modules that decide the findings, comma-separated (default: a study "
            "file's [findings] modules, else q_proj,k_proj,v_proj,o_proj with the MLP beside)."
        ),
    ] = "",
) -> None:
    """Write one self-contained HTML report (curves, MAD, differences, findings) of runs."""
    from .report import write_report

    labels = {
        run: parse_run_labels(value) for run, value in parse_pairs(label or [], "--label").items()
    }
    path = write_report(
        runs,
        out,
        labels,
        statistic=statistic,
        split=split,
        n_boot=bootstrap,
        title=title,
        finding_modules=[m for m in finding_modules.split(",") if m],
    )
    say("report:", "green", str(path))


@app.command()
@user_errors_exit_cleanly
def demo(
    limit: Annotated[
        int | None,
        typer.Option(help="Examples profiled per cell (default: studies/demo.toml's limit)."),
    ] = None,
) -> None:
    """Profile the studies/demo.toml grid on SmolLM2-135M-Instruct, summarise, report."""
    from .demo import run_demo

    run_demo(progress_bar, prepare_checkpoints, limit=limit)
