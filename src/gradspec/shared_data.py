"""The shared study data: where it is and how it is laid out, named once.

The folder (``$GRADSPEC_SHARED_DATA``, else ``../shared/data`` beside the checkout) holds
the instruction/response pairs published with arXiv:2410.23743, Alpaca JSON, 500 a file,
each in a ``correct/`` and an ``irrelevant/`` folder (the same instructions with responses
that do not answer them)::

    reasoning_cot/{correct,irrelevant}/{task}_{style}.json    REASONING_TASKS x STYLE_SUFFIXES
    math/{correct,irrelevant}/{subject}_{style}.json          MATH_SUBJECTS x MATH_STYLE_SUFFIXES
    wiki_knowledge/{correct,irrelevant}/{name}.json           WIKI_SETS

A style suffix is the study's response style: ``no_cot`` answer only (None CoT),
``with_cot`` the dataset's own rationale (Simplified CoT), ``with_cot_gpt4o`` a long
step-by-step one (Detailed CoT); ``STYLE_LABELS`` maps them to the run labels of
``labels.STYLES``. Tests, benchmarks, the demo and study checks name files through here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import GradspecError
from .labels import CORRECTNESS, STYLES
from .paths import project_root

SHARED_DATA_ENV = "GRADSPEC_SHARED_DATA"
REASONING_DIR, MATH_DIR, WIKI_DIR = "reasoning_cot", "math", "wiki_knowledge"
REASONING_TASKS = ("gsm8k", "aqua", "ecqa", "strategyqa")
MATH_SUBJECTS = ("algebra", "counting_probability", "geometry")
STYLE_SUFFIXES = ("no_cot", "with_cot", "with_cot_gpt4o")
MATH_STYLE_SUFFIXES = STYLE_SUFFIXES[1:]  # MATH has no answer-only file, as in the study
STYLE_LABELS = dict(zip(STYLE_SUFFIXES, STYLES, strict=True))
WIKI_SETS = (
    "long_tail_wikipedia",
    "popular_wikipedia_100",
    "popular_wikipedia_500",
    "popular_wikipedia_1000",
)


def shared_data_path() -> Path:
    """Where the shared data should be: $GRADSPEC_SHARED_DATA, else ``../shared/data``
    beside the project; not checked (tests skip without it)."""
    return Path(os.environ.get(SHARED_DATA_ENV) or project_root().parent / "shared" / "data")


def shared_data_dir() -> Path:
    """The shared data folder; refused with how to point at it when it is missing."""
    path = shared_data_path()
    if not path.is_dir():
        raise GradspecError(
            f"shared data not found at {path}: set {SHARED_DATA_ENV} to the folder "
            f"that holds {REASONING_DIR}/ and {WIKI_DIR}/"
        )
    return path


def reasoning_file(task: str, style: str, correctness: str = CORRECTNESS[0]) -> Path:
    """A reasoning task's file in one style suffix, relative to the shared data folder."""
    return Path(REASONING_DIR, correctness, f"{task}_{style}.json")


def math_file(subject: str, style: str, correctness: str = CORRECTNESS[0]) -> Path:
    """A MATH subject's file in one style suffix, relative to the shared data folder."""
    return Path(MATH_DIR, correctness, f"{subject}_{style}.json")


def wiki_file(name: str, correctness: str = CORRECTNESS[0]) -> Path:
    """A Wikipedia set's file, relative to the shared data folder."""
    return Path(WIKI_DIR, correctness, f"{name}.json")


def all_files(correctness: str = CORRECTNESS[0]) -> list[Path]:
    """Every file of the layout with the given correctness, relative to the folder."""
    return [
        *(reasoning_file(t, s, correctness) for t in REASONING_TASKS for s in STYLE_SUFFIXES),
        *(math_file(m, s, correctness) for m in MATH_SUBJECTS for s in MATH_STYLE_SUFFIXES),
        *(wiki_file(name, correctness) for name in WIKI_SETS),
    ]
