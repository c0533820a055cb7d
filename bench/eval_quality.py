"""How well does each quality score find responses that do not fit their instruction?

For every task and response style of the shared data (and the Wikipedia sets), the first
``--limit`` instructions are mixed (``bench/mixes.py``): a ``--share`` of them get a
corrupted response, split evenly among the ``--kinds`` that apply (``irrelevant``,
``swapped``, ``wrong_answer``, ``truncated``), the rest keep their own. A corruption the
model would not see (it lies past ``--max-length``) is not picked. Each mix is profiled
with IFD and scored by ``gradspec.quality``; the area under the ROC curve of every score
at telling each kind from the correct responses is reported per kind, task and style,
against the baselines loss and IFD. Directions are fixed a priori
(``quality.SUSPECT_DIRECTION``): an AUROC below 0.5 means the score points the other way.
``|score|`` columns use the two-sided robust z (``quality.two_sided``), which needs no
direction. ``len`` (response tokens, longer = suspect) is shown to expose length effects.

With ``--blank-instruction`` every mix is profiled a second time with its instructions
emptied (same template), giving the gradient analogues of IFD ``nuc_ifd`` and
``flag_ifd`` (``quality.instruction_gradient_scores``): one more backward per example.

Pooled tables use each score's percentile within its own run, so that runs on different
scales can be pooled. Runs and per-cell scores are cached in ``--work``; a rerun resumes.

    .venv/bin/python bench/eval_quality.py --limit 40   # the demo's SmolLM2-135M-Instruct
    .venv/bin/python bench/eval_quality.py --model path/to/checkpoint-or.gguf \\
        --limit 16 --max-length 256 --blank-instruction
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mixes import KINDS, CellFiles, MixExample, build_mix, reasoning_cell, wiki_cell, write_json
from rich.console import Console
from transformers import AutoTokenizer

import gradspec
from gradspec.demo import demo_model_path
from gradspec.modeling import model_signature, resolve_checkpoint
from gradspec.paths import project_root
from gradspec.quality import (
    SUSPECT_DIRECTION,
    auroc,
    example_scores,
    instruction_gradient_scores,
    percentile_within,
    two_sided,
)
from gradspec.shared_data import REASONING_TASKS, STYLE_SUFFIXES, WIKI_SETS, shared_data_dir

BASELINES = ("loss", "ifd")
GRADIENT_IFD = ("nuclear_ifd", "flag_ifd")
TWO_SIDED = ("loss", "nuclear_norm", "flag")
DIRECTION = {
    **SUSPECT_DIRECTION,
    **{name: 1 for name in GRADIENT_IFD},
    **{f"|{name}|": 1 for name in TWO_SIDED},
    "length": 1,
}
SHORT_NAMES = {
    "nuclear_norm": "nuc",
    "nuclear_norm_attn": "nuc_attn",
    "nuclear_norm_mlp": "nuc_mlp",
    "nuclear_norm_other": "nuc_other",
    "effective_rank": "erank",
    "layer_mad": "mad",
    "nuclear_ifd": "nuc_ifd",
    "|nuclear_norm|": "|nuc|",
    "length": "len",
}
LEGEND = (
    "nuc = total nuclear norm, nuc_attn / nuc_mlp = of attention / MLP matrices (higher = "
    "suspect); erank = mean effective rank (lower = suspect); mad = cross-layer MAD; loss "
    "and ifd (higher = suspect) are the baselines; flag = gradspec flag, unsupervised; "
    "nuc_ifd / flag_ifd = the nuclear norm / flag of the response given its instruction "
    "relative to given an empty instruction (higher = suspect); |x| = two-sided robust z "
    "of x within its run (no direction); len = response tokens (reference only); "
    "flag-loss = the flag's AUROC minus loss's, with a 95% bootstrap interval"
)
console = Console(width=200)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a checkpoint folder or .gguf file; default: the demo's SmolLM2-135M-Instruct",
    )
    parser.add_argument("--template", choices=("plain", "chat"), default="chat")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds")
    parser.add_argument("--limit", type=int, default=40, help="instructions per cell")
    parser.add_argument("--share", type=float, default=0.5, help="share of corrupted ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tasks",
        default=",".join((*REASONING_TASKS, *WIKI_SETS)),
        help="comma-separated reasoning tasks and wiki files",
    )
    parser.add_argument("--styles", default=",".join(STYLE_SUFFIXES))
    parser.add_argument("--max-length", type=int, default=512, help="truncate to L tokens")
    parser.add_argument(
        "--blank-instruction",
        action="store_true",
        help="also profile each mix with empty instructions (gradient IFD scores)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=project_root() / ".cache" / "eval-quality")
    parser.add_argument("--markdown", type=Path, default=None, help="default WORK/<model>/...")
    return parser.parse_args()


# ---------------------------------------------------------------- the cells


def cells(tasks: list[str], styles: list[str]) -> list[CellFiles]:
    """The files of every chosen (task, style); Wikipedia sets have the style 'wiki'."""
    data = shared_data_dir()
    chosen = []
    for task in tasks:
        if task in REASONING_TASKS:
            chosen += [reasoning_cell(data, task, style) for style in styles]
        elif task in WIKI_SETS:
            chosen.append(wiki_cell(data, task))
        else:
            raise SystemExit(
                f"unknown task {task!r}: use {', '.join(REASONING_TASKS)} or {', '.join(WIKI_SETS)}"
            )
    return chosen


def visible_to(tokenizer: object, template: str, max_length: int):
    """A test that the model sees a corruption: the two records' tokens differ."""

    def visible(original: dict[str, str], corrupted: dict[str, str]) -> bool:
        tokens = [
            gradspec.encode(tokenizer, r, template, max_length)[0] for r in (original, corrupted)
        ]
        return tokens[0] != tokens[1]

    return visible


def score_cell(
    mix: list[MixExample], folder: Path, model: Path, args: argparse.Namespace
) -> pd.DataFrame:
    """Profile a mix (and its blank-instruction twin), cache and return its scores."""
    write_json([m.record for m in mix], folder / "mix.json")
    options = {"device": args.device, "max_length": args.max_length, "template": args.template}
    tables = gradspec.profile(model, folder / "mix.json", folder / "run", ifd=True, **options)
    scores = example_scores(tables).set_index("example_index")
    scores["length"] = tables.examples.set_index("example_index")["n_response_tokens"]
    if args.blank_instruction:
        blank = [{**m.record, "instruction": "", "input": ""} for m in mix]
        write_json(blank, folder / "blank.json")
        blank_tables = gradspec.profile(model, folder / "blank.json", folder / "blank", **options)
        scores = scores.join(instruction_gradient_scores(tables, blank_tables))
    for name in TWO_SIDED:
        scores[f"|{name}|"] = two_sided(scores[name])
    for name in DIRECTION:
        if name in scores and f"{name}_pct" not in scores:
            scores[f"{name}_pct"] = percentile_within(scores[name])
    scores["kind"] = [m.kind for m in mix]
    scores.reset_index().to_parquet(folder / "scores.parquet", index=False)
    return scores.reset_index()


# ---------------------------------------------------------------- evaluation


def auroc_table(
    frame: pd.DataFrame, by: list[str], columns: list[str], pooled: bool
) -> pd.DataFrame:
    """AUROC of each score at telling each kind from the correct responses, per group.

    ``pooled`` uses within-run percentiles, for groups that span several runs.
    """
    rows = []
    for key, group in frame.groupby(by, sort=False):
        correct = group[group["kind"] == "correct"]
        for kind in [k for k in KINDS if k in set(group["kind"])]:
            both = pd.concat([correct, group[group["kind"] == kind]])
            bad = (both["kind"] == kind).to_numpy()
            row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
            row.update(kind=kind, n_bad=int(bad.sum()), n_ok=int((~bad).sum()))
            for name in columns:
                values = DIRECTION[name] * both[f"{name}_pct" if pooled else name].to_numpy(float)
                usable = np.isfinite(values)
                row[name] = auroc(values[usable], bad[usable])
            if pooled:
                for baseline in BASELINES:
                    row[f"flag-{baseline}"] = difference_interval(
                        both["flag_pct"].to_numpy(float),
                        both[f"{baseline}_pct"].to_numpy(float),
                        bad,
                        seed=0,
                    )
            rows.append(row)
    return pd.DataFrame(rows)


def difference_interval(
    a: np.ndarray, b: np.ndarray, bad: np.ndarray, seed: int, repeats: int = 1000
) -> str:
    """AUROC(a) - AUROC(b) with a 95% bootstrap interval that resamples examples per class."""
    usable = np.isfinite(a) & np.isfinite(b)
    a, b, bad = a[usable], b[usable], bad[usable]
    positives, negatives = np.flatnonzero(bad), np.flatnonzero(~bad)
    if not len(positives) or not len(negatives):
        return "-"
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(repeats):
        rows = np.concatenate(
            [rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))]
        )
        differences.append(auroc(a[rows], bad[rows]) - auroc(b[rows], bad[rows]))
    low, high = np.percentile(differences, [2.5, 97.5])
    return f"{auroc(a, bad) - auroc(b, bad):+.2f} [{low:+.2f}, {high:+.2f}]"


# ---------------------------------------------------------------- output


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table, AUROCs to two decimals."""

    def cell(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = [
        "| " + " | ".join(frame.columns) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    lines += [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    given = args.model or demo_model_path()
    model = resolve_checkpoint(given).directory
    kinds = args.kinds.split(",")
    key = model_signature(model)["config_and_tokenizer_sha256"][:12]
    work = args.work / f"{model.name}-{key}"
    visible = visible_to(AutoTokenizer.from_pretrained(model), args.template, args.max_length)
    setting = (
        f"n{args.limit}_s{args.share}_seed{args.seed}_{args.template}_L{args.max_length}_"
        + "-".join(kinds)
    )
    started = time.perf_counter()
    frames = []
    for files in cells(args.tasks.split(","), args.styles.split(",")):
        mix = build_mix(files, kinds, args.share, args.seed, args.limit, visible)
        counts = pd.Series([m.kind for m in mix]).value_counts().to_dict()
        console.print(f"[bold]{files.task} / {files.style}[/]: {counts}")
        scores = score_cell(mix, work / f"{files.task}_{files.style}_{setting}", model, args)
        frames.append(scores.assign(task=files.task, style=files.style))
    everything = pd.concat(frames, ignore_index=True)
    columns = [c for c in DIRECTION if c in everything and everything[c].notna().any()]
    tables = {
        "Per kind, pooled over all tasks and styles": auroc_table(
            everything.assign(all="all"), ["all"], columns, pooled=True
        ),
        "Per kind and style, pooled over tasks": auroc_table(
            everything, ["style"], columns, pooled=True
        ),
        "Per kind and task, pooled over styles": auroc_table(
            everything, ["task"], columns, pooled=True
        ),
        "Per kind, task and style (few examples per cell: noisy)": auroc_table(
            everything, ["task", "style"], columns, pooled=False
        ),
    }
    seconds = time.perf_counter() - started
    report = [
        f"Model: `{given.name}` (template {args.template}, max length {args.max_length}); "
        f"{args.limit} instructions per cell, {args.share:.0%} corrupted (seed {args.seed}), "
        f"kinds {', '.join(kinds)}; directions fixed a priori; {seconds:.0f} s (cached runs "
        f"are not redone). Columns: {LEGEND}."
    ]
    for title, table in tables.items():
        table = table.rename(columns=SHORT_NAMES)
        console.print(f"[bold]{title}[/]")
        console.print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        report.append(f"### {title}\n\n{markdown(table)}")
    path = args.markdown or work / f"auroc-{setting}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(report) + "\n")
    everything.to_parquet(path.with_suffix(".parquet"), index=False)
    console.print(f"[green]done[/] in {seconds:.0f} s; Markdown in {path}")


if __name__ == "__main__":
    main()
