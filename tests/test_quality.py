"""Quality scores, the flag detector and AUROC against hand-computed and re-derived values."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
from conftest import GSM8K
from typer.testing import CliRunner

import gradspec
from gradspec.cli import app
from gradspec.errors import GradspecError
from gradspec.quality import (
    SCORES,
    auroc,
    example_scores,
    fit_logistic,
    flag_ranking,
    instruction_gradient_scores,
    read_labels,
    two_sided,
)
from gradspec.store import EXAMPLES_SCHEMA, SPECTRA_FIELDS, RunTables


def synthetic_run(
    nuclear: dict[int, dict[tuple[int, str], float]],
    statuses: list[str],
    ranks: dict[int, list[float]] | None = None,
) -> RunTables:
    """A run with the given nuclear norms per example and (layer, module); kinds by name."""
    examples = pd.DataFrame(
        [
            {
                "example_index": i,
                "example_id": f"id{i}",
                "source": "d.json",
                "source_line": i + 2,
                "loss": 1.0 + i if status == "ok" else None,
                "n_prompt_tokens": 3,
                "n_response_tokens": 4,
                "truncated": False,
                "status": status,
                "response_only_loss": 2.0 + i if status == "ok" else None,
                "ifd": (1.0 + i) / (2.0 + i) if status == "ok" else None,
            }
            for i, status in enumerate(statuses)
        ],
        columns=EXAMPLES_SCHEMA.names,
    )
    rows = []
    for index, values in nuclear.items():
        for position, ((layer, module), value) in enumerate(values.items()):
            rows.append(
                {
                    "example_index": index,
                    "example_id": f"id{index}",
                    "param": f"layers.{layer}.{module}.weight",
                    "layer": layer,
                    "module": module,
                    "kind": "attn" if module == "q_proj" else "mlp",
                    "nuclear_norm": value,
                    "spectral_norm": value,
                    "frobenius_norm": value,
                    "effective_rank": (ranks or {}).get(index, [1.0] * 9)[position],
                }
            )
    spectra = pd.DataFrame(rows, columns=[name for name, _ in SPECTRA_FIELDS])
    return RunTables({}, examples, spectra)


TWO_EXAMPLES = {
    0: {(0, "q_proj"): 1.0, (0, "down_proj"): 2.0, (1, "q_proj"): 3.0, (1, "down_proj"): 6.0},
    1: {(0, "q_proj"): 2.0, (0, "down_proj"): 2.0, (1, "q_proj"): 2.0, (1, "down_proj"): 1.0},
}


def test_scores_equal_hand_computed_values():
    run = synthetic_run(
        TWO_EXAMPLES,
        ["ok", "ok", "skipped:empty_response"],
        ranks={0: [1, 2, 3, 4], 1: [2, 2, 2, 2]},
    )
    scores = example_scores(run).set_index("example_index")
    # Example 0: attn 1 + 3, mlp 2 + 6; MAD: q |3-1| = 2, down |6-2| = 4 -> mean 3.
    expected = {
        0: dict(
            nuclear_norm=12,
            nuclear_norm_attn=4,
            nuclear_norm_mlp=8,
            effective_rank=2.5,
            layer_mad=3,
            loss=1,
            ifd=0.5,
        ),
        1: dict(
            nuclear_norm=7,
            nuclear_norm_attn=4,
            nuclear_norm_mlp=3,
            effective_rank=2,
            layer_mad=0.5,
            loss=2,
            ifd=2 / 3,
        ),
    }
    for index, values in expected.items():
        for name, value in values.items():
            assert scores.loc[index, name] == pytest.approx(value), (index, name)
    # Two examples: each log-norm column is +-1/1.4826 from its median, except the
    # layer-0 down_proj column, which has no spread and scores 0.
    # Example 0 is below at q/0, above at q/1 and down/1: mean (-1 + 1 + 0 + 1) / 4.
    assert scores.loc[0, "flag"] == pytest.approx(0.25 / 1.4826)
    assert scores.loc[1, "flag"] == pytest.approx(-0.25 / 1.4826)
    # Percentile: fraction of scored examples with a smaller or equal value.
    assert scores.loc[0, "nuclear_norm_pct"] == 1.0 and scores.loc[1, "nuclear_norm_pct"] == 0.5
    assert scores.loc[0, "nuclear_norm_attn_pct"] == scores.loc[1, "nuclear_norm_attn_pct"] == 1
    assert scores.loc[[0, 1], "nuclear_norm_other"].isna().all()
    skipped = scores.loc[2, [*SCORES, *(f"{s}_pct" for s in SCORES)]]
    assert skipped.isna().all() and scores.loc[2, "status"] == "skipped:empty_response"


def test_empty_and_one_example_runs():
    empty = example_scores(synthetic_run({}, []))
    assert empty.empty and set(SCORES) <= set(empty.columns)
    assert flag_ranking(empty).empty
    one = example_scores(synthetic_run({0: TWO_EXAMPLES[0]}, ["ok"])).iloc[0]
    assert one["flag"] == 0.0 and one["nuclear_norm"] == 12 and one["layer_mad"] == 3
    assert all(one[f"{name}_pct"] == 1.0 for name in SCORES if name != "nuclear_norm_other")


def test_single_layer_run_has_no_layer_mad():
    run = synthetic_run({0: {(0, "q_proj"): 1.0}, 1: {(0, "q_proj"): 2.0}}, ["ok", "ok"])
    scores = example_scores(run)
    assert scores["layer_mad"].isna().all() and scores["nuclear_norm"].tolist() == [1.0, 2.0]


@pytest.fixture(scope="module")
def tiny_run_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "run"
    gradspec.profile(tiny_model("llama"), GSM8K, out, device="cpu", limit=7, ifd=True)
    return out


@pytest.fixture
def tiny_run(tiny_run_dir):
    return gradspec.load_run(tiny_run_dir)


def test_scores_of_a_tiny_model_run_equal_loops_over_its_tables(tiny_run):
    scores = example_scores(tiny_run).set_index("example_index")
    totals: dict[int, float] = defaultdict(float)
    kinds: dict[tuple[int, str], float] = defaultdict(float)
    ranks: dict[int, list[float]] = defaultdict(list)
    curves: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
    logs: dict[str, dict[int, float]] = defaultdict(dict)
    for row in tiny_run.spectra.itertuples():
        totals[row.example_index] += row.nuclear_norm
        kinds[row.example_index, row.kind] += row.nuclear_norm
        ranks[row.example_index].append(row.effective_rank)
        curves[row.example_index, row.module][row.layer] = row.nuclear_norm
        logs[row.param][row.example_index] = math.log(row.nuclear_norm)
    z_scores: dict[int, list[float]] = defaultdict(list)
    for per_example in logs.values():
        values = np.array(list(per_example.values()))
        median = np.median(values)
        scale = 1.4826 * np.median(np.abs(values - median))
        for index, value in per_example.items():
            z_scores[index].append((value - median) / scale)
    for index in totals:
        mads = []
        for (example, _), curve in curves.items():
            if example == index:
                layers = sorted(curve)
                steps = [abs(curve[b] - curve[a]) for a, b in itertools.pairwise(layers)]
                mads.append(sum(steps) / len(steps))
        row = scores.loc[index]
        assert row["nuclear_norm"] == pytest.approx(totals[index], rel=1e-12)
        assert row["nuclear_norm_attn"] == pytest.approx(kinds[index, "attn"], rel=1e-12)
        assert row["nuclear_norm_mlp"] == pytest.approx(kinds[index, "mlp"], rel=1e-12)
        assert row["effective_rank"] == pytest.approx(np.mean(ranks[index]), rel=1e-12)
        assert row["layer_mad"] == pytest.approx(np.mean(mads), rel=1e-12)
        assert row["flag"] == pytest.approx(np.mean(z_scores[index]), rel=1e-9)
    examples = tiny_run.examples.set_index("example_index")
    assert np.allclose(scores["ifd"], examples["loss"] / examples["response_only_loss"])
    for name in ("nuclear_norm", "flag", "loss"):
        values = scores[name].to_numpy()
        counted = [(values <= v).sum() / len(values) for v in values]
        assert np.allclose(scores[f"{name}_pct"], counted)


def test_instruction_gradient_scores_compare_each_matrix_with_its_blank_instruction_twin():
    matrices = [(0, "q_proj"), (0, "down_proj"), (1, "q_proj")]
    given_values = [[2.0, 4.0, 1.0], [3.0, 3.0, 3.0], [1.0, 8.0, 2.0]]
    blank_values = [[1.0, 4.0, 2.0], [3.0, 1.0, 3.0], [4.0, 2.0, 2.0]]
    run = lambda values, statuses: synthetic_run(  # noqa: E731
        {i: dict(zip(matrices, v, strict=True)) for i, v in enumerate(values)}, statuses
    )
    scores = instruction_gradient_scores(
        run(given_values, ["ok"] * 3), run(blank_values, ["ok", "ok", "skipped:empty_response"])
    )
    assert list(scores.index) == [0, 1, 2]
    for i in range(2):
        assert scores.loc[i, "nuclear_ifd"] == pytest.approx(
            sum(given_values[i]) / sum(blank_values[i])
        )
    assert scores.loc[2].isna().all()
    log_ratio = np.log(np.array(given_values[:2]) / np.array(blank_values[:2]))
    median = np.median(log_ratio, axis=0)
    scale = 1.4826 * np.median(np.abs(log_ratio - median), axis=0)
    z = np.where(scale > 0, (log_ratio - median) / np.where(scale > 0, scale, 1), 0.0)
    assert scores.loc[[0, 1], "flag_ifd"].to_numpy() == pytest.approx(z.mean(axis=1))


def test_two_sided_score_is_the_absolute_robust_z():
    values = pd.Series([1.0, 2.0, 3.0, 10.0, -6.0, np.nan])
    median, scale = 2.0, 1.4826 * 1.0  # deviations 1, 0, 1, 8, 8
    expected = [abs(v - median) / scale for v in values[:5]]
    assert two_sided(values).to_numpy()[:5] == pytest.approx(expected)
    assert math.isnan(two_sided(values).iloc[5])
    assert two_sided(pd.Series([4.0, 4.0, 4.0])).tolist() == [0.0, 0.0, 0.0]


def test_auroc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=30).astype(float)
        positive = rng.random(30) < 0.3
        pairs = [(p, n) for p in scores[positive] for n in scores[~positive]]
        brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
        assert auroc(scores, positive) == pytest.approx(brute)
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([False, True, True])) == 1.0
    assert math.isnan(auroc(np.array([1.0, 2.0]), np.array([True, True])))


def test_logistic_fit_is_the_penalised_optimum_and_stays_finite_when_separable():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(12, 3))
    y = (features[:, 0] + 0.5 * rng.normal(size=12) > 0).astype(float)
    weights = fit_logistic(features, y, l2=1.0)
    x = np.hstack([np.ones((12, 1)), features])
    p = 1 / (1 + np.exp(-x @ weights))
    gradient = x.T @ (p - y) + np.r_[0.0, weights[1:]]  # d/dw of log loss + |w|^2 / 2
    assert np.abs(gradient).max() < 1e-6
    separable = fit_logistic(
        np.array([[-2.0], [-1.0], [1.0], [2.0]]), np.array([0, 0, 1, 1.0]), l2=1.0
    )
    assert np.isfinite(separable).all() and separable[1] > 0


def test_calibrated_flag_ranks_by_probability_and_checks_labels(tiny_run, tmp_path):
    scores = example_scores(tiny_run)
    labels_csv = tmp_path / "labels.csv"
    ids = scores["example_id"].tolist()
    pd.DataFrame({"example_id": ids[:4], "label": [1, 0, 0, 1]}).to_csv(labels_csv, index=False)
    labels = read_labels(labels_csv, scores)
    assert labels["example_index"].tolist() == [0, 1, 2, 3]
    ranking = flag_ranking(scores, labels)
    assert ranking["probability"].between(0, 1).all()
    assert ranking["probability"].is_monotonic_decreasing
    assert ranking["rank"].tolist() == list(range(1, len(scores) + 1))
    assert ranking.set_index("example_index").loc[0, "label"] == 1
    with pytest.raises(GradspecError, match="both kinds"):
        flag_ranking(scores, labels.assign(label=1))
    pd.DataFrame({"example_index": [0, 99], "label": [1, 0]}).to_csv(labels_csv, index=False)
    with pytest.raises(GradspecError, match="not in the run"):
        read_labels(labels_csv, scores)
    pd.DataFrame({"example_index": [0], "quality": [1]}).to_csv(labels_csv, index=False)
    with pytest.raises(GradspecError, match="'label' column"):
        read_labels(labels_csv, scores)


def test_unsupervised_ranking_is_by_flag(tiny_run):
    ranking = flag_ranking(example_scores(tiny_run))
    assert ranking["flag"].is_monotonic_decreasing and ranking["probability"].isna().all()


def test_cli_score_and_flag_write_their_tables(tiny_run_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(tiny_run_dir), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    written = pd.read_csv(tmp_path / "s.csv")
    expected = example_scores(gradspec.load_run(tiny_run_dir))
    assert written["example_id"].tolist() == expected["example_id"].tolist()
    assert np.allclose(written["flag"], expected["flag"])
    flags_path = tmp_path / "flags.parquet"
    result = runner.invoke(app, ["flag", str(tiny_run_dir), "--top", "2", "--out", str(flags_path)])
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(flags_path)["rank"].tolist() == list(range(1, 8))
    result = runner.invoke(app, ["flag", str(tiny_run_dir), "--labels", str(tmp_path / "none.csv")])
    assert result.exit_code == 2 and "cannot read it as CSV" in result.output
