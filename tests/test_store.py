"""Run directories: formats are never mixed, and old runs stay readable."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradspec.errors import GradspecError
from gradspec.store import EXAMPLES_SCHEMA, FORMAT_VERSION, RunStore, load_run


def test_resuming_a_run_of_an_older_format_is_refused_and_leaves_it_untouched(tmp_path):
    old = RunStore(tmp_path, {"format_version": 1, "modules": "all"})
    old.open({})
    manifest = (tmp_path / "manifest.json").read_text()
    new = RunStore(tmp_path, {"format_version": FORMAT_VERSION, "modules": "all"})
    with pytest.raises(GradspecError, match=f"format 1 .* format {FORMAT_VERSION}"):
        new.open({})
    assert (tmp_path / "manifest.json").read_text() == manifest


def test_a_run_without_the_stable_rank_column_reads_it_as_null(tmp_path):
    RunStore(tmp_path, {"format_version": 1}).open({})
    name = "part-000000000-000000000.parquet"
    row = {"example_index": 0, "param": "p", "layer": 0, "module": "q_proj", "kind": "attn"}
    old_stats = dict.fromkeys(("nuclear_norm", "spectral_norm", "frobenius_norm"), 1.0)
    pq.write_table(pa.Table.from_pylist([{**row, **old_stats}]), tmp_path / "spectra" / name)
    examples = [{"example_index": 0, "status": "ok"}]
    pq.write_table(
        pa.Table.from_pylist(examples, schema=EXAMPLES_SCHEMA), tmp_path / "examples" / name
    )
    spectra = load_run(tmp_path).spectra
    assert spectra["nuclear_norm"].tolist() == [1.0]
    assert spectra["stable_rank"].isna().all()


def test_a_format_2_run_resumes_with_null_expert_columns(tiny_model, shared_data, tmp_path):
    """Format 3 only added nullable columns (experts, the examples' fields mapping) and
    options that are unset by default: a dense run written in format 2 resumes, its old
    parts read the new columns as null, and the run equals a fresh one."""
    import json

    import gradspec

    data = shared_data / "reasoning_cot/correct/gsm8k_no_cot.json"
    out = tmp_path / "run"
    gradspec.profile(tiny_model("llama"), data, out, device="cpu", limit=2, chunk_size=2)
    for part in (out / "spectra").glob("*.parquet"):  # as format 2 wrote it
        pq.write_table(pq.read_table(part).drop_columns(["expert", "expert_tokens"]), part)
    for part in (out / "examples").glob("*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns(["fields"]), part)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"]["format_version"] = 2
    for option in ("fields", "adapter_matrices"):  # options added since
        manifest["fingerprint"].pop(option, None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    resumed = gradspec.profile(tiny_model("llama"), data, out, device="cpu", limit=4, chunk_size=2)
    fresh = gradspec.profile(
        tiny_model("llama"), data, tmp_path / "fresh", device="cpu", limit=4, chunk_size=2
    )
    assert resumed.spectra["expert"].isna().all() and resumed.examples["fields"].isna().all()
    columns = ["example_index", "param", "nuclear_norm", "effective_rank"]
    assert resumed.spectra[columns].equals(fresh.spectra[columns])
    assert gradspec.load_run(out).manifest["fingerprint"]["format_version"] == FORMAT_VERSION
