"""Hub data sets (offline, from a datasets cache built here) and the --fields mapping."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
from conftest import GSM8K, read_shared
from hub_cache import cache_dataset, cache_repo, gradspec_cli, offline_env

import gradspec
from gradspec.errors import DataError, GradspecError

COMMIT = "1111111111111111111111111111111111111111"
MAPPING = "instruction=question,output=answer"
STATS = ["nuclear_norm", "effective_rank"]


def gsm8k_columns(n: int) -> list[dict]:
    """GSM8K records as the Hub names their fields: question, answer (and an extra one)."""
    return [
        {"question": r["instruction"], "answer": r["output"], "source": "gsm8k"}
        for r in read_shared(GSM8K, n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def spectra(tables) -> pd.DataFrame:
    return tables.spectra.set_index(["example_index", "param"])[STATS].sort_index()


@pytest.fixture
def hub_data(tiny_model, tmp_path) -> Path:
    """HF_HOME holding data set acme/gsm-tiny (configs main and other) and model acme/tiny."""
    hf_home = tmp_path / "hf"
    splits = {"train": gsm8k_columns(5), "test": gsm8k_columns(3)[::-1]}
    cache_dataset(splits, hf_home, "acme/gsm-tiny", "main", COMMIT)
    cache_dataset({"train": gsm8k_columns(1)}, hf_home, "acme/gsm-tiny", "other", COMMIT)
    cache_repo(tiny_model("llama"), hf_home, "acme/tiny", COMMIT)
    return hf_home


def test_fields_map_a_local_file_onto_the_schema(tiny_model, tmp_path):
    mapped = write_jsonl(tmp_path / "mapped.jsonl", gsm8k_columns(3))
    alpaca = [
        {"instruction": r["instruction"], "output": r["output"]} for r in read_shared(GSM8K, 3)
    ]
    plain = write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    run = dict(device="cpu", dtype="float64")
    ours = gradspec.profile(tiny_model("llama"), mapped, tmp_path / "a", fields=MAPPING, **run)
    expected = gradspec.profile(tiny_model("llama"), plain, tmp_path / "b", **run)
    pd.testing.assert_frame_equal(spectra(ours), spectra(expected))
    assert set(ours.examples["fields"]) == {MAPPING}
    assert expected.examples["fields"].isna().all()
    assert ours.manifest["data"]["fields"] == MAPPING
    assert ours.manifest["fingerprint"]["fields"] == MAPPING


def test_a_record_without_a_mapped_field_names_file_line_and_field(tiny_model, tmp_path):
    records = gsm8k_columns(3)
    del records[1]["answer"]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'answer': missing \(mapped by"):
        gradspec.profile(tiny_model("llama"), data, tmp_path / "run", fields=MAPPING)
    assert not (tmp_path / "run").exists()
    with pytest.raises(GradspecError, match="expected FIELD=COLUMN"):
        gradspec.profile(tiny_model("llama"), data, tmp_path / "run", fields="instruction")


def test_select_writes_the_original_records_of_a_mapped_file(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", gsm8k_columns(4))
    gradspec.profile(tiny_model("llama"), data, tmp_path / "run", device="cpu", fields=MAPPING)
    from gradspec.selection import select

    selection = select(tmp_path / "run", data, tmp_path / "kept.jsonl", "2", by="nuclear_norm")
    lines = data.read_text().splitlines(keepends=True)
    kept = sorted(selection.report.loc[selection.report["kept"], "example_index"])
    assert (tmp_path / "kept.jsonl").read_text() == "".join(lines[i] for i in kept)


@pytest.mark.slow
def test_a_hub_data_set_split_and_config_profile_offline_and_select_writes_it_back(
    hub_data, tiny_model, tmp_path
):
    env = offline_env(hub_data)
    out = tmp_path / "run"
    args = ["--data-config", "main", "--split", "test", "--fields", MAPPING]
    common = ["--device", "cpu", "--dtype", "float64", "--out", str(out)]
    result = gradspec_cli(
        "profile", "--model", "acme/tiny", "--data", "acme/gsm-tiny", *args, *common, env=env
    )
    assert result.returncode == 0, result.stderr
    tables = gradspec.load_run(out)
    alpaca = [{"instruction": r["question"], "output": r["answer"]} for r in gsm8k_columns(3)]
    local = write_jsonl(tmp_path / "test.jsonl", alpaca[::-1])
    expected = gradspec.profile(
        tiny_model("llama"), local, tmp_path / "b", device="cpu", dtype="float64"
    )
    pd.testing.assert_frame_equal(spectra(tables), spectra(expected))
    hub = tables.manifest["data"]["hub"]
    assert (hub["repo_id"], hub["config"], hub["split"], hub["commit"]) == (
        "acme/gsm-tiny",
        "main",
        "test",
        COMMIT,
    )
    assert set(tables.examples["fields"]) == {MAPPING}
    kept = tmp_path / "kept"
    selected = gradspec_cli(
        "select",
        str(out),
        "--data",
        "acme/gsm-tiny",
        "--keep",
        "2",
        "--by",
        "nuclear_norm",
        "--out",
        str(kept),
        env=env,
    )
    assert selected.returncode == 0, selected.stderr
    report = pd.read_csv(tmp_path / "kept.selection.csv")
    rows = sorted(report.loc[report["kept"], "example_index"])
    assert datasets.load_from_disk(str(kept)).to_list() == [gsm8k_columns(3)[::-1][i] for i in rows]


@pytest.mark.slow
def test_a_data_set_missing_offline_is_one_line_exit_2_and_nothing_written(hub_data, tmp_path):
    out = tmp_path / "run"
    for data, extra, says in [
        ("acme/nothing", [], "HF_HUB_OFFLINE is set: run the same command"),
        ("acme/gsm-tiny", ["--data-config", "main", "--split", "dev"], "Unknown split"),
        ("acme/gsm-tiny", [], "configurations"),
    ]:
        result = gradspec_cli(
            "profile",
            "--model",
            "acme/tiny",
            "--data",
            data,
            *extra,
            "--out",
            str(out),
            env=offline_env(hub_data),
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1, result.stderr
        assert data in errors[0] and says in errors[0]
        assert not out.exists()


@pytest.mark.slow
def test_a_study_names_a_hub_model_and_a_hub_data_set_with_fields(hub_data, tmp_path):
    study = tmp_path / "study.toml"
    study.write_text(
        """title = "hub"
[profile]
limit = 2
device = "cpu"
[[models]]
label = "tiny"
path = "acme/tiny"
revision = "main"
[[datasets]]
path = "acme/gsm-tiny"
config = "main"
split = "train"
fields = "instruction=question,output=answer"
task = "gsm8k"
style = "detailed"
correctness = "correct"
"""
    )
    out = tmp_path / "study"
    result = gradspec_cli("study", str(study), "--out", str(out), env=offline_env(hub_data))
    assert result.returncode == 0, result.stderr
    run = gradspec.load_run(out / "runs" / "tiny" / "gsm8k-detailed-correct")
    assert run.manifest["model"]["hub"] == {
        "repo_id": "acme/tiny",
        "revision": "main",
        "commit": COMMIT,
    }
    assert run.manifest["data"]["hub"]["split"] == "train"
    assert set(run.examples["fields"]) == {MAPPING} and len(run.examples) == 2


@pytest.mark.slow
def test_flag_learn_reads_a_hub_data_set_through_its_fields_mapping(hub_data, tiny_model, tmp_path):
    """`flag --learn` on a run of a Hub data set read with --fields learns from the same
    twins, and gives the same probabilities, as on the run of the same records saved as
    Alpaca JSON Lines."""
    from gradspec.detector import learn_flags

    records = gsm8k_columns(24)
    cache_dataset({"train": records}, hub_data, "acme/gsm-24", "main", COMMIT)
    env, out = offline_env(hub_data), tmp_path / "run"
    common = ["--device", "cpu", "--dtype", "float64", "--ifd"]
    profiled = gradspec_cli(
        "profile", "--model", "acme/tiny", "--data", "acme/gsm-24", "--fields", MAPPING,
        "--out", str(out), *common, env=env,
    )  # fmt: skip
    assert profiled.returncode == 0, profiled.stderr
    learn = ["--learn", "--twins", "24", "--seed", "3", "--device", "cpu"]
    flagged = gradspec_cli("flag", str(out), *learn, "--out", str(tmp_path / "f.csv"), env=env)
    assert flagged.returncode == 0, flagged.stderr
    alpaca = [{"instruction": r["question"], "output": r["answer"]} for r in records]
    local = write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    gradspec.profile(
        tiny_model("llama"), local, tmp_path / "b", device="cpu", dtype="float64", ifd=True
    )
    expected = learn_flags(tmp_path / "b", sample=24, seed=3, device="cpu")
    twins = json.loads((expected.folder / "twins.json").read_text())
    hub_twins = next((tmp_path / "run-twins").glob("*/twins.json"))
    assert json.loads(hub_twins.read_text()) == twins and len(twins) == 24
    ours = pd.read_csv(tmp_path / "f.csv").set_index("example_index")["probability"]
    theirs = expected.ranking.set_index("example_index")["probability"]
    pd.testing.assert_series_equal(ours.sort_index(), theirs.sort_index(), rtol=1e-9)
