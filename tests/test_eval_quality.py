"""bench/eval_quality.py --quick end to end on a tiny model: the learned detector's tables."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from eval_quality import main

from gradspec.corruptions import CORRUPTIONS


def table_rows(text: str, title: str) -> pd.DataFrame:
    """A Markdown table of the report, by its title, as strings."""
    block = text.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in block[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block[2:]]
    return pd.DataFrame(rows, columns=header)


@pytest.mark.slow
def test_quick_run_reports_leave_one_out_and_the_ablation_and_resumes(
    tiny_model: Callable[[str], Path], shared_data: Path, tmp_path: Path
):
    argv = [
        *("--model", str(tiny_model("llama")), "--template", "plain", "--quick"),
        *("--work", str(tmp_path / "work"), "--markdown", str(tmp_path / "r.md")),
    ]
    report = main(argv)
    text = report.read_text()
    everything = pd.read_parquet(report.with_suffix(".parquet"))
    scored = everything[everything["status"] == "ok"]
    kinds = table_rows(
        text, "Learned detector, leave one kind out (trained on twins of the other three kinds)"
    )
    assert kinds["kind"].tolist() == ["irrelevant", "swapped", "wrong_answer", "truncated"]
    for row in kinds.itertuples():
        assert int(row.n_bad) == (scored["kind"] == row.kind).sum()
        assert int(row.n_ok) == (scored["kind"] == "correct").sum()
    tasks = table_rows(
        text, "Learned detector, leave one task out (trained on the other tasks' twins)"
    )
    assert set(tasks["task"]) == {"gsm8k", "aqua"}
    for table, protocol in ((kinds, "3 kinds"), (tasks, "other tasks")):
        for row in table.to_dict("records"):
            difference = float(row["all-base"].split(" ")[0])
            low, high = (float(v) for v in re.findall(r"[+-]\d\.\d\d", row["all-base"])[1:])
            all_, base = float(row[f"all {protocol}"]), float(row[f"base {protocol}"])
            assert difference == pytest.approx(all_ - base, abs=0.011)
            assert low <= difference <= high and 0 <= all_ <= 1 and 0 <= base <= 1
    twin_runs = sorted((tmp_path / "work").glob("*/*/run-twins/*/run"))
    assert len(twin_runs) == 2 and all(
        r.parent.name.startswith("+".join(CORRUPTIONS)) for r in twin_runs
    )
    parts = sorted(p for r in twin_runs for p in (r / "examples").iterdir())
    stamps = [p.stat().st_mtime_ns for p in parts]
    assert main(argv).read_text().split("### Learned")[1:] == text.split("### Learned")[1:]
    assert [p.stat().st_mtime_ns for p in parts] == stamps  # every run was resumed, none redone
