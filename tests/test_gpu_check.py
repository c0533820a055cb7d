"""bench/gpu_check.sh --cpu-dry-run: every stage of the prepared GPU check on tiny shapes on
the CPU, so the script is known to work before any GPU time is spent."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from gpu_check import RESULTS_NAME, STAGES


def has_row(markdown: str, *cells: str) -> bool:
    """Whether a Markdown table row starts with these cells (padded as pandas pads them)."""
    pattern = r"^\|\s*" + r"\s*\|\s*".join(re.escape(cell) for cell in cells) + r"\s*\|"
    return re.search(pattern, markdown, re.MULTILINE) is not None


@pytest.mark.slow
def test_cpu_dry_run_writes_one_results_file_with_every_stage(shared_data: Path, tmp_path: Path):
    out = tmp_path / "out"
    env = {**os.environ, "GRADSPEC_SHARED_DATA": str(shared_data)}
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert [p.name for p in out.iterdir()] == [RESULTS_NAME]
    results = (out / RESULTS_NAME).read_text()
    assert done.returncode == 0, done.stdout[-4000:] + results[-4000:]
    for stage in STAGES:
        assert f"## {stage}\n\nfinished in" in results, stage
    for cells in (
        ("bf16 512^3 product",),  # environment
        ("passed",),  # tests
        ("q_proj, o_proj", "128x128", "32"),  # per matrix, T = 1024 / 32
        ("down_proj", "128x448", "128"),  # the last shape at the last T
        ("down_proj", "128", "factor"),  # the routes a run times on a CPU
        ("down_proj", "128", "factor-eigvalsh"),
        ("1", "2", "2"),  # end to end at batch 1: 2 examples in 2 batches
        ("auto", "4"),
        ("published, estimated", "2"),
        ("published, measured", "2"),
        ("fast, batch 1", "2"),
    ):
        assert has_row(results, *cells), cells
    assert "not measured" not in results and "**failed**" not in results
    monitor = results.split("## monitor")[1]
    assert has_row(monitor, "profiled step s") and monitor.count("\n| ") == 2  # header, a row
