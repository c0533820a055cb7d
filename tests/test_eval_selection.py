"""bench/eval_selection.py: the pool and its labels, held-out items, answers, a tiny run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_selection import (
    METHODS,
    all_cells,
    build_accuracy,
    build_eval,
    build_pool,
    main,
    parse_args,
    pool_name,
    setting_name,
    summary_rows,
)
from mixes import extract_answer, read_records
from transformers import AutoTokenizer

from gradspec import encode
from gradspec.detector import learn_flags
from gradspec.shared_data import reasoning_file

ECQA_INSTRUCTION = (
    "Where would you keep a pet fish?\\nOptions:\\n- pond\\n- fish tank\\n- river"
    "\\n- ocean\\n- bowl of soup"
)


# ---------------------------------------------------------------- pool and held-out items


def test_pool_labels_match_the_shared_files_and_the_share_is_exact(shared_data: Path):
    cells = all_cells(shared_data)
    pool = build_pool(cells, 160, 0.3, seed=0)
    assert len(cells) == 16 and len(pool) == 160
    assert sum(item.kind == "irrelevant" for item in pool) == 16 * 3  # round(0.3 * 10) per cell
    for files in cells:
        correct, irrelevant = read_records(files.correct), read_records(files.irrelevant)
        mine = [it for it in pool if (it.task, it.style) == (files.task, files.style)]
        assert [it.index for it in mine] == list(range(10))
        for it in mine:
            assert it.record["instruction"] == correct[it.index]["instruction"]
            own = correct[it.index]["output"]
            twin = irrelevant[it.index]["output"]
            expected = own if it.kind == "correct" else twin
            assert it.record["output"] == expected and (it.kind == "correct") == (expected == own)


def test_held_out_items_never_share_an_instruction_with_the_pool(shared_data: Path):
    cells = all_cells(shared_data)
    pool = build_pool(cells, 160, 0.3, seed=0)
    held_out, accuracy = build_eval(cells, 6, pool), build_accuracy(cells, 16, pool)
    assert len(held_out) == 16 * 6 and len(accuracy) == 4 * 16
    pool_instructions = {it.record["instruction"] for it in pool}
    for item in held_out + accuracy:
        assert item.record["instruction"] not in pool_instructions
        assert item.kind == "correct"
    for item in held_out:
        assert (
            item.record
            == read_records(
                next(c.correct for c in cells if (c.task, c.style) == (item.task, item.style))
            )[item.index]
        )
    gold = {("gsm8k", 499): read_records(shared_data / reasoning_file("gsm8k", "no_cot"))[499]}
    last_gsm8k = next(it for it in accuracy if it.task == "gsm8k" and it.index == 499)
    assert last_gsm8k.gold == gold["gsm8k", 499]["output"].strip().replace(",", "")


def test_a_pool_reaching_the_held_out_instructions_is_refused(shared_data: Path):
    cells = all_cells(shared_data)
    pool = build_pool(cells, 16 * 497, 0.3, seed=0)  # first 497 of each file
    with pytest.raises(SystemExit, match="also in the pool"):
        build_eval(cells, 6, pool)


# ---------------------------------------------------------------- answers of generated text


@pytest.mark.parametrize(
    ("task", "text", "instruction", "expected"),
    [
        ("gsm8k", "She pays 3 * 4 = 12 dollars, then 1,200 in all.", "", "1200"),
        ("gsm8k", "The answer is 7.50", "", "7.5"),
        ("gsm8k", "I cannot tell.", "", None),
        ("aqua", "(A) is too small, so the answer is (C)", "", "C"),
        ("aqua", "The answer is C", "", None),  # a letter without its parentheses is not read
        ("strategyqa", "Yes, fish swim. So the answer is no.", "", "no"),
        ("strategyqa", "Yes", "", "yes"),
        ("strategyqa", "Nobody knows", "", None),
        ("ecqa", "Not a river: a Fish Tank.", ECQA_INSTRUCTION, "fish tank"),
        ("ecqa", "Somewhere wet.", ECQA_INSTRUCTION, None),
    ],
)
def test_extract_answer_reads_the_last_answer_of_the_tasks_kind(
    task: str, text: str, instruction: str, expected: str | None
):
    assert extract_answer(task, text, instruction) == expected


# ---------------------------------------------------------------- summary


def test_differences_from_random_are_paired_by_item_and_seed_with_an_interval():
    from eval_selection import Item

    items = [Item({}, "gsm8k" if i < 3 else "aqua", "no_cot", i) for i in range(5)]
    random = {0: np.array([1.0, 2, 3, 4, 5]), 1: np.array([2.0, 2, 2, 2, 2])}
    loss = {0: np.array([0.5, 2, 2, 4, 4.5]), 1: np.array([1.0, 1, 1, 1, 5]), 2: np.ones(5)}
    values = {("random", s): v for s, v in random.items()}
    values |= {("loss", s): v for s, v in loss.items()}
    rows = summary_rows(values, items, "task", ["random", "loss"], versus_random=True)
    assert [(r["method"], r["seeds"]) for r in rows] == [("loss", "2")]  # seed 2 has no twin
    differences = ((loss[0] - random[0]) + (loss[1] - random[1])) / 2
    for group, part in [
        ("all", differences),
        ("gsm8k", differences[:3]),
        ("aqua", differences[3:]),
    ]:
        mean, interval = rows[0][group].split(" ", 1)
        low, high = (float(v) for v in interval.strip("[]").split(", "))
        assert float(mean) == pytest.approx(part.mean(), abs=5e-4)
        assert part.min() - 1e-3 <= low <= float(mean) <= high <= part.max() + 1e-3
    means = summary_rows(values, items, "task", ["loss"], versus_random=False)
    assert means[0]["seeds"] == "3"
    assert float(means[0]["all"].split()[0]) == pytest.approx(
        np.mean(list(loss.values())), abs=5e-4
    )


# ---------------------------------------------------------------- a tiny end-to-end run


@pytest.mark.slow
def test_tiny_run_selects_fine_tunes_evaluates_and_resumes(
    tiny_model: Callable[[str], Path], shared_data: Path, tmp_path: Path
):
    argv = [
        *("--model", str(tiny_model("llama")), "--template", "plain", "--work", str(tmp_path)),
        *("--pool-size", "32", "--k", "8", "--steps", "2", "--seeds", "0,1"),
        *("--max-length", "64", "--eval-per-cell", "1", "--accuracy-per-task", "2"),
        *("--new-tokens", "4", "--methods", "random,loss,flag,diverse,loss_within,flag_within"),
        *("--jobs", "2"),
    ]
    report = main(argv)
    args = parse_args(argv)
    results = report.parent
    assert results.name == setting_name(args) and results.parent.name == pool_name(args)
    pool = json.loads((results.parent / "pool.json").read_text())
    examples = pd.read_parquet(results.parent / "profile" / "examples")
    cells = all_cells(shared_data)  # two examples per cell, in cell order
    irrelevant = {
        i
        for i, record in enumerate(pool)
        if record["output"] != read_records(cells[i // 2].correct)[i % 2]["output"]
    }
    assert len(irrelevant) == 16 * round(0.3 * 2)
    runs = {}
    for method in ("base", "random", "loss", "flag", "diverse", "loss_within", "flag_within"):
        for seed in (0,) if method == "base" else (0, 1):
            runs[method, seed] = json.loads((results / f"{method}_seed{seed}.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("llama"))
    held_out = json.loads((results.parent / "held_out.json").read_text())
    seen = [any(v != -100 for v in encode(tokenizer, r, "plain", 64)[1][1:]) for r in held_out]
    assert 0 < sum(seen) < 16  # some responses lie past 64 tokens: no loss for them
    for (method, _), run in runs.items():
        assert len(run["loss"]) == 16 and len(run["correct"]) == 8
        assert list(np.isfinite(run["loss"])) == seen
        if method != "base":
            assert len(run["kept"]) == 8
            assert run["irrelevant_kept"] == np.mean([i in irrelevant for i in run["kept"]])
    lowest_loss = examples.sort_values(["loss", "example_index"])["example_index"][:8]
    assert runs["loss", 0]["kept"] == sorted(lowest_loss) == runs["loss", 1]["kept"]
    # Within each source file the better of its two scored examples has place 1/2 (the
    # files of long examples have none: truncated away at 64 tokens); k = 8 takes those 7,
    # then one of place 1, the lowest index (equal places go to the lower index).
    loss = examples.set_index("example_index")["loss"].dropna()
    files = sorted({i // 2 for i in loss.index})
    assert len(files) == 7 and len(loss) == 14
    best_of_file = [min((2 * f, 2 * f + 1), key=lambda i: (loss[i], i)) for f in files]
    expected = sorted([*best_of_file, min(set(loss.index) - set(best_of_file))])
    assert runs["loss_within", 0]["kept"] == expected == runs["loss_within", 1]["kept"]
    assert [record["cell"] for record in pool[::2]] == [c.correct.stem for c in cells]
    assert runs["random", 0]["kept"] != runs["random", 1]["kept"]
    assert runs["loss", 0]["loss"] != runs["loss", 1]["loss"]  # the seed moves training
    assert runs["base", 0]["loss"] != runs["random", 0]["loss"]  # fine-tuning changed the model
    text = report.read_text()
    assert "| random |" in text and "| flag |" in text and set(METHODS) >= {"flag", "diverse"}
    assert "no_cot kept (irrelevant)" in text and "wiki kept (irrelevant)" in text

    assert not list(results.glob(".*.tmp"))  # every result was renamed into place
    before = {p: p.stat().st_mtime_ns for p in results.glob("*_seed*.json")}
    main(argv)  # a rerun reads every result back
    assert {p: p.stat().st_mtime_ns for p in results.glob("*_seed*.json")} == before
    redone = results / "flag_within_seed1.json"
    redone.unlink()  # as if interrupted there: only that one is run again
    main([*argv[:-2], "--jobs", "1"])  # in this process, not in a one-thread worker
    again = json.loads(redone.read_text())
    assert again["kept"] == runs["flag_within", 1]["kept"]
    assert again["loss"] == pytest.approx(runs["flag_within", 1]["loss"], rel=1e-4, nan_ok=True)
    after = {p: p.stat().st_mtime_ns for p in results.glob("*_seed*.json")}
    assert after.keys() == before.keys() and after[redone] != before[redone]
    assert {p: t for p, t in after.items() if p != redone} == {
        p: t for p, t in before.items() if p != redone
    }
    main([*argv, "--seeds", "0,1,2", "--report-only"])  # seed 2 is reported, not trained
    assert {p: p.stat().st_mtime_ns for p in results.glob("*_seed*.json")} == after


@pytest.mark.slow
def test_learned_detector_selects_pooled_and_within_each_file(
    tiny_model: Callable[[str], Path], shared_data: Path, tmp_path: Path
):
    argv = [
        *("--model", str(tiny_model("llama")), "--template", "plain", "--work", str(tmp_path)),
        *("--pool-size", "96", "--k", "24", "--steps", "1", "--seeds", "0", "--jobs", "1"),
        *("--max-length", "128", "--eval-per-cell", "1", "--accuracy-per-task", "1"),
        *("--new-tokens", "2", "--methods", "learned,learned_within", "--learn-twins", "48"),
    ]
    report = main(argv)
    results, args = report.parent, parse_args(argv)
    profile = results.parent / "profile"
    learned = learn_flags(profile, sample=48, seed=args.pool_seed, device="cpu")
    assert learned.folder.parent == results.parent / "profile-twins"
    assert learned.summary["pairs"] >= 20
    probability = learned.ranking.set_index("example_index")["probability"]
    kept = json.loads((results / "learned_seed0.json").read_text())["kept"]
    expected = sorted(
        probability.to_frame()
        .reset_index()
        .sort_values(["probability", "example_index"])["example_index"][:24]
    )
    assert kept == expected
    pool = json.loads((results.parent / "pool.json").read_text())
    within = json.loads((results / "learned_within_seed0.json").read_text())["kept"]
    per_file = pd.Series([pool[i]["cell"] for i in within]).value_counts()
    scored_files = pd.Series([pool[i]["cell"] for i in probability.index]).value_counts()
    assert (
        len(within) == 24 and per_file.max() <= -(-24 * scored_files.max() // len(probability)) + 1
    )
    assert within != kept  # spread over the files, not the pooled lowest probabilities
    text = report.read_text()
    assert "| learned |" in text and "| learned_within |" in text
