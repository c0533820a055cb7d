"""The study's four findings on synthetic runs built to make each of them hold, fail, or be
missing; every number is checked against a direct computation on the runs' matrices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import make_run, study_like_values

from gradspec.errors import GradspecError
from gradspec.findings import evaluate_findings
from gradspec.labels import normalize_labels
from gradspec.runs import select

N, LAYERS = 24, 6


def reasoning_runs(
    fast_scale=10.0,
    slow_scale=2.0,
    slow_shift=0.6,
    task="gsm8k",
    model="m",
    simplified_scale=None,
    extra=None,
    fast_shift=0.0,
):
    """none/(simplified)/detailed x correct/irrelevant runs; irrelevant curves are shifted
    (detailed by ``slow_shift``, none by ``fast_shift``); ``extra`` labels for every run."""
    runs = []
    styles = [("none", fast_scale, 0.5, fast_shift), ("detailed", slow_scale, 0.1, slow_shift)]
    if simplified_scale is not None:
        styles.insert(1, ("simplified", simplified_scale, 0.3, fast_shift))
    for seed, (style, scale, wiggle, shift) in enumerate(styles):
        for offset, correctness in enumerate(("correct", "irrelevant")):
            rng = np.random.default_rng([10 * seed + offset, len(task)])
            values = study_like_values(
                rng, N, LAYERS, scale, wiggle, shift if correctness == "irrelevant" else 0.0
            )
            labels = dict(model=model, task=task, style=style, correctness=correctness)
            labels = normalize_labels({**labels, **(extra or {})}, "test")
            runs.append(make_run(f"{model}-{task}-{style}-{correctness}", labels, values))
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


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def run_matrix(run, module):
    return run.values(module, "nuclear_norm").values


def attention_row(finding, **keys):
    """The finding's row on the paper's matrices with these key values."""
    table = finding.deciding_rows()
    for key, value in keys.items():
        table = table[table[key] == value]
    assert len(table) == 1, finding.table
    return table.iloc[0]


def level_of(run, modules=ATTENTION):
    return np.mean([run_matrix(run, m).mean() for m in modules])


def rd_of(correct, irrelevant, modules=ATTENTION):
    return np.mean(
        [
            np.mean(
                np.abs(run_matrix(correct, m).mean(0) - run_matrix(irrelevant, m).mean(0))
                / run_matrix(correct, m).mean(0)
            )
            for m in modules
        ]
    )


def test_all_findings_hold_when_built_to_hold():
    runs = reasoning_runs(simplified_scale=5.0) + knowledge_runs()
    first, second, third, fourth = evaluate_findings(runs, n_boot=400)
    for finding in (first, second, third):
        assert finding.deciding_rows()["verdict"].tolist() == ["holds"], finding.summary()
        assert finding.missing == []
        assert finding.status() == "holds"
    assert first.summary() == "holds in 1 of 1. mlp beside: holds in 1 of 1"
    assert fourth.status() == "not evaluable"

    none, simplified, detailed = (
        select(runs, style=s, correctness="correct") for s in ("none", "simplified", "detailed")
    )
    row = attention_row(first)
    assert row["styles"] == "none > simplified > detailed"
    # level: mean over q, k, v, o and layers of the mean over examples = the grand mean here
    assert row["norm_none"] == pytest.approx(level_of(none))
    assert row["norm_simplified_minus_detailed"] == pytest.approx(
        level_of(simplified) - level_of(detailed)
    )
    expected_mad = np.mean(
        [np.abs(np.diff(run_matrix(detailed, m).mean(0))).mean() for m in ATTENTION]
    )
    assert row["mad_detailed"] == pytest.approx(expected_mad)
    assert (
        row["norm_none_minus_simplified_low"] > 0 and row["mad_simplified_minus_detailed_low"] > 0
    )
    early = slice(0, 2)  # thirds of 6 layers
    gap = 1 - np.mean([run_matrix(detailed, m)[:, early].mean() for m in ATTENTION]) / np.mean(
        [run_matrix(none, m)[:, early].mean() for m in ATTENTION]
    )
    assert row["rel_gap_early"] == pytest.approx(gap)
    assert row["largest_gap_in"] in ("early", "middle", "late")
    mlp_row = first.table[first.table["matrices"] == "mlp"].iloc[0]
    assert mlp_row["norm_none"] == pytest.approx(
        level_of(none, ("gate_proj", "up_proj", "down_proj"))
    )

    irrelevant = select(runs, style="detailed", correctness="irrelevant")
    second_row = attention_row(second)
    assert second_row["rd_detailed"] == pytest.approx(rd_of(detailed, irrelevant))
    assert second_row["irrelevant_larger"] == pytest.approx(
        level_of(irrelevant) / level_of(detailed) - 1
    )
    assert second_row["fast_style"] == "none" and second_row["rd_none_high"] < 0.10
    third_row = attention_row(third)
    assert third_row["rd_detailed_cot"] == pytest.approx(rd_of(detailed, irrelevant))
    assert third_row["longest"] == 1000
    long_correct = select(runs, length=1000, correctness="correct")
    short_correct = select(runs, length=100, correctness="correct")
    assert third_row["norm_fall"] == pytest.approx(
        1 - level_of(long_correct) / level_of(short_correct)
    )
    assert third_row["norm_fall_check"] == "holds"


def test_intervals_are_bonferroni_corrected_over_all_conditions():
    runs = reasoning_runs(simplified_scale=5.0) + knowledge_runs()
    findings = evaluate_findings(runs, n_boot=400)
    # finding 1: 4 conditions, 2: 3, 3: 3 (rd_gap and two reported checks); x 2 matrix sets
    assert "Bonferroni over the 20 conditions" in findings[0].method
    assert f"{1 - 0.05 / 20:.2%}" in findings[0].method
    wide = attention_row(findings[0])
    narrow = attention_row(evaluate_findings(runs[:6], n_boot=400)[0])
    assert narrow["norm_none"] == wide["norm_none"]
    # fewer conditions (no knowledge runs): a narrower interval from the same draw
    assert narrow["norm_none_high"] - narrow["norm_none_low"] < (
        wide["norm_none_high"] - wide["norm_none_low"]
    )


def test_findings_that_are_contradicted_say_so():
    runs = reasoning_runs(fast_scale=2.0, slow_scale=10.0, slow_shift=-0.6)
    first, second, _, _ = evaluate_findings(runs, n_boot=300)
    assert first.deciding_rows()["verdict"].tolist() == ["contradicted"]
    assert first.status() == "contradicted"
    assert attention_row(second)["verdict"] == "contradicted"  # irrelevant smaller


def test_answer_only_that_separates_is_not_hardly():
    """Finding 2 needs answer-only rd below the margin: a large none shift contradicts it."""
    runs = reasoning_runs(slow_shift=2.0, fast_shift=0.8)
    second = evaluate_findings(runs, n_boot=300)[1]
    row = attention_row(second)
    assert row["rd_none_low"] > 0.10
    assert row["verdict"] == "contradicted"


def test_math_compares_simplified_with_detailed():
    """MATH has no answer-only data: finding 1 orders simplified > detailed, finding 2 uses
    simplified as the fast style and no margin."""
    runs = [
        r
        for r in reasoning_runs(simplified_scale=5.0, task="math_algebra")
        if r.labels["style"] != "none"
    ]
    first, second, _, _ = evaluate_findings(runs, n_boot=300)
    row = attention_row(first)
    assert row["styles"] == "simplified > detailed" and row["verdict"] == "holds"
    assert "norm_none" not in first.table or pd.isna(row.get("norm_none"))
    second_row = attention_row(second)
    assert second_row["fast_style"] == "simplified"
    assert "rd_simplified" in second.table


def test_finding_4_base_against_instruct():
    """The instruct model's none/detailed ratio is larger than the base model's: holds."""
    base = reasoning_runs(fast_scale=4.0, model="base-m", extra=dict(family="f", pair="base"))
    instruct = reasoning_runs(
        fast_scale=10.0, model="instruct-m", extra=dict(family="f", pair="instruct")
    )
    fourth = evaluate_findings(base + instruct, n_boot=300)[3]
    row = attention_row(fourth, family="f")
    effect = {
        name: level_of(select(runs, style="none", correctness="correct"))
        / level_of(select(runs, style="detailed", correctness="correct"))
        for name, runs in (("base", base), ("instruct", instruct))
    }
    assert row["fast_effect_base"] == pytest.approx(effect["base"])
    assert row["effect_gap"] == pytest.approx(effect["instruct"] - effect["base"])
    assert (row["base"], row["instruct"]) == ("base-m", "instruct-m")
    assert row["verdict"] == "holds" and fourth.status() == "holds"
    assert row["base_advantage_check"] == "inconclusive"  # same shifts: no better, no worse
    swapped = evaluate_findings(
        reasoning_runs(fast_scale=10.0, model="b", extra=dict(family="f", pair="base"))
        + reasoning_runs(fast_scale=4.0, model="i", extra=dict(family="f", pair="instruct")),
        n_boot=300,
    )[3]
    assert swapped.status() == "contradicted"


def test_missing_runs_are_named():
    only_fast = [r for r in reasoning_runs() if r.labels["style"] == "none"]
    first, second, third, fourth = evaluate_findings(only_fast, n_boot=50)
    assert first.table.empty and first.status() == "not evaluable"
    assert first.summary() == (
        "not evaluable: no run with model=m task=gsm8k style=detailed correctness=correct"
    )
    assert "style=detailed correctness=correct" in second.summary()
    assert third.summary().startswith("not evaluable: no runs with domain=knowledge")
    assert fourth.summary().startswith("not evaluable: no runs with pair=base")
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
        "not evaluable: runs m-gsm8k-none-correct, m-gsm8k-detailed-correct "
        "share no profiled module (every example skipped?)"
    )


def test_findings_are_per_model_and_task():
    runs = (
        reasoning_runs(task="gsm8k")
        + reasoning_runs(task="aqua")
        + reasoning_runs(task="aqua", model="other")[:2]
    )
    first = evaluate_findings(runs, n_boot=100)[0]
    rows = first.deciding_rows()
    assert sorted(zip(rows["model"], rows["task"], strict=True)) == [("m", "aqua"), ("m", "gsm8k")]
    assert first.missing == ["no run with model=other task=aqua style=detailed correctness=correct"]
    assert first.summary().startswith("holds in 2 of 2. mlp beside: holds in 2 of 2. not evaluable")


def test_labels_are_checked_and_completed():
    assert normalize_labels({"style": "none"}, "x")["domain"] == "reasoning"
    assert normalize_labels({"length": "500"}, "x") == {"length": 500, "domain": "knowledge"}
    for bad, message in (
        ({"style": "long"}, "style 'long' is not one of"),
        ({"colour": "red"}, "unknown label colour"),
        ({"length": "long"}, "not a whole number"),
        ({"pair": "chat"}, "pair 'chat' is not one of base, instruct"),
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
    rows = first.deciding_rows()
    assert dict(zip(rows["task"], rows["verdict"], strict=True)) == {
        "aqua": "contradicted",
        "gsm8k": "holds",
    }
    assert first.status() == "mixed"
    assert first.summary().startswith("holds in 1 of 2; contradicted in 1 of 2")


def test_the_deciding_matrices_can_be_named():
    """Rows of a named set decide; their values use only those modules."""
    runs = reasoning_runs()
    first = evaluate_findings(runs, n_boot=200, matrix_sets={"chosen": ("q_proj", "o_proj")})[0]
    assert first.deciding == "chosen" and first.table["matrices"].tolist() == ["chosen"]
    none = select(runs, style="none", correctness="correct")
    assert attention_row(first)["norm_none"] == pytest.approx(level_of(none, ("q_proj", "o_proj")))
    assert first.status() == "holds"
