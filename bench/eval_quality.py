"""How well does each quality score find responses that do not answer their instruction?

For every task and response style of the shared data, the first ``--limit`` instructions
are mixed: a seeded ``--ratio`` of them get the irrelevant file's response at the same
index (a response written for another instruction), the rest keep their own. Each mix is
profiled with IFD, scored by ``gradspec.quality``, and the area under the ROC curve of
every score at recovering the irrelevant responses is reported, against the baselines
loss and IFD. Each score's direction is fixed a priori (``quality.SUSPECT_DIRECTION``),
never chosen on this data: an AUROC below 0.5 means the score points the other way.

``flag+K`` calibrates the flag with K labelled examples of the mix (half of each kind,
drawn at random, ``--repeats`` times) and measures the AUROC on the unlabelled rest.
The "pooled" table pools each style's tasks, using each score's percentile within its own
run so that tasks on different scales can be pooled.

Profiles are cached in ``--work`` (one run per mix and model), so a rerun resumes. With
the embedded default model, keep ``--limit`` at or below its held-out count (100): later
records of the correct files are its training data.

    .venv/bin/python bench/eval_quality.py --limit 40
    .venv/bin/python bench/eval_quality.py --model path/to/checkpoint --tasks gsm8k,aqua
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

import gradspec
from gradspec.default_model import (
    DEFAULT_RECIPE,
    REASONING_TASKS,
    RESPONSE_STYLES,
    WIKI_FILES,
    ensure_default_model,
    project_root,
    shared_data_dir,
)
from gradspec.modeling import check_model_dir, model_signature
from gradspec.quality import (
    SCORES,
    SUSPECT_DIRECTION,
    auroc,
    example_scores,
    flag_ranking,
)

BASELINES = ("loss", "ifd")
SHORT_NAMES = {
    "irrelevant": "bad",
    "nuclear_norm": "nuc",
    "nuclear_norm_attn": "nuc_attn",
    "nuclear_norm_mlp": "nuc_mlp",
    "nuclear_norm_other": "nuc_other",
    "effective_rank": "erank",
    "layer_mad": "mad",
}
LEGEND = (
    "bad = irrelevant responses in the mix; nuc = total nuclear norm, nuc_attn / "
    "nuc_mlp = of attention / MLP matrices (higher = suspect); erank = mean effective "
    "rank (lower = suspect); mad = cross-layer MAD; loss and ifd (higher = suspect) are "
    "the baselines; flag = gradspec flag, unsupervised; flag+K = flag calibrated with K "
    "labelled examples, AUROC on the rest; flag-loss / flag-ifd = the flag's AUROC minus "
    "the baseline's, with a 95% bootstrap interval over examples"
)
console = Console(width=160)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local checkpoint; default: the embedded default model",
    )
    parser.add_argument("--limit", type=int, default=40, help="instructions per mix")
    parser.add_argument("--ratio", type=float, default=0.2, help="share of irrelevant ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tasks",
        default=",".join((*REASONING_TASKS, *WIKI_FILES)),
        help="comma-separated reasoning tasks and wiki files",
    )
    parser.add_argument(
        "--styles",
        default=",".join(RESPONSE_STYLES),
        help="comma-separated reasoning response styles",
    )
    parser.add_argument("--labels", type=int, default=8, help="K of the flag+K column; 0: off")
    parser.add_argument("--repeats", type=int, default=50, help="label draws for flag+K")
    parser.add_argument("--max-length", type=int, default=512, help="truncate to L tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--work",
        type=Path,
        default=project_root() / ".cache" / "eval-quality",
        help="cache of mixes and runs",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="tables as Markdown; default WORK/<model>/auroc-<mix>.md",
    )
    return parser.parse_args()


# ---------------------------------------------------------------- the mixes


def mixes(tasks: list[str], styles: list[str]) -> list[tuple[str, str, str]]:
    """(task, style, data file relative to the correct/ and irrelevant/ folders)."""
    chosen = []
    for task in tasks:
        if task in REASONING_TASKS:
            chosen += [(task, style, f"reasoning_cot/{{}}/{task}_{style}.json") for style in styles]
        elif task in WIKI_FILES:
            chosen.append((task, "wiki", f"wiki_knowledge/{{}}/{task}.json"))
        else:
            raise SystemExit(
                f"unknown task {task!r}: use {', '.join(REASONING_TASKS)} "
                f"or {', '.join(WIKI_FILES)}"
            )
    return chosen


def write_mix(pattern: str, limit: int, ratio: float, seed: int, path: Path) -> np.ndarray:
    """Write the first ``limit`` instructions, a seeded ``ratio`` of them with the irrelevant
    response, as an Alpaca JSON array; returns which examples are irrelevant."""
    data = shared_data_dir()
    correct = json.loads((data / pattern.format("correct")).read_text())[:limit]
    irrelevant = json.loads((data / pattern.format("irrelevant")).read_text())[:limit]
    rng = np.random.default_rng(seed)
    bad = np.zeros(len(correct), dtype=bool)
    bad[rng.choice(len(correct), size=round(ratio * len(correct)), replace=False)] = True
    records = [irrelevant[i] if bad[i] else correct[i] for i in range(len(correct))]
    assert all(r["instruction"] == c["instruction"] for r, c in zip(records, correct, strict=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(records, indent=4)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return bad


# ---------------------------------------------------------------- evaluation


def evaluate_mix(
    scores: pd.DataFrame, bad: np.ndarray, n_labels: int, repeats: int, seed: int
) -> dict[str, float]:
    """AUROC of every score (a priori direction) and of the calibrated flag."""
    ok = scores["status"].eq("ok").to_numpy()
    result = {}
    for name in SCORES:
        values = scores[name].to_numpy(dtype=float)
        usable = ok & np.isfinite(values)
        result[name] = (
            auroc(SUSPECT_DIRECTION[name] * values[usable], bad[usable])
            if usable.any()
            else float("nan")
        )
    if n_labels:
        result[f"flag+{n_labels}"] = calibrated_auroc(scores, bad, n_labels, repeats, seed)
    return result


def calibrated_auroc(
    scores: pd.DataFrame, bad: np.ndarray, n_labels: int, repeats: int, seed: int
) -> float:
    """Mean AUROC on the unlabelled examples after calibrating with K random labels."""
    rng = np.random.default_rng(seed)
    ok = scores["status"].eq("ok").to_numpy()
    bad_ids, good_ids = np.flatnonzero(ok & bad), np.flatnonzero(ok & ~bad)
    half = n_labels // 2
    if len(bad_ids) <= half or len(good_ids) <= half:
        return float("nan")
    values = []
    for _ in range(repeats):
        picked = np.concatenate(
            [rng.choice(bad_ids, half, replace=False), rng.choice(good_ids, half, replace=False)]
        )
        labels = pd.DataFrame(
            {
                "example_index": scores["example_index"].to_numpy()[picked],
                "label": bad[picked].astype(int),
            }
        )
        ranking = flag_ranking(scores, labels)
        rest = ranking[ranking["label"].isna()]
        values.append(auroc(rest["probability"].to_numpy(), bad[rest["example_index"].to_numpy()]))
    return float(np.mean(values))


def pooled(
    per_mix: dict[tuple[str, str], tuple[pd.DataFrame, np.ndarray]], columns: list[str], seed: int
) -> pd.DataFrame:
    """AUROC per response style over all its tasks, on within-run percentiles, and the
    flag's AUROC minus each baseline's with a bootstrap interval."""
    rows = []
    for style in dict.fromkeys(style for _, style in per_mix):
        frames = [(s, b) for (_, st), (s, b) in per_mix.items() if st == style]
        scores = pd.concat([s for s, _ in frames], ignore_index=True)
        bad = np.concatenate([b for _, b in frames])
        row: dict[str, object] = {"style": style, "n": len(bad), "irrelevant": int(bad.sum())}
        suspicion = {
            name: SUSPECT_DIRECTION[name] * scores[f"{name}_pct"].to_numpy(dtype=float)
            for name in columns
        }
        for name, values in suspicion.items():
            usable = np.isfinite(values)
            row[name] = auroc(values[usable], bad[usable])
        for baseline in BASELINES:
            if baseline in suspicion:
                row[f"flag-{baseline}"] = difference_interval(
                    suspicion["flag"], suspicion[baseline], bad, seed
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


def rich_table(frame: pd.DataFrame, title: str) -> Table:
    """AUROCs coloured: green at >= 0.65, red at <= 0.35 (the a priori direction is wrong)."""
    table = Table(*frame.columns, title=title)
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, float):
                style = "green" if value >= 0.65 else "red" if value <= 0.35 else ""
                cells.append(f"[{style}]{value:.2f}[/]" if style else f"{value:.2f}")
            else:
                cells.append(str(value))
        table.add_row(*cells)
    return table


def main() -> None:
    args = parse_args()
    model = check_model_dir(args.model) if args.model else ensure_default_model()
    if args.model is None and args.limit > DEFAULT_RECIPE.held_out_per_file:
        raise SystemExit(
            f"--limit {args.limit}: the default model trained on records after "
            f"the first {DEFAULT_RECIPE.held_out_per_file}; use at most that"
        )
    key = model_signature(model)["config_and_tokenizer_sha256"][:12]
    work = args.work / f"{model.name}-{key}"
    started = time.perf_counter()
    per_mix: dict[tuple[str, str], tuple[pd.DataFrame, np.ndarray]] = {}
    rows = []
    for task, style, pattern in mixes(args.tasks.split(","), args.styles.split(",")):
        name = f"{task}_{style}_n{args.limit}_r{args.ratio}_s{args.seed}"
        data = work / name / "mix.json"
        bad = write_mix(pattern, args.limit, args.ratio, args.seed, data)
        console.print(f"[bold]{task} / {style}[/]: {len(bad)} examples, {bad.sum()} irrelevant")
        tables = gradspec.profile(
            model,
            data,
            work / name / "run",
            device=args.device,
            ifd=True,
            max_length=args.max_length,
        )
        scores = example_scores(tables)
        per_mix[task, style] = scores, bad
        rows.append(
            {
                "task": task,
                "style": style,
                "n": len(bad),
                "irrelevant": int(bad.sum()),
                **evaluate_mix(scores, bad, args.labels, args.repeats, args.seed),
            }
        )
    per_task = pd.DataFrame(rows).dropna(axis=1, how="all")
    by_style = pooled(per_mix, [c for c in SCORES if c in per_task], args.seed)
    per_task, by_style = per_task.rename(columns=SHORT_NAMES), by_style.rename(columns=SHORT_NAMES)
    seconds = time.perf_counter() - started
    console.print(rich_table(per_task, "AUROC at finding irrelevant responses, per mix"))
    console.print(rich_table(by_style, "AUROC pooled over tasks (within-run percentiles)"))
    report = (
        f"Model: `{model}`; {args.limit} instructions per mix, {args.ratio:.0%} "
        f"irrelevant (seed {args.seed}); directions fixed a priori; "
        f"{seconds:.0f} s (runs already cached are not redone). Columns: {LEGEND}.\n\n"
        f"### Per task and style\n\n{markdown(per_task)}\n\n"
        f"### Pooled per style\n\n{markdown(by_style)}\n"
    )
    path = args.markdown or work / f"auroc-n{args.limit}-r{args.ratio}-s{args.seed}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    console.print(f"[green]done[/] in {seconds:.0f} s; Markdown in {path}")


if __name__ == "__main__":
    main()
