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
  (responses of fewer than ``corruptions.MIN_TRUNCATE_WORDS`` words are not eligible).

``swapped`` and ``truncated`` are ``gradspec.corruptions``' own (the kinds ``gradspec flag
--learn`` corrupts a user's data with), the answer rules per task are shared with its
``wrong_answer``; ``irrelevant`` and the gold-answer ``wrong_answer`` need the shared
data's files. Everything is deterministic given the seed and the cell's task and style.
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

from gradspec.corruptions import (
    AnswerSpan,
    answer_spans,
    ecqa_options,
    normalise_gold,
    swapped,
    truncated,
    wrong_answer_text,
)
from gradspec.labels import CORRECTNESS
from gradspec.shared_data import REASONING_TASKS, math_file, reasoning_file, wiki_file

KINDS = ("irrelevant", "swapped", "wrong_answer", "truncated")
ANSWER_TASKS = REASONING_TASKS  # each has a final answer to corrupt
# Most constrained kinds pick their instructions first, so that each gets its share.
PICK_ORDER = ("wrong_answer", "truncated", "irrelevant", "swapped")


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


def math_cell(data: Path, subject: str, style: str) -> CellFiles:
    """A MATH subject in one style; no answer-only file, so no gold answers."""
    return CellFiles(
        subject,
        style,
        data / math_file(subject, style),
        data / math_file(subject, style, CORRECTNESS[1]),
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


# ---------------------------------------------------------------- answers per task


def extract_answer(task: str, text: str, instruction: str) -> str | None:
    """The answer a (generated) response gives: its last candidate of the task's kind,
    normalised as ``normalise_gold`` normalises the gold answer; None if it states none."""
    spans = answer_spans(task, text, instruction)
    return spans[-1].value if spans else None


def final_answer_span(task: str, response: str, instruction: str, gold: str) -> AnswerSpan | None:
    """The last statement of the gold answer in the response, or None if it never states it."""
    wanted = normalise_gold(task, gold)
    matches = [s for s in answer_spans(task, response, instruction) if s.value == wanted]
    return matches[-1] if matches else None


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
        cut = {i: truncated(record["output"], (), rng) for i, record in enumerate(mix)}
        found["truncated"] = {i: {**mix[i], "output": out} for i, out in cut.items() if out}
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
    donors = [pool[int(d)]["output"] for d in rng.permutation(len(pool))]
    found = {}
    for i, record in enumerate(mix):
        response = swapped(record["output"], donors, rng)
        if response is not None:
            donors.remove(response)
            found[i] = {**record, "output": response}
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
