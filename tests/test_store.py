"""Run directories: formats are never mixed, and old runs stay readable."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradspec.errors import GradspecError
from gradspec.store import EXAMPLES_SCHEMA, FORMAT_VERSION, RunStore, load_run


def test_resuming_a_run_of_an_older_format_is_refused_and_leaves_it_untouched(tmp_path):
    old = RunStore(tmp_path, {"format_version": FORMAT_VERSION - 1, "modules": "all"}, 0)
    old.open({})
    manifest = (tmp_path / "manifest.json").read_text()
    new = RunStore(tmp_path, {"format_version": FORMAT_VERSION, "modules": "all"}, 0)
    with pytest.raises(GradspecError, match=f"format {FORMAT_VERSION - 1} .* format"):
        new.open({})
    assert (tmp_path / "manifest.json").read_text() == manifest


def test_a_run_without_the_stable_rank_column_reads_it_as_null(tmp_path):
    RunStore(tmp_path, {"format_version": 1}, 0).open({})
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
