"""The fast-vs-slow study's three findings, checked on labelled runs with CIs.

Each run carries labels (labels.py): ``model``, ``task``, ``domain`` (reasoning or
knowledge), ``style`` (none, simplified or detailed chain of thought, for reasoning),
``correctness`` (correct or irrelevant responses to the same instructions) and ``length``
(the response length of a knowledge set). A finding is checked on every (model, task)
whose runs exist, on the nuclear norms of the study's modules, and says which runs it
still needs. A comparison holds when the bootstrap interval of its difference lies above
zero, does not hold when it lies below, and is inconclusive otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .analysis import (
    Curves,
    Estimate,
    LayerValues,
    bootstrap,
    mad,
    mean_relative_difference,
    paired,
    permutation_test,
)
from .errors import GradspecError
from .labels import CORRECTNESS, describe
from .runs import STUDY_MODULES, Run, select

FINDING_STATISTIC = "nuclear_norm"


def comparison_modules(runs: Sequence[Run]) -> list[str]:
    """The study's modules that all runs have; all their common modules if none of those."""
    common = set.intersection(*(set(r.modules()) for r in runs))
    study = [m for m in STUDY_MODULES if m in common]
    return study or sorted(common)


@dataclass
class Finding:
    """One claim of the study and how it fares: a row per comparison, and missing runs."""

    number: int
    claim: str
    method: str
    table: pd.DataFrame
    missing: list[str]

    def status(self) -> str:
        """holds, does not hold (in every comparison), mixed, or not evaluable."""
        verdicts = set(self.table["verdict"]) if not self.table.empty else set()
        if not verdicts:
            return "not evaluable"
        return verdicts.pop() if verdicts in ({"holds"}, {"does not hold"}) else "mixed"

    def summary(self) -> str:
        """One sentence: how many comparisons hold, and what is not evaluable."""
        parts = []
        if not self.table.empty:
            counts = self.table["verdict"].value_counts()
            parts.append(
                "; ".join(
                    f"{verdict} in {counts[verdict]} of {len(self.table)}"
                    for verdict in ("holds", "does not hold", "inconclusive")
                    if verdict in counts
                )
            )
        if self.missing:
            parts.append(
                "not evaluable" + (" elsewhere" if parts else "") + ": " + "; ".join(self.missing)
            )
        return ". ".join(parts)


# ---------------------------------------------------------------- curve summaries


def level(curves: Curves) -> Any:
    """Mean over modules of a curve's mean over layers."""
    return np.mean([c.mean(axis=-1) for c in curves], axis=0)


def mean_mad(curves: Curves) -> Any:
    """Mean over modules of each curve's MAD over all layers."""
    return np.mean([mad(c) for c in curves], axis=0)


def verdict(estimate: Estimate, columns: Sequence[int]) -> str:
    """'holds' if every listed difference is above zero, 'does not hold' if one is below."""
    low, high = np.asarray(estimate.low)[list(columns)], np.asarray(estimate.high)[list(columns)]
    if (high < 0).any():
        return "does not hold"
    return "holds" if (low > 0).all() else "inconclusive"


def estimate_columns(names: Sequence[str], estimate: Estimate) -> dict[str, float]:
    """Flat columns name, name_low, name_high for a vector estimate."""
    row: dict[str, float] = {}
    for i, name in enumerate(names):
        row[name] = float(np.asarray(estimate.value)[i])
        row[f"{name}_low"] = float(np.asarray(estimate.low)[i])
        row[f"{name}_high"] = float(np.asarray(estimate.high)[i])
    return row


def model_tasks(runs: Sequence[Run], domain: str) -> list[tuple[Any, Any]]:
    """Sorted distinct (model, task) pairs among the runs of ``domain``."""
    pairs = {
        (r.labels.get("model"), r.labels.get("task"))
        for r in runs
        if r.labels.get("domain") == domain
    }
    return sorted(pairs, key=str)


class NotEvaluable(GradspecError):
    """A comparison whose runs are missing or have nothing in common."""


def find_all(runs: Sequence[Run], needs: Sequence[Mapping[str, Any]]) -> list[Run]:
    """The run with each set of labels; NotEvaluable names those missing."""
    found = [select(runs, **need) for need in needs]
    missing = [
        f"no run with {describe(need)}"
        for need, run in zip(needs, found, strict=True)
        if run is None
    ]
    if missing:
        raise NotEvaluable("; ".join(missing))
    return [r for r in found if r is not None]


def module_values(runs: Sequence[Run], modules: Sequence[str]) -> list[LayerValues]:
    """Each run's values for each module (run-major), paired on their common examples."""
    names = ", ".join(run.name for run in runs)
    if not modules:
        raise NotEvaluable(f"runs {names} share no profiled module (every example skipped?)")
    values = paired([run.values(m, FINDING_STATISTIC) for run in runs for m in modules])
    if not len(values[0].example_index):
        raise NotEvaluable(f"runs {names} have no profiled example in common")
    return values


def gather(
    runs: Sequence[Run], needs: Sequence[Mapping[str, Any]]
) -> tuple[list[LayerValues], int]:
    """Paired values of the runs with these labels (run-major) and the number of modules."""
    found = find_all(runs, needs)
    modules = comparison_modules(found)
    return module_values(found, modules), len(modules)


# ---------------------------------------------------------------- the findings


def evaluate_findings(runs: Sequence[Run], n_boot: int = 2000, seed: int = 0) -> list[Finding]:
    """The study's three findings on these runs."""
    return [
        finding_norms(runs, n_boot, seed),
        finding_correctness(runs, n_boot, seed),
        finding_knowledge_length(runs, n_boot, seed),
    ]


def _finding(
    number: int,
    claim: str,
    method: str,
    needs: str,
    pairs: list[tuple[Any, Any]],
    compare: Callable[[Any, Any], dict[str, Any]],
) -> Finding:
    """A row per (model, task) that ``compare`` can evaluate, and why the others cannot."""
    rows, missing = [], []
    for model, task in pairs:
        try:
            row = compare(model, task)
            rows.append({"model": model, "task": task, "verdict": row.pop("verdict"), **row})
        except NotEvaluable as exc:
            missing.append(str(exc))
    return Finding(
        number,
        claim,
        method,
        pd.DataFrame(rows),
        missing if rows or missing else [f"no runs with {needs}"],
    )


def finding_norms(runs: Sequence[Run], n_boot: int, seed: int) -> Finding:
    """1. Detailed CoT gives smaller nuclear norms and smaller MAD than no CoT."""

    def compare(model: Any, task: Any) -> dict[str, Any]:
        values, k = gather(
            runs,
            [
                dict(model=model, task=task, style=s, correctness="correct")
                for s in ("none", "detailed")
            ],
        )

        def statistic(c: Curves) -> Any:
            fast, slow = c[:k], c[k:]
            return np.stack(
                [
                    level(fast),
                    level(slow),
                    level(fast) - level(slow),
                    mean_mad(fast),
                    mean_mad(slow),
                    mean_mad(fast) - mean_mad(slow),
                ],
                axis=-1,
            )

        estimate = bootstrap(
            [values], statistic, n_boot, seed, floor=[0, 0, -np.inf, 0, 0, -np.inf]
        )
        names = ["norm_none", "norm_detailed", "norm_diff", "mad_none", "mad_detailed", "mad_diff"]
        return {
            "examples": len(values[0].example_index),
            **estimate_columns(names, estimate),
            "p_differ": permutation_test(
                values[:k], values[k:], mean_relative_difference, n_boot, seed
            ),
            "verdict": verdict(estimate, [2, 5]),
        }

    return _finding(
        1,
        "Detailed CoT (slow thinking) gives smaller nuclear norms and a smaller MAD across "
        "layers than no CoT (fast thinking).",
        "On correct responses: norm = mean over modules and layers of the mean nuclear norm; "
        "mad = mean over modules of the MAD over all layers; *_diff = none − detailed, "
        "which should be > 0. p_differ: paired permutation test of the relative difference.",
        "domain=reasoning style=none and style=detailed correctness=correct",
        model_tasks(runs, "reasoning"),
        compare,
    )


def finding_correctness(runs: Sequence[Run], n_boot: int, seed: int) -> Finding:
    """2. With detailed CoT correct and irrelevant responses differ clearly; without, hardly."""

    def compare(model: Any, task: Any) -> dict[str, Any]:
        values, k = gather(
            runs,
            [
                dict(model=model, task=task, style=s, correctness=c)
                for s in ("detailed", "none")
                for c in CORRECTNESS
            ],
        )

        def statistic(c: Curves) -> Any:
            slow, fast = mean_relative_difference(c[: 2 * k]), mean_relative_difference(c[2 * k :])
            return np.stack([slow, fast, slow - fast], axis=-1)

        estimate = bootstrap([values], statistic, n_boot, seed, floor=[0, 0, -np.inf])
        return {
            "examples": len(values[0].example_index),
            **estimate_columns(["rd_detailed", "rd_none", "rd_diff"], estimate),
            "p_detailed": permutation_test(
                values[:k], values[k : 2 * k], mean_relative_difference, n_boot, seed
            ),
            "p_none": permutation_test(
                values[2 * k : 3 * k], values[3 * k :], mean_relative_difference, n_boot, seed
            ),
            "verdict": verdict(estimate, [2]),
        }

    return _finding(
        2,
        "With detailed CoT, correct and irrelevant responses give clearly different "
        "gradients (large relative difference); without CoT, hardly.",
        "rd = relative difference of the irrelevant from the correct run's nuclear-norm "
        "curves, averaged over modules, paired by example_index; rd_diff = rd_detailed − "
        "rd_none, which should be > 0. p_*: paired permutation tests that the correct and "
        "irrelevant runs differ.",
        "domain=reasoning style=detailed and style=none, correctness=correct and irrelevant",
        model_tasks(runs, "reasoning"),
        compare,
    )


def finding_knowledge_length(runs: Sequence[Run], n_boot: int, seed: int) -> Finding:
    """3. For knowledge data, longer responses do not behave like slow thinking."""

    def compare(model: Any, task: Any) -> dict[str, Any]:
        lengths = sorted(
            {
                r.labels["length"]
                for r in runs
                if r.labels.get("model") == model
                and r.labels.get("task") == task
                and "length" in r.labels
            }
        )
        references = detailed_cot_pairs(runs, model)
        if not references:
            raise NotEvaluable(
                "no runs with "
                + describe(dict(model=model, domain="reasoning", style="detailed"))
                + " correctness=correct and irrelevant (the slow-thinking "
                "reference)"
            )
        knowledge = [
            find_all(
                runs,
                [dict(model=model, task=task, length=length, correctness=c) for c in CORRECTNESS],
            )
            for length in (lengths[-1], lengths[0])
        ]
        groups = [*references, *knowledge]
        modules = comparison_modules([r for group in groups for r in group])
        values = [module_values(group, modules) for group in groups]
        k, n_ref = len(modules), len(references)

        def statistic(c: Curves) -> Any:
            rds = [
                mean_relative_difference(c[i * 2 * k : (i + 1) * 2 * k]) for i in range(len(groups))
            ]
            reference, longest, shortest = np.mean(rds[:n_ref], axis=0), rds[-2], rds[-1]
            return np.stack(
                [reference, longest, shortest, reference - longest, longest - shortest], axis=-1
            )

        estimate = bootstrap(values, statistic, n_boot, seed, floor=[0, 0, 0, -np.inf, -np.inf])
        names = ["rd_detailed_cot", "rd_longest", "rd_shortest", "rd_gap", "rd_growth"]
        return {
            "longest": lengths[-1],
            "shortest": lengths[0],
            "examples": len(values[-2][0].example_index),
            **estimate_columns(names, estimate),
            "verdict": verdict(estimate, [3]),
        }

    with_lengths = [r for r in runs if "length" in r.labels]
    return _finding(
        3,
        "For knowledge data, longer responses do not behave like slow thinking: even the "
        "longest responses do not separate correct from irrelevant as detailed CoT does.",
        "rd_* = relative difference of irrelevant from correct nuclear-norm curves (module "
        "mean); rd_detailed_cot = mean over the model's reasoning tasks with detailed CoT; "
        "rd_gap = rd_detailed_cot − rd_longest, which should be > 0; rd_growth = "
        "rd_longest − rd_shortest (slow-thinking-like behaviour would make it large).",
        "domain=knowledge with lengths, correctness=correct and irrelevant, and "
        "detailed-CoT reasoning runs",
        model_tasks(with_lengths, "knowledge"),
        compare,
    )


def detailed_cot_pairs(runs: Sequence[Run], model: Any) -> list[list[Run]]:
    """[correct, irrelevant] detailed-CoT runs of ``model``, one pair per reasoning task."""
    tasks = sorted(
        {
            r.labels.get("task")
            for r in runs
            if r.labels.get("domain") == "reasoning" and r.labels.get("model") == model
        },
        key=str,
    )
    pairs = []
    for task in tasks:
        try:
            pairs.append(
                find_all(
                    runs,
                    [
                        dict(model=model, task=task, style="detailed", correctness=c)
                        for c in CORRECTNESS
                    ],
                )
            )
        except NotEvaluable:
            continue
    return pairs
