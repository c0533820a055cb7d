"""The fast-vs-slow study's four findings, each tested as arXiv:2410.23743 states it.

Each run carries labels (labels.py): ``model``, ``task``, ``domain`` (reasoning or
knowledge), ``style`` (none, simplified or detailed chain of thought), ``correctness``
(correct or irrelevant responses to the same instructions), ``length`` (of a knowledge
set), and for finding 4 ``family`` and ``pair`` (base or instruct). A finding is checked
per (model, task), or per (family, task) for finding 4, on the nuclear norms of the paper's
matrices q, k, v, o (rows ``matrices = attention``); the MLP matrices, where profiled, get
rows of their own beside them (``matrices = mlp``), which never decide a finding's status.

Quantities (curve = mean over examples per layer; module mean = mean over the matrices):

- level: module mean of a curve's mean over layers; MAD: module mean of each curve's mean
  absolute difference between consecutive layers (the paper's ``mean_absolute_difference``
  of its mean curves); rd: module mean of the relative difference of the irrelevant from the
  correct curve (the paper's ``relative_difference``).

A verdict is a conjunction of conditions, each "this quantity lies above (or below) a
bound". A condition holds when its interval lies entirely on the claimed side, is
contradicted when it lies entirely on the other side, and is open otherwise; a row holds
when all its deciding conditions hold, is contradicted when one of them is contradicted, and
is inconclusive otherwise. Intervals are basic bootstrap intervals over examples (paired by
``example_index`` across runs on the same instructions) at the level 1 - 0.05 / m, where m
is the number of conditions checked in all findings together (Bonferroni): every verdict
of a report holds at a 5% family-wise error rate. No p-values are reported.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .analysis import (
    Curves,
    Estimate,
    LayerValues,
    Replicates,
    mad,
    mean_relative_difference,
    paired,
    segment_slices,
)
from .errors import GradspecError
from .labels import CORRECTNESS, describe
from .runs import Run, select

FINDING_STATISTIC = "nuclear_norm"
MATRIX_SETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),  # the paper's matrices
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
FAMILY_WISE_ALPHA = 0.05
HARDLY = 0.10  # finding 2: answer-only rd below this "hardly" separates correct/irrelevant
SEGMENTS = ("early", "middle", "late")
VERDICTS = ("holds", "contradicted", "inconclusive")


@dataclass(frozen=True)
class Condition:
    """A claim that quantity ``name`` lies above (``sign`` +1) or below (-1) ``bound``;
    ``decides``: whether it takes part in the row's verdict or is only reported."""

    name: str
    sign: int = 1
    bound: float = 0.0
    decides: bool = True

    def judge(self, low: float, high: float) -> str:
        """holds, contradicted or inconclusive, from the interval [low, high]."""
        above, below = low > self.bound, high < self.bound
        if (above and self.sign > 0) or (below and self.sign < 0):
            return "holds"
        if (below and self.sign > 0) or (above and self.sign < 0):
            return "contradicted"
        return "inconclusive"


@dataclass
class Comparison:
    """One row of a finding before its intervals: the bootstrap of named quantities."""

    keys: dict[str, Any]
    names: list[str]
    draw: Replicates
    floors: list[float]
    conditions: list[Condition]

    def row(self, level: float) -> dict[str, Any]:
        """The row's columns at interval ``level``, its verdict and reported checks."""
        estimate = self.draw.estimate(level, self.floors)
        row: dict[str, Any] = dict(self.keys)
        row.update(estimate_columns(self.names, estimate))
        judged = {
            c.name: c.judge(row[f"{c.name}_low"], row[f"{c.name}_high"]) for c in self.conditions
        }
        deciding = [judged[c.name] for c in self.conditions if c.decides]
        row["verdict"] = (
            "contradicted"
            if "contradicted" in deciding
            else "holds"
            if all(v == "holds" for v in deciding)
            else "inconclusive"
        )
        row.update({f"{c.name}_check": judged[c.name] for c in self.conditions if not c.decides})
        return row


@dataclass
class Finding:
    """One claim of the study and how it fares: a row per comparison, and missing runs."""

    number: int
    claim: str
    method: str
    table: pd.DataFrame
    missing: list[str]
    deciding: str = "attention"  # the matrix set whose rows decide the status
    comparisons: list[Comparison] = field(default_factory=list, repr=False)

    def deciding_rows(self) -> pd.DataFrame:
        """The rows on the paper's matrices, which decide the status."""
        if self.table.empty:
            return self.table
        return self.table[self.table["matrices"] == self.deciding]

    def status(self) -> str:
        """holds, contradicted (in every comparison), mixed, or not evaluable."""
        verdicts = set(self.deciding_rows().get("verdict", []))
        if not verdicts:
            return "not evaluable"
        return verdicts.pop() if verdicts in ({"holds"}, {"contradicted"}) else "mixed"

    def summary(self) -> str:
        """One sentence: how many comparisons hold, what the MLP rows say, what is missing."""
        parts = []
        for matrices, rows in self.table.groupby("matrices", sort=False) if len(self.table) else []:
            counts = rows["verdict"].value_counts()
            said = "; ".join(f"{v} in {counts[v]} of {len(rows)}" for v in VERDICTS if v in counts)
            parts.append(said if matrices == self.deciding else f"{matrices} beside: {said}")
        if self.missing:
            parts.append(
                "not evaluable" + (" elsewhere" if parts else "") + ": " + "; ".join(self.missing)
            )
        return ". ".join(parts)


# ---------------------------------------------------------------- curve summaries


def level(curves: Curves, part: slice = slice(None)) -> Any:
    """Mean over modules of each curve's mean over the layers of ``part`` (NaN if none)."""
    if not curves[0][..., part].shape[-1]:
        return np.full(curves[0].shape[:-1], np.nan)
    return np.mean([c[..., part].mean(axis=-1) for c in curves], axis=0)


def mean_mad(curves: Curves) -> Any:
    """Mean over modules of each curve's MAD over all layers."""
    return np.mean([mad(c) for c in curves], axis=0)


def estimate_columns(names: Sequence[str], estimate: Estimate) -> dict[str, float]:
    """Flat columns name, name_low, name_high for a vector estimate."""
    row: dict[str, float] = {}
    for i, name in enumerate(names):
        row[name] = float(np.asarray(estimate.value)[i])
        row[f"{name}_low"] = float(np.asarray(estimate.low)[i])
        row[f"{name}_high"] = float(np.asarray(estimate.high)[i])
    return row


def label_pairs(runs: Sequence[Run], first: str, domain: str) -> list[tuple[Any, Any]]:
    """Sorted distinct (``first`` label, task) pairs among the runs of ``domain``."""
    pairs = {
        (r.labels.get(first), r.labels.get("task"))
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


def shared_modules(runs: Sequence[Run], matrices: Sequence[str]) -> list[str]:
    """The modules of a matrix set that every run profiled."""
    common = set.intersection(*(set(r.modules()) for r in runs))
    return [m for m in matrices if m in common]


def styles_with(
    runs: Sequence[Run], base: Mapping[str, Any], correctness: Sequence[str]
) -> list[str]:
    """The response styles (fastest first) that have a run for each of ``correctness``."""
    return [
        s
        for s in ("none", "simplified", "detailed")
        if all(select(runs, **base, style=s, correctness=c) for c in correctness)
    ]


# ---------------------------------------------------------------- evaluation


@dataclass
class Plan:
    """A finding's claim, how it is measured, and a ``compare`` per (key, task) and matrices."""

    number: int
    claim: str
    method: str
    needs: str
    pairs: list[tuple[Any, Any]]
    compare: Callable[[Any, Any, Sequence[str]], Comparison]


def evaluate_findings(
    runs: Sequence[Run],
    n_boot: int = 4000,
    seed: int = 0,
    matrix_sets: Mapping[str, Sequence[str]] = MATRIX_SETS,
) -> list[Finding]:
    """The study's four findings; every interval at the Bonferroni level of all verdicts.

    ``matrix_sets`` names sets of modules; each gets its rows, and the first decides each
    finding's status (default: q, k, v, o, with the MLP matrices beside them).
    """
    plans = [
        plan_norms(runs, n_boot, seed),
        plan_correctness(runs, n_boot, seed),
        plan_knowledge_length(runs, n_boot, seed),
        plan_base_vs_instruct(runs, n_boot, seed),
    ]
    drafts = [compare_all(plan, runs, matrix_sets) for plan in plans]
    n_checks = sum(len(c.conditions) for comparisons, _ in drafts for c in comparisons)
    confidence = 1 - FAMILY_WISE_ALPHA / max(n_checks, 1)
    method_note = (
        f" Intervals: {confidence:.2%} basic bootstrap (Bonferroni over the {n_checks} "
        "conditions of this report)."
    )
    return [
        Finding(
            plan.number,
            plan.claim,
            plan.method + method_note,
            pd.DataFrame([c.row(confidence) for c in comparisons]),
            missing,
            next(iter(matrix_sets)),
            comparisons,
        )
        for plan, (comparisons, missing) in zip(plans, drafts, strict=True)
    ]


def compare_all(
    plan: Plan, runs: Sequence[Run], matrix_sets: Mapping[str, Sequence[str]]
) -> tuple[list[Comparison], list[str]]:
    """A comparison per (key, task) and matrix set present; why the others cannot be made."""
    comparisons, missing = [], []
    for key, task in plan.pairs:
        for matrices, modules in matrix_sets.items():
            try:
                comparison = plan.compare(key, task, modules)
            except NotEvaluable as exc:
                if matrices == next(iter(matrix_sets)):
                    missing.append(str(exc))
                continue
            comparison.keys = {"matrices": matrices, **comparison.keys}
            comparisons.append(comparison)
    if not plan.pairs:
        missing.append(f"no runs with {plan.needs}")
    return comparisons, missing


def draw_on(
    found: Sequence[Run],
    modules: Sequence[str],
    statistic: Callable[[Curves, int], Any],
    n_boot: int,
    seed: int,
) -> tuple[Replicates, int]:
    """Bootstrap ``statistic(curves, k)`` over the paired runs' modules; also the example count."""
    present = shared_modules(found, modules)
    values = module_values(found, present)
    k = len(present)
    return Replicates.draw([values], lambda c: statistic(c, k), n_boot, seed), len(
        values[0].example_index
    )


def plan_norms(runs: Sequence[Run], n_boot: int, seed: int) -> Plan:
    """1. none > simplified > detailed in nuclear norm and MAD, and where in the layers."""

    def compare(model: Any, task: Any, modules: Sequence[str]) -> Comparison:
        base = dict(model=model, task=task)
        styles = styles_with(runs, base, ["correct"])
        if "detailed" not in styles or len(styles) < 2:
            find_all(
                runs, [dict(**base, style=s, correctness="correct") for s in ("none", "detailed")]
            )
        found = find_all(runs, [dict(**base, style=s, correctness="correct") for s in styles])
        steps = list(itertools.pairwise(styles))

        def statistic(c: Curves, k: int) -> Any:
            by_style = [c[i * k : (i + 1) * k] for i in range(len(styles))]
            levels = [level(s) for s in by_style]
            mads = [mean_mad(s) for s in by_style]
            fast, slow = by_style[0], by_style[-1]
            parts = segment_slices(c[0].shape[-1])
            gaps = [1 - level(slow, parts[p]) / level(fast, parts[p]) for p in SEGMENTS]
            return np.stack(
                [
                    *levels,
                    *mads,
                    *(levels[i] - levels[i + 1] for i in range(len(steps))),
                    *(mads[i] - mads[i + 1] for i in range(len(steps))),
                    *gaps,
                ],
                axis=-1,
            )

        draw, n = draw_on(found, modules, statistic, n_boot, seed)
        gap_names = [f"rel_gap_{p}" for p in SEGMENTS]
        norm_steps = [f"norm_{a}_minus_{b}" for a, b in steps]
        mad_steps = [f"mad_{a}_minus_{b}" for a, b in steps]
        names = [
            *(f"norm_{s}" for s in styles),
            *(f"mad_{s}" for s in styles),
            *norm_steps,
            *mad_steps,
            *gap_names,
        ]
        gaps = np.asarray(draw.value)[-len(SEGMENTS) :]
        keys = dict(
            model=model,
            task=task,
            styles=" > ".join(styles),
            examples=n,
            largest_gap_in=SEGMENTS[int(np.nanargmax(gaps))] if np.isfinite(gaps).any() else "",
        )
        floors = [0.0] * (2 * len(styles)) + [-np.inf] * (2 * len(steps) + len(SEGMENTS))
        return Comparison(keys, names, draw, floors, [Condition(s) for s in norm_steps + mad_steps])

    return Plan(
        1,
        "Fast thinking gives larger gradients: nuclear norm and MAD across layers fall from no "
        "CoT to simplified to detailed CoT (none > simplified > detailed).",
        "On correct responses, for every consecutive pair of the styles present (MATH has no "
        "answer-only data): norm_a_minus_b = level(a) − level(b) and mad_a_minus_b likewise, "
        "each must be > 0. rel_gap_<part> = 1 − level(detailed) / level(fastest style) over "
        "the early, middle and late thirds of the layers (reported; largest_gap_in names the "
        "part where fast and slow thinking differ most).",
        "domain=reasoning style=none/simplified and style=detailed correctness=correct",
        label_pairs(runs, "model", "reasoning"),
        compare,
    )


def plan_correctness(runs: Sequence[Run], n_boot: int, seed: int) -> Plan:
    """2. Detailed CoT separates correct from irrelevant (irrelevant larger); answer-only
    hardly does."""

    def compare(model: Any, task: Any, modules: Sequence[str]) -> Comparison:
        base = dict(model=model, task=task)
        styles = styles_with(runs, base, CORRECTNESS)
        if "detailed" not in styles or len(styles) < 2:
            find_all(
                runs,
                [
                    dict(**base, style=s, correctness=c)
                    for s in ("detailed", "none")
                    for c in CORRECTNESS
                ],
            )
        fast = styles[0]
        found = find_all(
            runs,
            [dict(**base, style=s, correctness=c) for s in ("detailed", fast) for c in CORRECTNESS],
        )

        def statistic(c: Curves, k: int) -> Any:
            slow, quick = mean_relative_difference(c[: 2 * k]), mean_relative_difference(c[2 * k :])
            direction = level(c[k : 2 * k]) / level(c[:k]) - 1
            return np.stack([slow, quick, slow - quick, direction], axis=-1)

        draw, n = draw_on(found, modules, statistic, n_boot, seed)
        names = ["rd_detailed", f"rd_{fast}", "rd_gap", "irrelevant_larger"]
        conditions = [Condition("rd_gap"), Condition("irrelevant_larger")]
        if fast == "none":
            conditions.append(Condition("rd_none", sign=-1, bound=HARDLY))
        keys = dict(model=model, task=task, fast_style=fast, examples=n)
        return Comparison(keys, names, draw, [0, 0, -np.inf, -np.inf], conditions)

    return Plan(
        2,
        "With detailed CoT, correct and irrelevant responses give clearly different gradients, "
        "the irrelevant ones larger; without CoT, hardly.",
        "rd_<style> = relative difference of the irrelevant from the correct curves (module "
        f"mean); rd_gap = rd_detailed − rd of the fastest style present (none; simplified for "
        f"MATH) must be > 0; irrelevant_larger = level(irrelevant) / level(correct) − 1 with "
        f"detailed CoT must be > 0; with answer-only data, rd_none must be < {HARDLY} "
        '("hardly").',
        "domain=reasoning style=detailed and a faster style, correctness=correct and irrelevant",
        label_pairs(runs, "model", "reasoning"),
        compare,
    )


def plan_knowledge_length(runs: Sequence[Run], n_boot: int, seed: int) -> Plan:
    """3. Knowledge responses of growing length do not separate correct from irrelevant as
    detailed CoT does; and whether their norms and MAD fall with length."""

    def compare(model: Any, task: Any, modules: Sequence[str]) -> Comparison:
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
                + " correctness=correct and irrelevant (the slow-thinking reference)"
            )
        knowledge = [
            find_all(
                runs,
                [dict(model=model, task=task, length=length, correctness=c) for c in CORRECTNESS],
            )
            for length in (lengths[-1], lengths[0])
        ]
        groups = [*references, *knowledge]
        present = shared_modules([r for group in groups for r in group], modules)
        values = [module_values(group, present) for group in groups]
        k, n_ref = len(present), len(references)

        def statistic(c: Curves) -> Any:
            rds = [
                mean_relative_difference(c[i * 2 * k : (i + 1) * 2 * k]) for i in range(len(groups))
            ]
            reference, longest, shortest = np.mean(rds[:n_ref], axis=0), rds[-2], rds[-1]
            long_correct, short_correct = c[-4 * k : -3 * k], c[-2 * k : -k]
            return np.stack(
                [
                    reference,
                    longest,
                    shortest,
                    reference - longest,
                    longest - shortest,
                    1 - level(long_correct) / level(short_correct),
                    1 - mean_mad(long_correct) / mean_mad(short_correct),
                ],
                axis=-1,
            )

        draw = Replicates.draw(values, statistic, n_boot, seed)
        names = [
            "rd_detailed_cot",
            "rd_longest",
            "rd_shortest",
            "rd_gap",
            "rd_growth",
            "norm_fall",
            "mad_fall",
        ]
        keys = dict(
            model=model,
            task=task,
            longest=lengths[-1],
            shortest=lengths[0],
            examples=len(values[-2][0].example_index),
        )
        conditions = [
            Condition("rd_gap"),
            Condition("norm_fall", decides=False),
            Condition("mad_fall", decides=False),
        ]
        floors = [0, 0, 0, -np.inf, -np.inf, -np.inf, -np.inf]
        return Comparison(keys, names, draw, floors, conditions)

    with_lengths = [r for r in runs if "length" in r.labels]
    return Plan(
        3,
        "For knowledge data, longer responses do not behave like slow thinking: even the "
        "longest responses do not separate correct from irrelevant as detailed CoT does.",
        "rd_* = relative difference of irrelevant from correct curves (module mean); "
        "rd_detailed_cot = mean over the model's reasoning tasks with detailed CoT; rd_gap = "
        "rd_detailed_cot − rd_longest must be > 0; rd_growth = rd_longest − rd_shortest. "
        "Reported, not deciding: norm_fall and mad_fall = 1 − longest / shortest of the correct "
        "runs' level and MAD (> 0: they fall with length, as they do from fast to slow "
        "thinking); *_check says whether that holds.",
        "domain=knowledge with lengths, correctness=correct and irrelevant, and "
        "detailed-CoT reasoning runs",
        label_pairs(with_lengths, "model", "knowledge"),
        compare,
    )


def plan_base_vs_instruct(runs: Sequence[Run], n_boot: int, seed: int) -> Plan:
    """4. Pre-trained models are less affected by fast thinking than instruction-tuned ones,
    and no better at telling correct from irrelevant reasoning."""

    def compare(family: Any, task: Any, modules: Sequence[str]) -> Comparison:
        found = find_all(
            runs,
            [
                dict(family=family, pair=pair, task=task, style=style, correctness=correctness)
                for pair in ("base", "instruct")
                for style, correctness in (
                    ("none", "correct"),
                    ("detailed", "correct"),
                    ("detailed", "irrelevant"),
                )
            ],
        )

        def statistic(c: Curves, k: int) -> Any:
            base, instruct = c[: 3 * k], c[3 * k :]

            def effect(runs_: Curves) -> Any:
                return level(runs_[:k]) / level(runs_[k : 2 * k])

            def separation(runs_: Curves) -> Any:
                return mean_relative_difference(runs_[k:])

            return np.stack(
                [
                    effect(base),
                    effect(instruct),
                    effect(instruct) - effect(base),
                    separation(base),
                    separation(instruct),
                    separation(base) - separation(instruct),
                ],
                axis=-1,
            )

        draw, n = draw_on(found, modules, statistic, n_boot, seed)
        names = [
            "fast_effect_base",
            "fast_effect_instruct",
            "effect_gap",
            "rd_detailed_base",
            "rd_detailed_instruct",
            "base_advantage",
        ]
        keys = dict(
            family=family,
            task=task,
            base=found[0].labels.get("model"),
            instruct=found[3].labels.get("model"),
            examples=n,
        )
        conditions = [Condition("effect_gap"), Condition("base_advantage", sign=-1, decides=False)]
        floors = [0, 0, -np.inf, 0, 0, -np.inf]
        return Comparison(keys, names, draw, floors, conditions)

    return Plan(
        4,
        "Pre-trained (base) models are less affected by fast thinking than their "
        "instruction-tuned versions, and no better at telling correct from irrelevant "
        "reasoning.",
        "Per model family (the study's base / instruct pair) and task, on the same "
        "instructions: fast_effect = level(no CoT) / level(detailed CoT) on correct responses; "
        "effect_gap = fast_effect_instruct − fast_effect_base must be > 0. Reported, not "
        "deciding: base_advantage = rd_detailed_base − rd_detailed_instruct (correct vs "
        "irrelevant with detailed CoT); its check is contradicted if the base model separates "
        "them better.",
        "pair=base and pair=instruct runs of one family, style=none and detailed",
        label_pairs([r for r in runs if "pair" in r.labels], "family", "reasoning"),
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
