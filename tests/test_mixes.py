"""Corruption kinds of the data-quality mixes: answer rules per task, labels, determinism."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from mixes import KINDS, CellFiles, build_mix, final_answer_span, with_wrong_answer

from gradspec.corruptions import answer_spans, ecqa_options, truncated

AQUA_INSTRUCTION = (
    "The average of 9 results is 50. What is the fifth result?"
    "\\nOptions:\\n(A) 22\\n(B) 27\\n(C) 29\\n(D) 46\\n(E) 92"
)
ECQA_INSTRUCTION = (
    "Knitting for a long time can lead to what condition?\\nOptions:\\n- bleeding"
    "\\n- have fun\\n- relaxation\\n- carpal tunnel syndrome\\n- sore hands"
)


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------- answers per task


def test_gsm8k_numbers_are_normalised_and_the_last_gold_mention_is_final():
    response = "He has 1,000.00 dollars and 20 bottles: 20 in all.\nThe final answer is 20"
    values = [s.value for s in answer_spans("gsm8k", response, "")]
    assert values == ["1000", "20", "20", "20"]
    span = final_answer_span("gsm8k", response, "", "20")
    assert response[span.start :] == "20"
    assert final_answer_span("gsm8k", "Step 2 gives 1,000 in total.", "", "1000").value == "1000"
    assert final_answer_span("gsm8k", "The answer is 21", "", "20") is None


def test_gsm8k_wrong_answer_changes_only_the_final_number_and_keeps_its_decimals():
    record = {"instruction": "q", "input": "", "output": "85 + 17 = 102.00, so \\boxed{102.00} ok"}
    changed = with_wrong_answer("gsm8k", record, "102", rng())["output"]
    new = re.fullmatch(r"85 \+ 17 = 102\.00, so \\boxed\{(\d+\.00)\} ok", changed).group(1)
    assert 0 < abs(float(new) - 102) < 10


def test_aqua_letter_and_its_option_text_change_together():
    record = {"instruction": AQUA_INSTRUCTION, "input": "", "output": "x = 46\nSo:\n(D) 46\n"}
    changed = with_wrong_answer("aqua", record, "(D)", rng())["output"]
    letter, text = re.search(r"So:\n\(([A-E])\) (\d+)\n$", changed).groups()
    assert letter != "D"
    assert text == {"A": "22", "B": "27", "C": "29", "E": "92"}[letter]
    assert changed.startswith("x = 46\nSo:\n(")
    plain = {**record, "output": "(A) is wrong.\nThe final answer is (D)"}
    changed = with_wrong_answer("aqua", plain, "(D)", rng())["output"]
    assert changed.startswith("(A) is wrong.\nThe final answer is (")
    assert re.fullmatch(r"\([ABCE]\)", changed.rsplit(" ", 1)[1])


def test_ecqa_options_are_parsed_and_the_answer_becomes_another_option():
    assert ecqa_options(ECQA_INSTRUCTION) == [
        "bleeding",
        "have fun",
        "relaxation",
        "carpal tunnel syndrome",
        "sore hands",
    ]
    output = (
        "It leads to Carpal Tunnel Syndrome, not sore hands.\nAnswer: **Carpal Tunnel Syndrome**"
    )
    record = {"instruction": ECQA_INSTRUCTION, "input": "", "output": output}
    changed = with_wrong_answer("ecqa", record, "carpal tunnel syndrome", rng())["output"]
    head, tail = changed.split("Answer: **")
    assert head == "It leads to Carpal Tunnel Syndrome, not sore hands.\n"
    new = tail.removesuffix("**")
    assert new.lower() in {"bleeding", "have fun", "relaxation", "sore hands"}
    assert new == new.title()


def test_strategyqa_flips_the_stated_yes_or_no_keeping_its_case():
    record = {"instruction": "q", "input": "", "output": "No, it did not.\nThe final answer is no"}
    assert with_wrong_answer("strategyqa", record, "no", rng())["output"] == (
        "No, it did not.\nThe final answer is yes"
    )
    record = {"instruction": "q", "input": "", "output": "No, Secretariat did not win."}
    assert with_wrong_answer("strategyqa", record, "no", rng())["output"] == (
        "Yes, Secretariat did not win."
    )
    record = {"instruction": "q", "input": "", "output": "There is no evidence of it."}
    assert with_wrong_answer("strategyqa", record, "no", rng()) is None


def test_truncation_keeps_a_word_prefix_of_30_to_70_percent():
    words = [f"w{i}" for i in range(20)]
    record = {"instruction": "q", "input": "", "output": " ".join(words)}
    for seed in range(20):
        cut = truncated(record["output"], (), np.random.default_rng(seed))
        kept = cut.split(" ")
        assert kept == words[: len(kept)] and 6 <= len(kept) <= 14
    assert truncated("too short to cut", (), rng()) is None


# ---------------------------------------------------------------- the mix


def write(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def cell(tmp_path: Path) -> CellFiles:
    """A GSM8K-like cell of 40 instructions: CoT, irrelevant twins and gold answers."""
    n = 40
    questions = [f"Question {i}: how many apples?" for i in range(n)]
    cot = [
        f"Start with {i} apples and add {i + 1} more, one by one.\nThe final answer is {2 * i + 1}"
        for i in range(n)
    ]
    record = lambda q, out: {"instruction": q, "input": "", "output": out}  # noqa: E731
    return CellFiles(
        "gsm8k",
        "with_cot",
        write(tmp_path / "c.json", [record(q, o) for q, o in zip(questions, cot, strict=True)]),
        write(
            tmp_path / "i.json",
            [record(q, f"Unrelated text {i}.") for i, q in enumerate(questions)],
        ),
        write(tmp_path / "a.json", [record(q, str(2 * i + 1)) for i, q in enumerate(questions)]),
    )


def test_mix_labels_each_corruption_and_keeps_the_rest(cell: CellFiles):
    correct = json.loads(cell.correct.read_text())
    mix = build_mix(cell, KINDS, 0.5, seed=3, limit=16)
    assert [m.index for m in mix] == list(range(16))
    kinds = [m.kind for m in mix]
    assert sorted(kinds.count(k) for k in KINDS) == [2, 2, 2, 2] and kinds.count("correct") == 8
    instructions = [m.record["instruction"] for m in mix]
    assert instructions == [r["instruction"] for r in correct[:16]]
    assert len(set(instructions)) == 16
    outputs = [m.record["output"] for m in mix]
    assert len(set(outputs)) == 16
    for m in mix:
        own = correct[m.index]["output"]
        if m.kind == "correct":
            assert m.record["output"] == own
        elif m.kind == "irrelevant":
            assert m.record["output"] == f"Unrelated text {m.index}."
        elif m.kind == "swapped":
            assert m.record["output"] in [r["output"] for r in correct[16:]]
        elif m.kind == "wrong_answer":
            assert m.record["output"].rsplit(" ", 1)[0] == own.rsplit(" ", 1)[0]
            assert m.record["output"].rsplit(" ", 1)[1] != str(2 * m.index + 1)
        else:
            assert own.startswith(m.record["output"]) and len(m.record["output"]) < len(own)


def test_mix_is_deterministic_by_seed(cell: CellFiles):
    first = build_mix(cell, KINDS, 0.5, seed=1, limit=16)
    assert first == build_mix(cell, KINDS, 0.5, seed=1, limit=16)
    assert first != build_mix(cell, KINDS, 0.5, seed=2, limit=16)


def test_kinds_without_candidates_leave_the_share_to_the_others(cell: CellFiles):
    no_answers = CellFiles(cell.task, "wiki", cell.correct, cell.irrelevant)
    mix = build_mix(no_answers, KINDS, 0.5, seed=0, limit=12)
    kinds = [m.kind for m in mix]
    assert "wrong_answer" not in kinds and kinds.count("correct") == 6
    assert sorted(kinds.count(k) for k in ("irrelevant", "swapped", "truncated")) == [2, 2, 2]


def test_invisible_corruptions_are_not_picked(cell: CellFiles):
    late_change = lambda original, bad: original["output"][:40] != bad["output"][:40]  # noqa: E731
    mix = build_mix(cell, ["wrong_answer", "swapped"], 0.5, seed=0, limit=12, visible=late_change)
    kinds = [m.kind for m in mix]
    assert kinds.count("wrong_answer") == 0 and kinds.count("swapped") == 6


def test_a_kind_short_of_candidates_leaves_its_part_to_the_others(cell: CellFiles):
    def visible(original: dict[str, str], bad: dict[str, str]) -> bool:
        """Every swapped response, only the first instruction's changed answer."""
        same_start = bad["output"][:20] == original["output"][:20]
        return not same_start or original["instruction"].startswith("Question 0:")

    mix = build_mix(cell, ["wrong_answer", "swapped"], 0.5, seed=0, limit=12, visible=visible)
    kinds = [m.kind for m in mix]
    assert kinds[0] == "wrong_answer" and kinds.count("wrong_answer") == 1
    assert kinds.count("correct") == 6 and kinds.count("swapped") == 5


def test_unknown_kind_is_refused(cell: CellFiles):
    with pytest.raises(ValueError, match="unknown corruption kinds"):
        build_mix(cell, ["garbled"], 0.5, seed=0, limit=4)
