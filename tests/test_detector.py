"""The corruption registry and the detector learned from corrupted twins (flag --learn)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import read_shared
from typer.testing import CliRunner

import gradspec
from gradspec.cli import app
from gradspec.corruptions import (
    CORRUPTIONS,
    SENTENCE,
    corrupted_twins,
    stitched,
    swapped,
    wrong_final_answer,
)
from gradspec.data import Example, encode_example
from gradspec.detector import (
    MIN_PAIRS,
    example_features,
    fit_detector,
    learn_flags,
    out_of_fold,
    twins_folder,
)
from gradspec.errors import GradspecError
from gradspec.quality import auroc
from gradspec.shared_data import wiki_file


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- the corruptions


def test_stitched_draws_as_many_sentences_as_the_response_has_from_the_donors():
    donors = ["Cats purr. Dogs bark!", "Birds sing? Fish swim."]
    sentences = {"Cats purr.", "Dogs bark!", "Birds sing?", "Fish swim."}
    for seed in range(10):
        out = stitched("One. Two. Three.", donors, rng(seed))
        pieces = [s.strip() for s in SENTENCE.findall(out)]
        assert len(pieces) == 3 and set(pieces) <= sentences
    assert stitched("One.", [], rng()) is None


def test_swapped_takes_the_first_donor_that_differs():
    assert swapped("a", ["a", "b", "c"], rng()) == "b"
    assert swapped("a", ["a"], rng()) is None


@pytest.mark.parametrize(
    ("response", "head", "tail_pattern"),
    [
        ("3 + 4 = 7, so the answer is 7", "3 + 4 = 7, so the answer is ", r"-?\d+"),
        (
            "It costs 2.50 dollars. The answer is (B)",
            "It costs 2.50 dollars. The answer is ",
            r"\([ACDE]\)",
        ),
        (
            "There were 3 kings. So the answer is yes.",
            "There were 3 kings. So the answer is ",
            r"no\.",
        ),
    ],
)
def test_wrong_answer_changes_the_last_stated_answer_of_any_kind(
    response: str, head: str, tail_pattern: str
):
    for seed in range(10):
        out = wrong_final_answer(response, [], rng(seed))
        assert out.startswith(head) and re.fullmatch(tail_pattern, out[len(head) :])
        if tail_pattern == r"-?\d+":
            assert 1 <= abs(int(out[len(head) :]) - 7) <= 9
    assert wrong_final_answer("No answer here at all", [], rng()) is None


def example(index: int, output: str) -> Example:
    record = {
        "instruction": f"Question {index}?",
        "input": "ctx" if index % 2 else "",
        "output": output,
    }
    return Example(index, "d.json", index, index + 1, record, "alpaca")


def test_twins_take_the_kinds_in_turn_keep_the_prompt_and_depend_on_the_seed(tokenizer):
    examples = [
        example(i, f"Step one for {i}. Step two gives {i + 3}. The answer is {i + 3}.")
        for i in range(30)
    ]
    twins = corrupted_twins(examples, ["truncated", "wrong_answer", "swapped"], 12, seed=1)
    assert [t.kind for t in twins] == ["truncated", "wrong_answer", "swapped"] * 4
    assert len({t.example_index for t in twins}) == 12
    assert twins == corrupted_twins(examples, ["truncated", "wrong_answer", "swapped"], 12, seed=1)
    assert twins != corrupted_twins(examples, ["truncated", "wrong_answer", "swapped"], 12, seed=2)
    for twin in twins:
        original = examples[twin.example_index]
        copy = Example(0, "t.json", 0, 1, twin.record, "chat")
        assert copy.response != original.response
        first, second = (encode_example(tokenizer, e, "plain") for e in (original, copy))
        assert (
            first.input_ids[: first.n_prompt_tokens] == second.input_ids[: second.n_prompt_tokens]
        )
    short = [example(i, f"Too short, {chr(97 + i)}.") for i in range(5)]  # swapped only
    assert {
        t.kind for t in corrupted_twins(short, ["truncated", "wrong_answer", "swapped"], 5, 0)
    } == {"swapped"}
    with pytest.raises(GradspecError, match="use some of stitched, swapped"):
        corrupted_twins(examples, ["shuffled"], 5, 0)


# ---------------------------------------------------------------- the classifier


def test_fit_detector_separates_scores_out_of_fold_and_names_the_feature_that_matters():
    generator = rng(3)
    n = 60
    y = np.r_[np.zeros(n), np.ones(n)]
    features = pd.DataFrame(generator.normal(size=(2 * n, 6)), columns=[f"f{i}" for i in range(6)])
    features["signal"] = 3.0 * y + generator.normal(size=2 * n)
    features["empty"] = np.nan  # a feature no row has (IFD without --ifd) is left out
    groups = np.r_[np.arange(n), np.arange(n)]
    held_out = out_of_fold(features, y, groups)
    assert auroc(held_out, y.astype(bool)) > 0.9
    assert abs(held_out.mean() - 0.5) < 0.05
    detector = fit_detector(features, y, groups)
    assert "empty" not in detector.columns
    drivers = detector.drivers(features)
    twins_first = np.argsort(-features["signal"].to_numpy())[:10]
    assert all(drivers[i].startswith("signal +") for i in twins_first)


# ---------------------------------------------------------------- a tiny model's run


@pytest.fixture(scope="module")
def wiki_run(tiny_model, shared_data: Path, tmp_path_factory) -> Path:
    """60 Wikipedia answers of about 100 words: truncating one is visible to a random model."""
    folder = tmp_path_factory.mktemp("detector")
    data = folder / "wiki.json"
    data.write_text(json.dumps(read_shared(shared_data / wiki_file("popular_wikipedia_100"), 60)))
    out = folder / "run"
    gradspec.profile(tiny_model("llama"), data, out, device="cpu", ifd=True)
    return out


def test_features_equal_loops_over_the_run_tables(wiki_run: Path):
    tables = gradspec.load_run(wiki_run)
    features = example_features(tables)
    nuclear: dict[tuple, float] = defaultdict(float)
    ranks: dict[tuple, list] = defaultdict(list)
    ratios: dict[tuple, list] = defaultdict(list)
    for row in tables.spectra.itertuples():
        key = (row.example_index, row.layer, row.kind)
        nuclear[key] += row.nuclear_norm
        ranks[key].append(row.effective_rank)
        ratios[key].append(row.spectral_norm / row.nuclear_norm)
    for (index, layer, kind), total in nuclear.items():
        row = features.loc[index]
        assert row[f"log_nuc_L{layer}_{kind}"] == pytest.approx(math.log(total), rel=1e-12)
        assert row[f"erank_L{layer}_{kind}"] == pytest.approx(np.mean(ranks[index, layer, kind]))
        assert row[f"smax_ssum_L{layer}_{kind}"] == pytest.approx(
            np.mean(ratios[index, layer, kind])
        )
    examples = tables.examples.set_index("example_index")
    for name in ("loss", "response_only_loss", "ifd"):
        assert np.allclose(features[name], examples[name])
    assert (features["length"] == examples["n_response_tokens"]).all()
    assert features.shape == (60, 4 + 3 * 2 * 2 + 1)  # 2 layers x attn/mlp x 3, and mad


@pytest.mark.slow
def test_learned_detector_finds_held_out_truncated_twins_calibrated_and_deterministic(
    wiki_run: Path,
):
    learned = learn_flags(wiki_run, ["truncated"], sample=60, seed=0, device="cpu")
    summary = learned.summary
    assert learned.folder == twins_folder(wiki_run, ["truncated"], 60, 0)
    assert (
        learned.folder.parent.name == "run-twins"
        and learned.folder.parent.parent == wiki_run.parent
    )
    assert summary["pairs"] == 60 and summary["twins_per_kind"] == {"truncated": 60}
    twins = learned.twins
    held_out = np.r_[
        learned.ranking.set_index("example_index").loc[twins["example_index"], "probability"],
        twins["probability"],
    ]
    positive = np.r_[np.zeros(60, bool), np.ones(60, bool)]
    assert (
        summary["held_out_auroc"] == pytest.approx(auroc(held_out, positive))
        and summary["held_out_auroc"] > 0.9
    )
    assert abs(held_out.mean() - 0.5) < 0.05  # calibrated: the twins' share of the pairs
    records = json.loads((learned.folder / "twins.json").read_text())
    originals = read_shared(Path(gradspec.load_run(wiki_run).manifest["data"]["paths"][0]))
    for twin, record in zip(twins.itertuples(), records, strict=True):
        response = record["messages"][-1]["content"]
        assert originals[twin.example_index]["output"].startswith(response)
    ranking = learned.ranking
    assert len(ranking) == 60 and ranking["probability"].is_monotonic_decreasing
    assert ranking["probability"].between(0, 1).all() and ranking["drivers"].str.len().gt(0).any()
    twin_parts = sorted((learned.folder / "run" / "examples").iterdir())
    stamps = [p.stat().st_mtime_ns for p in twin_parts]
    again = learn_flags(wiki_run, ["truncated"], sample=60, seed=0, device="cpu")
    assert [p.stat().st_mtime_ns for p in twin_parts] == stamps  # the twins' run was resumed
    pd.testing.assert_frame_equal(again.ranking, ranking)
    assert again.summary == summary


@pytest.mark.slow
def test_cli_learn_ranks_by_probability_and_refuses_too_few_examples(
    wiki_run: Path, tmp_path: Path
):
    runner = CliRunner()
    out = tmp_path / "flags.csv"
    args = ["flag", str(wiki_run), "--learn", "--twins", "40", "--seed", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out AUROC" in result.output and "drivers" in result.output
    flags = pd.read_csv(out)
    assert (
        flags["rank"].tolist() == list(range(1, 61))
        and flags["probability"].is_monotonic_decreasing
    )
    summary = json.loads(
        (twins_folder(wiki_run, list(CORRUPTIONS), 40, 1) / "learned.json").read_text()
    )
    assert set(summary["twins_per_kind"]) == set(CORRUPTIONS) and summary["pairs"] == 40
    small = tmp_path / "small"
    tables = gradspec.load_run(wiki_run)
    data = Path(tables.manifest["data"]["paths"][0])
    gradspec.profile(
        tables.manifest["model"]["path"], data, small, device="cpu", limit=MIN_PAIRS - 1
    )
    result = runner.invoke(app, ["flag", str(small), "--learn"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --learn needs at least {MIN_PAIRS} examples with a corrupted twin; only "
        f"{MIN_PAIRS - 1} of {MIN_PAIRS - 1} are 'ok': profile more examples"
    ]
    assert not (tmp_path / "small-twins").exists()  # refused before anything was written
    result = runner.invoke(app, ["flag", str(wiki_run), "--learn", "--labels", str(out)])
    assert result.exit_code == 2 and "use one of them" in result.output
