"""Resuming: a killed run, rerun, equals an uninterrupted one; other inputs are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import GSM8K_DETAILED, SHARED_DATA
from killed_run import STOP_AFTER_CHUNKS, STOPPED_EXIT_CODE

import gradspec
from gradspec.errors import GradspecError
from gradspec.shared_data import reasoning_file
from gradspec.store import RunStore

LONG = GSM8K_DETAILED
OPTIONS = dict(limit=16, chunk_size=4, batch_size=2)


def _run_stopped_after(chunks: int, model_dir: Path, out: Path) -> int:
    """Run the profile in a subprocess that exits hard after ``chunks`` chunks; its status."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import gradspec, killed_run; killed_run.stop_if_asked(); "
        "gradspec.profile(sys.argv[1], sys.argv[2], sys.argv[3], "
        f"device='cpu', **{OPTIONS!r})"
    )
    env = {**os.environ, STOP_AFTER_CHUNKS: str(chunks)}
    command = [sys.executable, "-c", code, str(model_dir), str(LONG), str(out)]
    return subprocess.run(command, env=env, stderr=subprocess.DEVNULL, check=False).returncode


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model, tmp_path):
    model_dir = tiny_model("llama")
    killed = tmp_path / "killed"
    assert _run_stopped_after(2, model_dir, killed) == STOPPED_EXIT_CODE
    assert len(list((killed / "examples").glob("part-*.parquet"))) == 2
    assert gradspec.load_run(killed).manifest["sessions"][-1]["ended"] is None

    resumed = gradspec.profile(model_dir, LONG, killed, device="cpu", **OPTIONS)
    straight = gradspec.profile(model_dir, LONG, tmp_path / "straight", device="cpu", **OPTIONS)
    pd.testing.assert_frame_equal(
        resumed.examples.drop(columns="source"), straight.examples.drop(columns="source")
    )
    pd.testing.assert_frame_equal(resumed.spectra, straight.spectra)
    assert len(resumed.examples) == 16
    assert not list(killed.rglob("*.tmp"))
    assert len(resumed.manifest["sessions"]) == 2


@pytest.mark.slow
def test_rerun_skips_finished_chunks_and_extends_with_a_larger_limit(tiny_model, tmp_path):
    model_dir, out = tiny_model("llama"), tmp_path / "run"
    first = gradspec.profile(model_dir, LONG, out, device="cpu", limit=6, chunk_size=4)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}
    again = gradspec.profile(model_dir, LONG, out, device="cpu", limit=6, chunk_size=4)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")} == mtimes
    pd.testing.assert_frame_equal(first.spectra, again.spectra)

    longer = gradspec.profile(model_dir, LONG, out, device="cpu", limit=10, chunk_size=4)
    assert list(longer.examples["example_index"]) == list(range(10))
    untouched = out / "spectra" / "part-000000000-000000003.parquet"
    assert untouched.stat().st_mtime_ns == mtimes[untouched]
    # The partial chunk 4..5 is kept; only 6..7 and 8..9 were added.
    assert sorted(p.name for p in (out / "examples").iterdir()) == [
        f"part-{a:09d}-{b:09d}.parquet" for a, b in [(0, 3), (4, 5), (6, 7), (8, 9)]
    ]
    fresh = gradspec.profile(
        model_dir, LONG, tmp_path / "fresh", device="cpu", limit=10, chunk_size=4
    )
    pd.testing.assert_frame_equal(longer.spectra, fresh.spectra)


def _parts(out: Path) -> dict[Path, int]:
    """Every part file of a run directory with its modification time."""
    return {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}


def test_a_smaller_limit_never_deletes_finished_work(tiny_model, tmp_path):
    """Issue 8.1 scaled down: --limit 6, then 2 (reads back the first 2), then 6 again."""
    model_dir, out = tiny_model("llama"), tmp_path / "run"
    options = dict(device="cpu", chunk_size=4)
    gradspec.profile(model_dir, LONG, out, limit=6, **options)
    parts = _parts(out)
    assert len(parts) == 4  # examples and spectra parts of chunks 0..3 and 4..5

    shorter = gradspec.profile(model_dir, LONG, out, limit=2, **options)
    assert _parts(out) == parts
    assert list(shorter.examples["example_index"]) == [0, 1]
    assert set(shorter.spectra["example_index"]) == {0, 1}
    assert shorter.manifest["data"]["n_examples"] == 2

    again = gradspec.profile(model_dir, LONG, out, limit=6, **options)
    assert _parts(out) == parts
    straight = gradspec.profile(model_dir, LONG, tmp_path / "straight", limit=6, **options)
    pd.testing.assert_frame_equal(
        again.examples.drop(columns="source"), straight.examples.drop(columns="source")
    )
    pd.testing.assert_frame_equal(again.spectra, straight.spectra)


def test_resume_fills_gaps_on_the_chunk_grid_and_never_overlaps(tiny_model, tmp_path):
    """A first run with a small limit leaves a partial chunk; a larger limit fills the rest."""
    model_dir, out = tiny_model("llama"), tmp_path / "run"
    gradspec.profile(model_dir, LONG, out, device="cpu", limit=1, chunk_size=4)
    longer = gradspec.profile(model_dir, LONG, out, device="cpu", limit=9, chunk_size=4)
    assert sorted(p.name for p in (out / "spectra").iterdir()) == [
        f"part-{a:09d}-{b:09d}.parquet" for a, b in [(0, 0), (1, 3), (4, 7), (8, 8)]
    ]
    assert list(longer.examples["example_index"]) == list(range(9))
    store = RunStore(out, longer.manifest["fingerprint"])
    with pytest.raises(GradspecError, match=r"overlap the finished part 1\.\.3"):
        store.write_chunk(2, 5, [], [])


def test_leftovers_of_a_killed_session_are_removed_on_resume(tiny_model, tmp_path):
    """A .tmp file and an orphan spectra part (no examples part) are what a kill leaves."""
    model_dir, out = tiny_model("llama"), tmp_path / "run"
    gradspec.profile(model_dir, LONG, out, device="cpu", limit=2, chunk_size=2)
    orphan = out / "spectra" / "part-000000002-000000005.parquet"
    orphan.write_bytes((out / "spectra" / "part-000000000-000000001.parquet").read_bytes())
    (out / "examples" / "part-000000002-000000003.parquet.tmp").write_bytes(b"partial")
    resumed = gradspec.profile(model_dir, LONG, out, device="cpu", limit=4, chunk_size=2)
    assert not orphan.exists() and not list(out.rglob("*.tmp"))
    assert list(resumed.examples["example_index"]) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(modules="mlp"), "modules"),
        (dict(template="chat"), "template"),
        (dict(dtype="float64"), "dtype"),
    ],
)
def test_rerun_with_other_options_is_refused(change, field, tiny_model, tmp_path):
    model_dir, out = tiny_model("llama"), tmp_path / "run"
    gradspec.profile(model_dir, LONG, out, device="cpu", limit=2)
    before = sorted(p.name for p in out.rglob("*.parquet"))
    with pytest.raises(GradspecError, match=f"{field}: was") as info:
        gradspec.profile(model_dir, LONG, out, device="cpu", limit=2, **change)
    assert str(out) in str(info.value)
    assert sorted(p.name for p in out.rglob("*.parquet")) == before


def test_rerun_with_another_model_or_data_is_refused(tiny_model, tmp_path):
    out = tmp_path / "run"
    gradspec.profile(tiny_model("llama"), LONG, out, device="cpu", limit=2)
    with pytest.raises(GradspecError, match="model: was"):
        gradspec.profile(tiny_model("qwen2"), LONG, out, device="cpu", limit=2)
    with pytest.raises(GradspecError, match="data_sha256: was"):
        gradspec.profile(
            tiny_model("llama"),
            SHARED_DATA / reasoning_file("gsm8k", "no_cot"),
            out,
            device="cpu",
            limit=2,
        )
