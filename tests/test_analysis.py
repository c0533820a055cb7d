"""Analysis functions against hand-computed values on small synthetic tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from synthetic_runs import run_tables

from gradspec.analysis import (
    bootstrap,
    largest_difference_layers,
    layer_split,
    layer_values,
    mad,
    mean_relative_difference,
    paired,
    permutation_test,
    relative_difference,
    segment_slices,
)
from gradspec.errors import GradspecError

# Three examples x four layers, one module; example 1 has a NaN.
Q = np.array([[1.0, 3.0, 2.0, 6.0], [2.0, np.nan, 1.0, 1.0], [3.0, 5.0, 4.0, 8.0]])


def test_layer_values_drop_and_count_nonfinite_examples():
    values = layer_values(run_tables({"q_proj": Q}), "q_proj")
    assert values.n_dropped == 1
    assert values.example_index.tolist() == [0, 2]
    assert values.layers.tolist() == [0, 1, 2, 3]
    assert values.curve().tolist() == [2.0, 4.0, 3.0, 7.0]


def test_derived_statistics():
    tables = run_tables({"q_proj": Q[[0, 2]]}, losses=np.array([2.0, 4.0]))
    ratio = layer_values(tables, "q_proj", "spectral_ratio")
    assert np.allclose(ratio.values, 0.25)  # spectral = nuclear / 4 in the synthetic tables
    per_loss = layer_values(tables, "q_proj", "nuclear_per_loss")
    assert np.allclose(per_loss.values, [[0.5, 1.5, 1.0, 3.0], [0.75, 1.25, 1.0, 2.0]])
    with pytest.raises(GradspecError, match="unknown statistic"):
        layer_values(tables, "q_proj", "trace")
    with pytest.raises(GradspecError, match="no spectra"):
        layer_values(tables, "k_proj")


def test_mad_is_the_mean_absolute_consecutive_difference():
    assert mad(np.array([1.0, 3.0, 2.0, 6.0])) == pytest.approx((2 + 1 + 4) / 3)
    assert np.isnan(mad(np.array([5.0])))
    assert np.allclose(mad(np.array([[0.0, 1.0, 3.0], [1.0, 1.0, 0.0]])), [1.5, 0.5])


def test_segments_use_only_the_pairs_inside_each_part():
    curve = np.array([1.0, 3.0, 2.0, 6.0, 5.0, 9.0])
    parts = segment_slices(6, "thirds")  # boundaries 2 and 4
    by_part = {name: mad(curve[s]) for name, s in parts.items()}
    assert by_part == pytest.approx({"all": 12 / 5, "early": 2.0, "middle": 4.0, "late": 4.0})


@pytest.mark.parametrize(
    "depth,cut", [(26, (7, 20)), (28, (7, 21)), (32, (10, 20)), (42, (12, 30))]
)
def test_study_split_matches_the_published_cuts(depth, cut):
    curve = np.random.default_rng(depth).normal(size=depth)
    parts = segment_slices(depth, "study")

    def study_mad(values):  # the study's definition, written as a plain loop
        return sum(abs(values[i + 1] - values[i]) for i in range(len(values) - 1)) / (
            len(values) - 1
        )

    expected = [
        study_mad(curve[: cut[0]]),
        study_mad(curve[cut[0] : cut[1]]),
        study_mad(curve[cut[1] :]),
        study_mad(curve),
    ]
    got = [mad(curve[parts[p]]) for p in ("early", "middle", "late", "all")]
    assert got == pytest.approx(expected)


def test_layer_split_rules():
    assert layer_split(28) == (9, 19)
    assert layer_split(30, "study") == (10, 20)  # not a study depth: thirds
    assert layer_split(8, "3,5") == (3, 5)
    for bad in ("5,3", "0,4", "halves", "1,2,3"):
        with pytest.raises(GradspecError, match="layer split"):
            layer_split(8, bad)


def test_relative_difference_on_the_study_definition():
    a, b = np.array([2.0, 4.0, 5.0]), np.array([1.0, 5.0, 5.0])
    assert relative_difference(a, b) == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    # a zero in a counts as 1e-10, as in the study
    assert relative_difference(np.array([0.0, 2.0]), np.array([1e-10, 1.0])) == pytest.approx(0.75)
    assert largest_difference_layers(a, b, np.array([10, 11, 12])) == [10, 11, 12]
    assert largest_difference_layers(b, a, np.array([10, 11, 12]), top=1) == [10]


def test_paired_keeps_the_examples_both_runs_kept():
    first = layer_values(run_tables({"q_proj": Q}), "q_proj")
    second = layer_values(run_tables({"q_proj": Q * 2}, skipped=(2,)), "q_proj")
    a, b = paired([first, second])
    assert a.example_index.tolist() == b.example_index.tolist() == [0]
    assert b.values.tolist() == [[2.0, 6.0, 4.0, 12.0]]


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    data = rng.normal(10.0, 2.0, size=(400, 1))
    values = layer_values(run_tables({"q_proj": data}), "q_proj")
    estimate = bootstrap([[values]], lambda c: c[0][..., 0], n_boot=4000, seed=3)
    half_width = 1.96 * data.std(ddof=1) / np.sqrt(len(data))
    assert estimate.value == pytest.approx(data.mean())
    assert estimate.low == pytest.approx(data.mean() - half_width, abs=0.15 * half_width)
    assert estimate.high == pytest.approx(data.mean() + half_width, abs=0.15 * half_width)


def test_paired_bootstrap_resamples_both_runs_together():
    rng = np.random.default_rng(2)
    a = rng.normal(5.0, 1.0, size=(30, 3))
    first = layer_values(run_tables({"q_proj": a}), "q_proj")
    second = layer_values(run_tables({"q_proj": a + 0.5}), "q_proj")

    def difference(curves):
        return (curves[1] - curves[0]).mean(axis=-1)

    together = bootstrap([[first, second]], difference, n_boot=500)
    assert together.low == pytest.approx(0.5) and together.high == pytest.approx(0.5)
    apart = bootstrap([[first], [second]], difference, n_boot=500)
    assert apart.low < 0.4 and apart.high > 0.6


def test_permutation_test_matches_exhaustive_enumeration():
    a = np.array([[1.0, 2.0], [2.0, 2.5], [0.5, 1.0]])
    b = np.array([[1.5, 2.0], [2.2, 3.5], [0.4, 1.6]])
    first = [layer_values(run_tables({"q_proj": a}), "q_proj")]
    second = [layer_values(run_tables({"q_proj": b}), "q_proj")]
    observed = relative_difference(a.mean(0), b.mean(0))
    exact = []
    for swap in itertools.product([False, True], repeat=3):
        x = np.where(np.array(swap)[:, None], b, a)
        y = np.where(np.array(swap)[:, None], a, b)
        exact.append(relative_difference(x.mean(0), y.mean(0)) >= observed - 1e-12)
    p = permutation_test(first, second, mean_relative_difference, n_perm=20000, seed=5)
    assert p == pytest.approx(np.mean(exact), abs=0.02)


def test_permutation_test_extremes():
    rng = np.random.default_rng(3)
    a = rng.normal(5.0, 0.1, size=(20, 4))
    same = [layer_values(run_tables({"q_proj": a}), "q_proj")]
    assert permutation_test(same, same, mean_relative_difference, n_perm=200) == 1.0
    other = [layer_values(run_tables({"q_proj": a * 2}), "q_proj")]
    assert permutation_test(same, other, mean_relative_difference, n_perm=200) == 1 / 201


def test_floor_cuts_intervals_of_non_negative_quantities():
    rng = np.random.default_rng(4)
    a = rng.normal(5.0, 1.0, size=(6, 3))
    first = layer_values(run_tables({"q_proj": a}), "q_proj")
    second = layer_values(run_tables({"q_proj": a + rng.normal(0, 1.0, size=a.shape)}), "q_proj")
    free = bootstrap([[first, second]], mean_relative_difference, n_boot=500)
    assert free.low < 0  # the basic interval of a near-zero, upward-biased statistic
    cut = bootstrap([[first, second]], mean_relative_difference, n_boot=500, floor=0)
    assert cut.low == 0 and cut.high == free.high and cut.value == free.value
