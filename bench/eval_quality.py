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

The learned detector (``gradspec flag --learn``; skipped with ``--no-learned``): every mix
example gets a corrupted twin from ``gradspec.corruptions`` (all four kinds in turn),
profiled with the same options beside the cell's run (``run-twins/``, resumable), and the
detector's probability is evaluated without flattering it: every real example is scored
by detectors learnt on other cells only (``CELL_FOLDS`` folds of cells), **leaving one
kind out** (learnt on twins of the three other kinds; the mixes' ``irrelevant`` is tested
against ``stitched`` twins, ``LEARNED_KIND``) and **one task out** (learnt on the other
tasks' twins), each with every feature and with ``BASELINE_FEATURES`` (loss, IFD, response
length) only: ``all-base`` is the AUROC the gradient features add, with a bootstrap
interval. ``--quick`` is a smoke run (``QUICK``). The full evaluation, every task and
style plus MATH with 40 instructions per cell (22 cells), resumes where it stops:

    .venv/bin/python bench/eval_quality.py --limit 40 --markdown bench/results-learned-smollm2.md

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
from mixes import (
    KINDS,
    CellFiles,
    MixExample,
    build_mix,
    math_cell,
    reasoning_cell,
    wiki_cell,
    write_json,
)
from rich.console import Console
from transformers import AutoTokenizer

import gradspec
from gradspec.corruptions import CORRUPTIONS
from gradspec.demo import demo_model_path
from gradspec.detector import (
    BASELINE_FEATURES,
    example_features,
    fit_detector,
    profile_twins,
    training_pairs,
    twins_folder,
)
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
from gradspec.shared_data import (
    MATH_STYLE_SUFFIXES,
    MATH_SUBJECTS,
    REASONING_TASKS,
    STYLE_SUFFIXES,
    WIKI_SETS,
    shared_data_dir,
)

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
# The corruption of gradspec's registry that the learned detector is trained on in place of
# each kind of the mixes (the shared irrelevant responses of the CoT styles are stitched).
LEARNED_KIND = {
    "irrelevant": "stitched",
    "swapped": "swapped",
    "wrong_answer": "wrong_answer",
    "truncated": "truncated",
}
FEATURE_SETS = {"all": None, "base": BASELINE_FEATURES}  # None: every feature
CELL_FOLDS = 5  # cross-fitting: a cell is scored by detectors learnt on other cells
QUICK = {"limit": 24, "tasks": "gsm8k,aqua", "styles": "with_cot", "max_length": 256}
LEARNED_LEGEND = (
    "AUROC of the probability of gradspec's learned detector (flag --learn) at telling each "
    "kind of the mixes from the correct responses; every example is scored by detectors "
    f"learnt on other cells only ({CELL_FOLDS} folds of cells, or the other tasks). 'all 3 "
    "kinds' / 'base 3 kinds': learnt on twins of the three other kinds (the held-out kind "
    "never seen; irrelevant is tested against twins 'stitched' from other responses) with "
    "every feature / with loss, IFD and response length only; 'all 4 kinds': every kind "
    "seen (in distribution); 'all other tasks' / 'base other tasks': learnt on the other "
    "tasks' twins of every kind; all-base: the AUROC every feature adds over loss, IFD and "
    "length, with a 95% bootstrap interval; loss, ifd, flag: the unsupervised scores"
)
console = Console(width=200)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
        default=",".join((*REASONING_TASKS, *MATH_SUBJECTS, *WIKI_SETS)),
        help="comma-separated reasoning tasks, MATH subjects and wiki files",
    )
    parser.add_argument("--styles", default=",".join(STYLE_SUFFIXES))
    parser.add_argument("--max-length", type=int, default=512, help="truncate to L tokens")
    parser.add_argument(
        "--blank-instruction",
        action="store_true",
        help="also profile each mix with empty instructions (gradient IFD scores)",
    )
    parser.add_argument(
        "--no-learned",
        dest="learned",
        action="store_false",
        help="skip the learned detector (its twins: one more profile of every mix)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=project_root() / ".cache" / "eval-quality")
    parser.add_argument("--markdown", type=Path, default=None, help="default WORK/<model>/...")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK, bootstrap=200)
    return args


# ---------------------------------------------------------------- the cells


def cells(tasks: list[str], styles: list[str]) -> list[CellFiles]:
    """The files of every chosen (task, style); Wikipedia sets have the style 'wiki'."""
    data = shared_data_dir()
    chosen = []
    for task in tasks:
        if task in REASONING_TASKS:
            chosen += [reasoning_cell(data, task, style) for style in styles]
        elif task in MATH_SUBJECTS:
            chosen += [math_cell(data, task, s) for s in styles if s in MATH_STYLE_SUFFIXES]
        elif task in WIKI_SETS:
            chosen.append(wiki_cell(data, task))
        else:
            raise SystemExit(
                f"unknown task {task!r}: use {', '.join((*REASONING_TASKS, *MATH_SUBJECTS))} "
                f"or {', '.join(WIKI_SETS)}"
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


# ---------------------------------------------------------------- the learned detector


def cell_features(
    mix: list[MixExample], folder: Path, model: Path, args: argparse.Namespace
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The detector's features of a cell's mix (with their kinds) and of twins of all its
    examples, one of every corruption kind in turn, profiled beside the mix's run."""
    tables = gradspec.load_run(folder / "run")
    kinds, sample = list(CORRUPTIONS), len(mix)
    twins, twin_tables = profile_twins(
        tables,
        twins_folder(folder / "run", kinds, sample, args.seed),
        kinds,
        sample,
        args.seed,
        model=model,
        device=args.device,
        minimum=1,
    )
    real, fake = example_features(tables), example_features(twin_tables)
    pairs = training_pairs(real, fake, twins)
    real = real.assign(kind=[mix[i].kind for i in real.index])
    fake = fake.loc[pairs["twin_index"]].set_index(pairs["example_index"])
    return real, fake.assign(kind=pairs["kind"].to_numpy())


def labelled_features(
    mix: list[MixExample],
    scores: pd.DataFrame,
    files: CellFiles,
    folder: Path,
    model: Path,
    args: argparse.Namespace,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A cell's real and twin features, named '<cell>/<example>', with the cell, its task
    and the real examples' pooled percentiles of loss, IFD and flag."""
    real, fake = cell_features(mix, folder, model, args)
    cell = f"{files.task}_{files.style}"
    percentiles = scores.set_index("example_index")[["loss_pct", "ifd_pct", "flag_pct"]]
    real = real.join(percentiles)
    for frame in (real, fake):
        frame.index = cell + "/" + frame.index.astype(str)
    return real.assign(cell=cell, task=files.task), fake.assign(cell=cell, task=files.task)


def cross_fitted(
    reals: pd.DataFrame,
    twins: pd.DataFrame,
    folds: list[tuple[list[str], list[str]]],
    kinds: list[str],
    columns: list[str],
) -> pd.Series:
    """Each real example's probability from a detector learnt on the twins (of ``kinds``)
    and their originals of the training cells of the fold that holds its cell."""
    probability = pd.Series(np.nan, index=reals.index)
    for train_cells, test_cells in folds:
        twin_rows = twins[twins["cell"].isin(train_cells) & twins["kind"].isin(kinds)]
        originals = reals.loc[twin_rows.index]
        x = pd.concat([originals[columns], twin_rows[columns]], ignore_index=True)
        y = np.r_[np.zeros(len(twin_rows)), np.ones(len(twin_rows))]
        groups = np.tile(pd.factorize(twin_rows.index)[0], 2)
        detector = fit_detector(x, y, groups)
        test = reals["cell"].isin(test_cells).to_numpy()
        probability[test] = detector.probability(reals.loc[test, columns])
    return probability


def cell_folds(cells: list[str], n: int = CELL_FOLDS) -> list[tuple[list[str], list[str]]]:
    """(training cells, test cells): every cell tested once, in at most ``n`` folds."""
    parts = [cells[i :: min(n, len(cells))] for i in range(min(n, len(cells)))]
    return [([c for c in cells if c not in part], part) for part in parts]


def task_folds(reals: pd.DataFrame) -> list[tuple[list[str], list[str]]]:
    """(cells of the other tasks, cells of one task), for every task."""
    by_task = reals.groupby("task", sort=False)["cell"].unique()
    cells = list(dict.fromkeys(reals["cell"]))
    return [([c for c in cells if c not in set(mine)], list(mine)) for mine in by_task]


def learned_row(
    reals: pd.DataFrame,
    kind: str,
    probabilities: dict[str, pd.Series],
    protocol: str,
    args: argparse.Namespace,
) -> dict[str, object]:
    """AUROC of each detector at telling ``kind`` from the correct responses, the
    difference between every feature and loss, IFD and length only (with a bootstrap
    interval), and the unsupervised scores beside them (pooled percentiles)."""
    both = reals[reals["kind"].isin(["correct", kind])]
    bad = (both["kind"] == kind).to_numpy()
    row: dict[str, object] = {"kind": kind, "n_bad": int(bad.sum()), "n_ok": int((~bad).sum())}
    for name, probability in probabilities.items():
        row[name] = auroc(probability[both.index].to_numpy(float), bad)
    row["all-base"] = difference_interval(
        probabilities[f"all {protocol}"][both.index].to_numpy(float),
        probabilities[f"base {protocol}"][both.index].to_numpy(float),
        bad,
        seed=0,
        repeats=args.bootstrap,
    )
    for name in ("loss", "ifd", "flag"):
        values = both[f"{name}_pct"].to_numpy(float)
        usable = np.isfinite(values)
        row[name] = auroc(values[usable], bad[usable])
    return row


def learned_tables(frames: list[pd.DataFrame], args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """Leave one kind out and leave one task out, each with every feature and with loss,
    IFD and length only; every real example is scored by detectors that never saw its cell."""
    reals = pd.concat([f[0] for f in frames])
    twins = pd.concat([f[1] for f in frames])
    features = [c for c in twins.columns if c not in ("kind", "cell", "task")]
    columns = {
        name: [c for c in chosen or features if c in features]
        for name, chosen in FEATURE_SETS.items()
    }
    folds = cell_folds(list(dict.fromkeys(reals["cell"])))
    kinds = [k for k in KINDS if k in set(reals["kind"])]
    one_out, per_task = [], []
    for kind in kinds:
        others = [LEARNED_KIND[k] for k in KINDS if k != kind]
        probabilities = {
            f"{name} 3 kinds": cross_fitted(reals, twins, folds, others, cols)
            for name, cols in columns.items()
        }
        probabilities["all 4 kinds"] = cross_fitted(
            reals, twins, folds, list(CORRUPTIONS), columns["all"]
        )
        one_out.append(learned_row(reals, kind, probabilities, "3 kinds", args))
    by_task = task_folds(reals)
    if len(by_task) > 1:
        protocol = "other tasks"
        probabilities = {
            f"{name} {protocol}": cross_fitted(reals, twins, by_task, list(CORRUPTIONS), cols)
            for name, cols in columns.items()
        }
        for _, test_cells in by_task:
            mine = reals[reals["cell"].isin(test_cells)]
            for kind in [k for k in kinds if k in set(mine["kind"])]:
                row = learned_row(mine, kind, probabilities, protocol, args)
                per_task.append({"task": mine["task"].iloc[0], **row})
    return {
        "Learned detector, leave one kind out (trained on twins of the other three kinds)": (
            pd.DataFrame(one_out)
        ),
        "Learned detector, leave one task out (trained on the other tasks' twins)": (
            pd.DataFrame(per_task)
        ),
    }


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


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
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
    frames, learned = [], []
    for files in cells(args.tasks.split(","), args.styles.split(",")):
        mix = build_mix(files, kinds, args.share, args.seed, args.limit, visible)
        counts = pd.Series([m.kind for m in mix]).value_counts().to_dict()
        console.print(f"[bold]{files.task} / {files.style}[/]: {counts}")
        folder = work / f"{files.task}_{files.style}_{setting}"
        scores = score_cell(mix, folder, model, args)
        frames.append(scores.assign(task=files.task, style=files.style))
        if args.learned:
            learned.append(labelled_features(mix, scores, files, folder, model, args))
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
    if learned:
        tables |= learned_tables(learned, args)
    seconds = time.perf_counter() - started
    report = [
        f"Model: `{given.name}` (template {args.template}, max length {args.max_length}); "
        f"{args.limit} instructions per cell, {args.share:.0%} corrupted (seed {args.seed}), "
        f"kinds {', '.join(kinds)}; directions fixed a priori; {seconds:.0f} s (cached runs "
        f"are not redone). Columns: {LEGEND}. Learned detector tables: {LEARNED_LEGEND}."
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
    return path


if __name__ == "__main__":
    main()
