"""Corruptions of a response: a registry of the ways to make a bad twin of a good example.

Each corruption keeps the instruction and changes only the response, so the twin is as
fluent as the original and only its relation to the instruction is wrong. A corruption is
one registered function ``corrupt(response, donors, rng)`` that returns the corrupted
response, or None where it does not apply (``donors``: responses of other examples of the
same data, in random order):

- ``stitched``: sentences drawn from the donors, as many as the response has (the shared
  data's ``irrelevant/`` responses of the CoT styles are built this way);
- ``swapped``: the first donor that differs from the response (a whole, coherent answer to
  another instruction);
- ``wrong_answer``: the last stated answer changed: a number (by 1 to 9), an option letter
  ``(A)``-``(E)`` (to another) or a final yes / no (flipped); not eligible without one;
- ``truncated``: cut at a word boundary after 30-70% of its words (responses of fewer than
  ``MIN_TRUNCATE_WORDS`` words are not eligible).

A new kind is one more entry of ``CORRUPTIONS``. The answer rules per task (GSM8K numbers,
AQuA letters, StrategyQA yes / no, ECQA option texts) are shared with the benchmarks'
gold-answer corruption (``bench/mixes.py``). ``corrupted_twins`` builds the twins of a
sample of examples, deterministically given a seed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import Example
from .errors import GradspecError

MIN_TRUNCATE_WORDS = 8
DONORS = 16  # responses of other examples offered to each corruption
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
OPTION_LETTER = re.compile(r"\(([A-E])\)")
YES_NO = re.compile(r"\b(yes|no)\b(?=\s*[.,;:!*\"')\]]|\s*$)", re.IGNORECASE | re.MULTILINE)
OPTIONS_BLOCK = re.compile(r"Options:(?:\\n|\n)(.*)$", re.DOTALL)
SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
# The task whose answer rule reads each kind of generic final answer (``wrong_answer``).
ANSWER_RULES = ("gsm8k", "aqua", "strategyqa")


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


# ---------------------------------------------------------------- the corruptions


def stitched(response: str, donors: Sequence[str], rng: np.random.Generator) -> str | None:
    """As many sentences as the response has, drawn from the donors (None without any)."""
    pieces = [s.strip() for donor in donors for s in SENTENCE.findall(donor) if s.strip()]
    if not pieces:
        return None
    wanted = max(1, len([s for s in SENTENCE.findall(response) if s.strip()]))
    return " ".join(pieces[int(i)] for i in rng.integers(0, len(pieces), size=wanted))


def swapped(response: str, donors: Sequence[str], rng: np.random.Generator) -> str | None:
    """The first donor that differs from the response (None if none does)."""
    return next((donor for donor in donors if donor != response), None)


def wrong_final_answer(
    response: str, donors: Sequence[str], rng: np.random.Generator
) -> str | None:
    """The last number, option letter or yes / no of the response changed (None without)."""
    spans = [(span, task) for task in ANSWER_RULES for span in answer_spans(task, response, "")]
    if not spans:
        return None
    span, task = max(spans, key=lambda found: (found[0].end, -found[0].start))
    stated = response[span.start : span.end]
    wrong = wrong_answer_text(task, stated, stated, "", rng)
    return response[: span.start] + wrong + response[span.end :]


def truncated(response: str, donors: Sequence[str], rng: np.random.Generator) -> str | None:
    """The response cut after 30-70% of its words, or None when it is too short to cut."""
    words = list(re.finditer(r"\S+", response))
    if len(words) < MIN_TRUNCATE_WORDS:
        return None
    keep = int(rng.integers(round(0.3 * len(words)), round(0.7 * len(words)) + 1))
    return response[: words[keep - 1].end()]


Corrupt = Callable[[str, Sequence[str], np.random.Generator], "str | None"]
CORRUPTIONS: dict[str, Corrupt] = {
    "stitched": stitched,
    "swapped": swapped,
    "wrong_answer": wrong_final_answer,
    "truncated": truncated,
}


# ---------------------------------------------------------------- twins of a data set


@dataclass(frozen=True)
class Twin:
    """A corrupted copy of one example: which example, how, and the record to profile."""

    example_index: int
    kind: str
    record: dict[str, Any]


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """The kinds, after refusing an empty list or a name the registry does not hold."""
    unknown = [kind for kind in kinds if kind not in CORRUPTIONS]
    if unknown or not kinds:
        raise GradspecError(f"--kinds {','.join(kinds)}: use some of {', '.join(CORRUPTIONS)}")
    return list(kinds)


def twin_record(example: Example, response: str) -> dict[str, Any]:
    """The example's prompt turns with another response, as a chat record (same prompt)."""
    return {"messages": [*example.prompt_messages(), {"role": "assistant", "content": response}]}


def corrupted_twins(
    examples: Sequence[Example], kinds: Sequence[str], sample: int, seed: int
) -> list[Twin]:
    """One twin for each of ``sample`` examples drawn at random, the kinds taken in turn
    (an example a kind cannot corrupt goes to the next kind that can; one none can is
    left out). The same examples, kinds and seed give the same twins."""
    kinds = check_kinds(kinds)
    rng = np.random.default_rng(seed)
    responses = [example.response for example in examples]
    order = rng.permutation(len(examples))
    twins: list[Twin] = []
    for position in order:
        if len(twins) == sample:
            break
        example = examples[int(position)]
        donors = [responses[int(i)] for i in rng.integers(0, len(examples), size=DONORS)]
        donors = [d for d in donors if d != example.response]
        first = len(twins) % len(kinds)
        for kind in (*kinds[first:], *kinds[:first]):
            changed = CORRUPTIONS[kind](example.response, donors, rng)
            if changed is not None and changed.strip() and changed != example.response:
                twins.append(Twin(example.index, kind, twin_record(example, changed)))
                break
    return twins
