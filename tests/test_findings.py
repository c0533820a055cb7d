"""The study's findings on synthetic runs built to make each of them hold, fail, or be missing."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_runs import make_run, study_like_values

from gradspec.errors import GradspecError
from gradspec.findings import evaluate_findings
from gradspec.labels import normalize_labels
from gradspec.runs import select

N, LAYERS = 24, 6


def reasoning_runs(fast_scale=10.0, slow_scale=2.0, slow_shift=0.6, task="gsm8k", model="m"):
    """none/detailed x correct/irrelevant runs; irrelevant detailed curves are shifted."""
    runs = []
    for seed, (style, scale, wiggle, shift) in enumerate(
        [("none", fast_scale, 0.5, 0.0), ("detailed", slow_scale, 0.1, slow_shift)]
    ):
        for offset, correctness in enumerate(("correct", "irrelevant")):
            rng = np.random.default_rng([10 * seed + offset, len(task)])
            values = study_like_values(
                rng, N, LAYERS, scale, wiggle, shift if correctness == "irrelevant" else 0.0
            )
            labels = normalize_labels(
                dict(model=model, task=task, style=style, correctness=correctness), "test"
            )
            runs.append(make_run(f"{task}-{style}-{correctness}", labels, values))
    return runs


def knowledge_runs(shift=0.02, model="m"):
    runs = []
    for length, scale in ((100, 4.0), (1000, 2.0)):
        for offset, correctness in enumerate(("correct", "irrelevant")):
            rng = np.random.default_rng(length + offset)
            values = study_like_values(
                rng, N, LAYERS, scale, 0.2, shift if correctness == "irrelevant" else 0.0
            )
            labels = normalize_labels(
                dict(model=model, task="wiki", length=length, correctness=correctness), "test"
            )
            runs.append(make_run(f"wiki-{length}-{correctness}", labels, values))
    return runs


def run_matrix(run, module):
    return run.values(module, "nuclear_norm").values


def test_all_three_findings_hold_when_built_to_hold():
    runs = reasoning_runs() + knowledge_runs()
    first, second, third = evaluate_findings(runs, n_boot=300)
    for finding in (first, second, third):
        assert finding.table["verdict"].tolist() == ["holds"], finding.summary()
        assert finding.missing == []
        assert finding.summary() == "holds in 1 of 1"
        assert finding.status() == "holds"

    none, detailed = (
        select(runs, style="none", correctness="correct"),
        select(runs, style="detailed", correctness="correct"),
    )
    modules = none.modules()
    assert len(modules) == 7
    row = first.table.iloc[0]
    # norm: mean over modules and layers of the mean over examples = the grand mean here
    assert row["norm_none"] == pytest.approx(np.mean([run_matrix(none, m) for m in modules]))
    expected_mad = np.mean(
        [np.abs(np.diff(run_matrix(detailed, m).mean(0))).mean() for m in modules]
    )
    assert row["mad_detailed"] == pytest.approx(expected_mad)
    assert row["norm_diff_low"] > 0 and row["mad_diff_low"] > 0

    irrelevant = select(runs, style="detailed", correctness="irrelevant")
    expected_rd = np.mean(
        [
            np.mean(
                np.abs(run_matrix(detailed, m).mean(0) - run_matrix(irrelevant, m).mean(0))
                / run_matrix(detailed, m).mean(0)
            )
            for m in modules
        ]
    )
    assert second.table.iloc[0]["rd_detailed"] == pytest.approx(expected_rd)
    assert second.table.iloc[0]["p_detailed"] < 0.01
    assert third.table.iloc[0]["rd_detailed_cot"] == pytest.approx(expected_rd)
    assert third.table.iloc[0]["longest"] == 1000


def test_findings_that_are_contradicted_say_so():
    runs = reasoning_runs(fast_scale=2.0, slow_scale=10.0, slow_shift=0.0)
    first, second, _ = evaluate_findings(runs, n_boot=300)
    assert first.table["verdict"].tolist() == ["does not hold"]
    assert first.status() == "does not hold"
    assert second.table["verdict"].tolist() != ["holds"]


def test_missing_runs_are_named():
    only_fast = [r for r in reasoning_runs() if r.labels["style"] == "none"]
    first, second, third = evaluate_findings(only_fast, n_boot=50)
    assert first.table.empty and first.status() == "not evaluable"
    assert first.summary() == (
        "not evaluable: no run with model=m task=gsm8k style=detailed correctness=correct"
    )
    assert "style=detailed correctness=correct" in second.summary()
    assert third.summary().startswith("not evaluable: no runs with domain=knowledge")
    no_reference = evaluate_findings(knowledge_runs(), n_boot=50)[2]
    assert "slow-thinking reference" in no_reference.summary()


def test_a_run_with_every_example_skipped_is_not_evaluable():
    runs = reasoning_runs()
    fast = select(runs, style="none", correctness="correct")
    matrices = {m: fast.values(m, "nuclear_norm").values for m in fast.modules()}
    runs[0] = make_run(fast.name, fast.labels, matrices, skipped=tuple(range(N)))
    first = evaluate_findings(runs, n_boot=50)[0]
    assert first.table.empty
    assert first.summary() == (
        "not evaluable: runs gsm8k-none-correct, gsm8k-detailed-correct "
        "share no profiled module (every example skipped?)"
    )


def test_findings_are_per_model_and_task():
    runs = (
        reasoning_runs(task="gsm8k")
        + reasoning_runs(task="aqua")
        + reasoning_runs(task="aqua", model="other")[:2]
    )
    first = evaluate_findings(runs, n_boot=100)[0]
    assert sorted(zip(first.table["model"], first.table["task"], strict=True)) == [
        ("m", "aqua"),
        ("m", "gsm8k"),
    ]
    assert first.missing == ["no run with model=other task=aqua style=detailed correctness=correct"]
    assert first.summary().startswith("holds in 2 of 2. not evaluable elsewhere")


def test_labels_are_checked_and_completed():
    assert normalize_labels({"style": "none"}, "x")["domain"] == "reasoning"
    assert normalize_labels({"length": "500"}, "x") == {"length": 500, "domain": "knowledge"}
    for bad, message in (
        ({"style": "long"}, "style 'long' is not one of"),
        ({"colour": "red"}, "unknown label colour"),
        ({"length": "long"}, "not a whole number"),
    ):
        with pytest.raises(GradspecError, match=message):
            normalize_labels(bad, "x")
    runs = reasoning_runs()
    with pytest.raises(GradspecError, match="all have the labels"):
        select(runs, style="none")


def test_mixed_results_are_reported_as_mixed():
    runs = reasoning_runs(task="gsm8k") + reasoning_runs(
        fast_scale=2.0, slow_scale=10.0, task="aqua"
    )
    first = evaluate_findings(runs, n_boot=100)[0]
    assert dict(zip(first.table["task"], first.table["verdict"], strict=True)) == {
        "aqua": "does not hold",
        "gsm8k": "holds",
    }
    assert first.status() == "mixed"
    assert first.summary() == "holds in 1 of 2; does not hold in 1 of 2"
