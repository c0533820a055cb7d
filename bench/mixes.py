"""Labelled data-quality mixes: correct responses with a share of corrupted ones.

Every corruption is built from the shared data's own files, so the bad responses are as
fluent as the good ones and only their relation to the instruction is wrong:

- ``irrelevant``: the shared ``irrelevant/`` twin at the same index (for ``no_cot`` the
  answer of another instruction; for the CoT styles sentences stitched from other
  responses).
- ``swapped``: the whole, coherent correct response of another instruction of the same
  task and style (taken from records outside the mix, so no response appears twice).
- ``wrong_answer``: the correct chain of thought with its final answer changed: the last
  mention of the gold answer (the task's ``no_cot`` response) is replaced by another
  number (GSM8K), option (AQuA letter and option text, ECQA option text) or yes/no
  (StrategyQA). Instructions whose response never states the gold answer are not eligible;
  the Wikipedia sets have no final answer.
- ``truncated``: the response cut at a word boundary between 30% and 70% of its words
  (responses of fewer than ``MIN_TRUNCATE_WORDS`` words are not eligible).

Everything is deterministic given the seed and the cell's task and style.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradspec.labels import CORRECTNESS
from gradspec.shared_data import REASONING_TASKS, reasoning_file, wiki_file

KINDS = ("irrelevant", "swapped", "wrong_answer", "truncated")
ANSWER_TASKS = REASONING_TASKS  # each has a final answer to corrupt
MIN_TRUNCATE_WORDS = 8
# Most constrained kinds pick their instructions first, so that each gets its share.
PICK_ORDER = ("wrong_answer", "truncated", "irrelevant", "swapped")

NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
OPTION_LETTER = re.compile(r"\(([A-E])\)")
YES_NO = re.compile(r"\b(yes|no)\b(?=\s*[.,;:!*\"')\]]|\s*$)", re.IGNORECASE | re.MULTILINE)
OPTIONS_BLOCK = re.compile(r"Options:(?:\\n|\n)(.*)$", re.DOTALL)


@dataclass(frozen=True)
class CellFiles:
    """One task and style: its correct and irrelevant files and the gold answers."""

    task: str
    style: str
    correct: Path
    irrelevant: Path
    answers: Path | None = None  # the task's no_cot file (gold final answers); None: no answers


def reasoning_cell(data: Path, task: str, style: str) -> CellFiles:
    """A reasoning task in one style (a file suffix), gold answers from its answer-only file."""
    return CellFiles(
        task,
        style,
        data / reasoning_file(task, style),
        data / reasoning_file(task, style, CORRECTNESS[1]),
        data / reasoning_file(task, "no_cot"),
    )


def wiki_cell(data: Path, name: str) -> CellFiles:
    """A Wikipedia set (style 'wiki'); no gold answers."""
    return CellFiles(name, "wiki", data / wiki_file(name), data / wiki_file(name, CORRECTNESS[1]))


@dataclass(frozen=True)
class MixExample:
    """One record of a mix and how it was made."""

    record: dict[str, str]
    kind: str  # "correct" or one of KINDS
    index: int  # position of the instruction in the correct file


@dataclass(frozen=True)
class AnswerSpan:
    """Where a candidate final answer is stated in a response, and its normalised value."""

    start: int
    end: int
    value: str


# ---------------------------------------------------------------- answers per task


def answer_spans(task: str, response: str, instruction: str) -> list[AnswerSpan]:
    """Every place the response states a candidate answer of the task's kind, in order."""
    if task == "gsm8k":
        return [
            AnswerSpan(m.start(), m.end(), normalise_number(m.group()))
            for m in NUMBER.finditer(response)
        ]
    if task == "aqua":
        return [
            AnswerSpan(m.start(), m.end(), m.group(1)) for m in OPTION_LETTER.finditer(response)
        ]
    if task == "strategyqa":
        return [
            AnswerSpan(m.start(), m.end(), m.group(1).lower()) for m in YES_NO.finditer(response)
        ]
    if task == "ecqa":
        return option_text_spans(response, ecqa_options(instruction))
    raise ValueError(f"no final answer rule for task {task!r}")


def extract_answer(task: str, text: str, instruction: str) -> str | None:
    """The answer a (generated) response gives: its last candidate of the task's kind,
    normalised as ``normalise_gold`` normalises the gold answer; None if it states none."""
    spans = answer_spans(task, text, instruction)
    return spans[-1].value if spans else None


def normalise_number(text: str) -> str:
    """'1,000.00' -> '1000', '-2.50' -> '-2.5': one spelling per value."""
    value = float(text.replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


def normalise_gold(task: str, gold: str) -> str:
    """The no_cot response as the value ``answer_spans`` gives for it."""
    gold = gold.strip()
    if task == "gsm8k":
        return normalise_number(gold)
    if task == "aqua":
        return gold.strip("()")
    return gold.lower()


def ecqa_options(instruction: str) -> list[str]:
    """The options listed after 'Options:' (one per '- ' line; the data escape newlines)."""
    block = OPTIONS_BLOCK.search(instruction)
    if block is None:
        return []
    lines = re.split(r"\\n|\n", block.group(1))
    return [line[2:].strip() for line in lines if line.startswith("- ")]


def option_text_spans(response: str, options: Sequence[str]) -> list[AnswerSpan]:
    """Case-insensitive whole-word mentions of the options, in order of position."""
    spans = []
    for option in options:
        pattern = re.compile(rf"(?<!\w){re.escape(option)}(?!\w)", re.IGNORECASE)
        spans += [
            AnswerSpan(m.start(), m.end(), option.lower()) for m in pattern.finditer(response)
        ]
    return sorted(spans, key=lambda s: (s.start, -s.end))


def final_answer_span(task: str, response: str, instruction: str, gold: str) -> AnswerSpan | None:
    """The last statement of the gold answer in the response, or None if it never states it."""
    wanted = normalise_gold(task, gold)
    matches = [s for s in answer_spans(task, response, instruction) if s.value == wanted]
    return matches[-1] if matches else None


def wrong_answer_text(
    task: str, stated: str, gold: str, instruction: str, rng: np.random.Generator
) -> str:
    """A different answer written the way ``stated`` (the response's own text) writes it."""
    if task == "gsm8k":
        value = float(normalise_gold(task, gold))
        step = int(rng.integers(1, 10))
        wrong = value + step if value - step < 0 or rng.random() < 0.5 else value - step
        decimals = len(stated.split(".")[1]) if "." in stated else 0
        return f"{wrong:.{decimals}f}"
    if task == "aqua":
        letters = [c for c in "ABCDE" if c != normalise_gold(task, gold)]
        return f"({rng.choice(letters)})"
    if task == "strategyqa":
        flipped = "no" if stated.lower() == "yes" else "yes"
        return flipped.capitalize() if stated[0].isupper() else flipped
    if task == "ecqa":
        others = [o for o in ecqa_options(instruction) if o.lower() != gold.strip().lower()]
        wrong = str(rng.choice(others))
        return wrong.title() if stated.istitle() and not stated.islower() else wrong
    raise ValueError(f"no final answer rule for task {task!r}")


def with_wrong_answer(
    task: str, record: dict[str, str], gold: str, rng: np.random.Generator
) -> dict[str, str] | None:
    """The record with its final answer changed, or None when the response never states it."""
    response, instruction = record["output"], record["instruction"]
    span = final_answer_span(task, response, instruction, gold)
    if span is None or (task == "ecqa" and len(ecqa_options(instruction)) < 2):
        return None
    stated = response[span.start : span.end]
    wrong = wrong_answer_text(task, stated, gold, instruction, rng)
    end = span.end
    if task == "aqua":
        end = aqua_option_text_end(response, span, instruction, stated)
        wrong = f"{wrong} {aqua_option_text(instruction, wrong[1])}" if end > span.end else wrong
    return {**record, "output": response[: span.start] + wrong + response[end:]}


def aqua_option_text(instruction: str, letter: str) -> str:
    """The text of option ``letter`` in an AQuA instruction ('(D) 46' -> '46')."""
    match = re.search(rf"\({letter}\)\s*(.*?)(?:\\n|\n|$)", instruction)
    return match.group(1).strip() if match else ""


def aqua_option_text_end(response: str, span: AnswerSpan, instruction: str, stated: str) -> int:
    """End of '(D) 46' when the letter is followed by its option text, else of '(D)'."""
    text = aqua_option_text(instruction, stated[1])
    following = response[span.end :]
    if text and following.startswith(" " + text):
        return span.end + 1 + len(text)
    return span.end


# ---------------------------------------------------------------- the other corruptions


def truncated(record: dict[str, str], rng: np.random.Generator) -> dict[str, str] | None:
    """The response cut after 30-70% of its words, or None when it is too short to cut."""
    words = list(re.finditer(r"\S+", record["output"]))
    if len(words) < MIN_TRUNCATE_WORDS:
        return None
    keep = int(rng.integers(round(0.3 * len(words)), round(0.7 * len(words)) + 1))
    return {**record, "output": record["output"][: words[keep - 1].end()]}


# ---------------------------------------------------------------- the mix


def read_records(path: Path) -> list[dict[str, str]]:
    """An Alpaca JSON array of the shared data."""
    return json.loads(Path(path).read_text())


def cell_rng(seed: int, files: CellFiles) -> np.random.Generator:
    """A generator that depends on the seed and the cell, not on the order cells are built."""
    return np.random.default_rng([seed, zlib.crc32(f"{files.task}/{files.style}".encode())])


def build_mix(
    files: CellFiles,
    kinds: Sequence[str],
    share: float,
    seed: int,
    limit: int,
    visible: Callable[[dict[str, str], dict[str, str]], bool] | None = None,
) -> list[MixExample]:
    """The first ``limit`` instructions, a ``share`` of them corrupted, split evenly among
    the ``kinds`` that apply to the cell (a kind short of candidates leaves its part to the
    kinds picked after it); the rest keep their correct response.

    ``visible(original, corrupted)`` can exclude corruptions the model would not see (e.g.
    a changed answer past the maximum length).
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown corruption kinds {unknown}; use {', '.join(KINDS)}")
    correct = read_records(files.correct)
    mix = correct[:limit]
    rng = cell_rng(seed, files)
    candidates = corrupted_candidates(files, correct, limit, kinds, rng)
    if visible is not None:
        candidates = {
            kind: {i: bad for i, bad in found.items() if visible(mix[i], bad)}
            for kind, found in candidates.items()
        }
    applicable = [k for k in PICK_ORDER if k in kinds and candidates[k]]
    wanted = round(share * len(mix))
    assigned: dict[int, tuple[str, dict[str, str]]] = {}
    for position, kind in enumerate(applicable):
        quota = -(-(wanted - len(assigned)) // (len(applicable) - position))
        free = [i for i in sorted(candidates[kind]) if i not in assigned]
        for i in rng.permutation(free)[:quota]:
            assigned[int(i)] = kind, candidates[kind][int(i)]
    return [
        MixExample(assigned[i][1], assigned[i][0], i)
        if i in assigned
        else MixExample(record, "correct", i)
        for i, record in enumerate(mix)
    ]


def corrupted_candidates(
    files: CellFiles,
    correct: list[dict[str, str]],
    limit: int,
    kinds: Sequence[str],
    rng: np.random.Generator,
) -> dict[str, dict[int, dict[str, str]]]:
    """For each kind, the corrupted record of every mix instruction it can corrupt."""
    mix = correct[:limit]
    found: dict[str, dict[int, dict[str, str]]] = {kind: {} for kind in KINDS}
    if "irrelevant" in kinds:
        found["irrelevant"] = irrelevant_twins(mix, read_records(files.irrelevant))
    if "swapped" in kinds:
        found["swapped"] = swapped_responses(mix, correct[limit:], rng)
    if "wrong_answer" in kinds and files.answers is not None and files.task in ANSWER_TASKS:
        found["wrong_answer"] = wrong_answers(files.task, mix, read_records(files.answers), rng)
    if "truncated" in kinds:
        cut = {i: truncated(record, rng) for i, record in enumerate(mix)}
        found["truncated"] = {i: record for i, record in cut.items() if record is not None}
    return found


def irrelevant_twins(
    mix: list[dict[str, str]], twins: list[dict[str, str]]
) -> dict[int, dict[str, str]]:
    """The irrelevant file's response for each instruction it lists at the same index."""
    return {
        i: {**record, "output": twin["output"]}
        for i, (record, twin) in enumerate(zip(mix, twins, strict=False))
        if twin["instruction"] == record["instruction"] and twin["output"] != record["output"]
    }


def swapped_responses(
    mix: list[dict[str, str]], pool: list[dict[str, str]], rng: np.random.Generator
) -> dict[int, dict[str, str]]:
    """Each instruction with a different response drawn, without replacement, from ``pool``."""
    donors = [int(d) for d in rng.permutation(len(pool))]
    found = {}
    for i, record in enumerate(mix):
        donor = next((d for d in donors if pool[d]["output"] != record["output"]), None)
        if donor is not None:
            donors.remove(donor)
            found[i] = {**record, "output": pool[donor]["output"]}
    return found


def wrong_answers(
    task: str, mix: list[dict[str, str]], gold: list[dict[str, str]], rng: np.random.Generator
) -> dict[int, dict[str, str]]:
    """Each instruction whose response states its gold answer, with that answer changed."""
    found = {}
    for i, record in enumerate(mix):
        if i < len(gold) and gold[i]["instruction"] == record["instruction"]:
            changed = with_wrong_answer(task, record, gold[i]["output"], rng)
            if changed is not None:
                found[i] = changed
    return found


def write_json(records: list[dict[str, Any]], path: Path) -> None:
    """Write a JSON array, leaving an identical file untouched (runs hash their data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(records, indent=1)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
