"""The report: its tables against independent computations, its CLI, and a real browser."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import study_like_values, write_run_dir
from typer.testing import CliRunner

from gradspec.cli import app
from gradspec.report import write_report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
N, LAYERS = 16, 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, dict]:
    """Four labelled run directories: no/detailed CoT x correct/irrelevant on one task."""
    root = tmp_path_factory.mktemp("runs")
    labelled = {}
    for i, (style, scale, wiggle) in enumerate([("none", 10.0, 0.5), ("detailed", 2.0, 0.1)]):
        for j, correctness in enumerate(("correct", "irrelevant")):
            rng = np.random.default_rng([i, j])
            values = study_like_values(
                rng,
                N,
                LAYERS,
                scale,
                wiggle,
                0.5 if (style, correctness) == ("detailed", "irrelevant") else 0.0,
            )
            if (i, j) == (0, 0):
                values["q_proj"][3, 2] = np.nan  # dropped and counted
            run = write_run_dir(
                root / f"{style}-{correctness}", values, skipped=(5,) if (i, j) == (1, 1) else ()
            )
            labelled[run] = {
                "model": "synthetic",
                "task": "gsm8k",
                "style": style,
                "correctness": correctness,
            }
    return labelled


@pytest.fixture(scope="module")
def report(runs: dict[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    return write_report(list(runs), out, runs, n_boot=300, title="synthetic study")


def table(report: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(report.parent / "report_tables" / f"{name}.csv")


def nuclear_curve(run: Path, module: str, leave_out: tuple[int, ...] = ()) -> np.ndarray:
    """Mean nuclear norm per layer, read straight from the Parquet parts."""
    spectra = pd.read_parquet(run / "spectra")
    wide = (
        spectra[spectra["module"] == module]
        .pivot(index="example_index", columns="layer", values="nuclear_norm")
        .dropna()
    )
    return wide.drop(index=list(leave_out)).to_numpy().mean(axis=0)


def test_report_of_profile_runs_writes_no_training_step_tables(report: Path):
    tables = report.parent / "report_tables"
    assert (tables / "runs.csv").exists()
    assert not (tables / "steps.csv").exists() and not (tables / "step_flags.csv").exists()
    assert "## Training steps" not in report.with_suffix(".md").read_text()


def test_report_tables_match_independent_computations(report: Path, runs: dict[Path, dict]):
    fast = next(
        r
        for r, labels in runs.items()
        if labels["style"] == "none" and labels["correctness"] == "correct"
    )
    curve = nuclear_curve(fast, "q_proj")
    mad = table(report, "mad").query("run == 'none-correct' and module == 'q_proj'")
    by_segment = dict(zip(mad["segment"], mad["mad"], strict=True))
    assert by_segment["all"] == pytest.approx(np.abs(np.diff(curve)).mean())
    assert by_segment["early"] == pytest.approx(abs(curve[1] - curve[0]))  # layers 0-1 of 6
    curves = table(report, "curves").query("run == 'none-correct' and module == 'q_proj'")
    assert curves["mean"].to_numpy() == pytest.approx(curve)
    assert (curves["mean_low"] <= curves["mean_high"]).all()

    slow_c, slow_i = (
        nuclear_curve(
            next(
                r
                for r, labels in runs.items()
                if labels["style"] == "detailed" and labels["correctness"] == c
            ),
            "down_proj",
            leave_out=(5,) if c == "correct" else (),
        )
        for c in ("correct", "irrelevant")
    )
    rd = (
        table(report, "relative_difference")
        .query("correct == 'detailed-correct' and module == 'down_proj'")
        .iloc[0]
    )
    # the skipped example 5 of the irrelevant run is left out of the correct run too
    assert rd["examples"] == N - 1
    assert rd["rd"] == pytest.approx(np.mean(np.abs(slow_c - slow_i) / slow_c))
    assert rd["p_value"] < 0.01

    counts = table(report, "examples").set_index("run")
    assert counts.loc["none-correct", "dropped_nonfinite"] == 1
    assert counts.loc["detailed-irrelevant", "skipped"] == 1
    skipped = table(report, "skipped")
    assert skipped[["run", "example_index", "line", "reason"]].values.tolist() == [
        ["detailed-irrelevant", 5, 6, "empty_response"]
    ]
    assert set(table(report, "runs")["data_sha256"]) == {"cd" * 32}
    for number in (1, 2):
        finding = table(report, f"finding_{number}").set_index("matrices")
        assert finding["verdict"].to_dict() == {"attention": "holds", "mlp": "holds"}


def test_report_html_and_markdown_are_complete_and_offline(report: Path):
    page = report.read_text()
    assert "<script src" not in page and "<link" not in page  # nothing fetched on load
    # one curve figure per (model, task); one paper-layout figure per correctness
    assert page.count("Plotly.newPlot") == 3
    for heading in (
        "Findings of the study",
        "MAD across layers",
        "Relative differences",
        "Skipped examples",
        "Runs",
        "Method",
        "synthetic study",
    ):
        assert heading in page
    markdown = report.with_suffix(".md").read_text()
    assert "holds in 1 of 1" in markdown
    assert "| run " in markdown and "### late" in markdown
    assert "not evaluable: no runs with domain=knowledge" in markdown


def test_runs_table_names_folders_relative_to_the_report_and_the_shared_data(
    runs: dict[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A report kept with a project names no folder of the machine that wrote it: run
    folders relative to the report, shared data files relative to the shared data, the
    model by its GGUF file's name; other paths as the manifest records them."""
    shared = tmp_path / "shared"
    monkeypatch.setenv("GRADSPEC_SHARED_DATA", str(shared))
    run = shutil.copytree(next(iter(runs)), tmp_path / "study" / "runs" / "cell")
    manifest = json.loads((run / "manifest.json").read_text())
    gguf = {"path": str(tmp_path / "site-packages" / "m.Q4_1.gguf")}
    manifest["model"].update(path=str(tmp_path / "cache" / "gguf" / "ab12"), gguf=gguf)
    elsewhere = str(tmp_path / "mine.json")
    manifest["data"]["paths"] = [str(shared / "reasoning_cot" / "correct" / "a.json"), elsewhere]
    (run / "manifest.json").write_text(json.dumps(manifest))
    out = write_report([run], tmp_path / "study" / "report.html", n_boot=20)
    row = pd.read_csv(out.parent / "report_tables" / "runs.csv").iloc[0]
    assert row["directory"] == "runs/cell"
    assert row["model"] == "m.Q4_1.gguf"
    assert row["data"] == f"reasoning_cot/correct/a.json {elsewhere}"


def test_report_cli_labels_runs(runs: dict[Path, dict], tmp_path: Path):
    args = ["report", *map(str, runs), "--out", str(tmp_path / "r.html"), "--bootstrap", "50"]
    for run, labels in runs.items():
        args += ["--label", f"{run}=" + ",".join(f"{k}:{v}" for k, v in labels.items())]
    first = next(iter(runs))
    args += ["--label", f"{first}=name:fast"]  # a later label for the same run wins
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    counts = pd.read_csv(tmp_path / "r_tables" / "examples.csv")
    assert "fast" in counts["run"].tolist()
    named_args = [str(tmp_path / "q.html") if a == str(tmp_path / "r.html") else a for a in args]
    named_args = named_args[:-2]  # every run keeps its labels
    named = CliRunner().invoke(app, [*named_args, "--finding-modules", "q_proj,o_proj"])
    assert named.exit_code == 0, named.output
    finding = pd.read_csv(tmp_path / "q_tables" / "finding_1.csv")
    assert finding["matrices"].tolist() == ["chosen"]

    bad = CliRunner().invoke(
        app,
        ["report", str(first), "--out", str(tmp_path / "b.html"), "--label", f"{first}=style:slow"],
    )
    assert bad.exit_code == 2
    assert "style 'slow' is not one of none, simplified, detailed" in bad.output
    missing = CliRunner().invoke(
        app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "c.html")]
    )
    assert missing.exit_code == 2 and "not a gradspec run directory" in missing.output


def browser_or_skip():
    """Launch Debian's chromium; skip without it, unless GRADSPEC_REQUIRE_BROWSER=1 (CI)."""
    required = os.environ.get("GRADSPEC_REQUIRE_BROWSER") == "1"
    if not (shutil.which("chromium") or Path(CHROMIUM).exists()):
        if required:
            pytest.fail(f"GRADSPEC_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
        pytest.skip(f"no headless browser: install Debian's chromium ({CHROMIUM})")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("the Python package playwright is not installed")
    return sync_playwright


@pytest.mark.browser
def test_report_renders_in_a_real_browser(runs: dict[Path, dict], report: Path):
    """The main figure (every run and module) and one paper-layout figure per (task,
    correctness) group render without errors, each with coloured lines drawn."""
    from PIL import Image

    sync_playwright = browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg")
        plots = page.locator(".js-plotly-plot")
        shots = [plots.nth(i).screenshot() for i in range(plots.count())]
        traces = page.evaluate(
            "[...document.querySelectorAll('.js-plotly-plot')].map(p => p.data.length)"
        )
        browser.close()
    assert errors == []
    groups = {labels["correctness"] for labels in runs.values()}  # one task in these runs
    main = 4 * 7 * 2  # runs x modules x (line + band)
    paper = 2 * 4 * 2  # a group's 2 styles x Q, K, V, O x (nuclear norm, ratio)
    assert sorted(traces) == sorted([main] + [paper] * len(groups)) and len(shots) == 3
    for shot in shots:
        pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
        drawn = (pixels < 235).any(axis=2).mean()  # not white nor the light grid
        assert 0.02 < drawn < 0.6
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines, bands, text


def test_ratio_table_and_paper_figures_show_the_runs_values(runs: dict[Path, dict], report: Path):
    """S_max / S_sum is spectral / nuclear = 1/4 in these runs; the paper-layout figure of
    the correct runs draws each run's Q, K, V, O nuclear-norm curve read from the parts."""
    from gradspec.report.figures import paper_figures
    from gradspec.runs import load_runs

    ratio = table(report, "ratio").set_index("run")
    assert list(ratio.columns[:4]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert np.allclose(ratio.to_numpy(dtype=float), 0.25)
    ratio_curves = table(report, "ratio_curves")
    assert np.allclose(ratio_curves["mean"], 0.25)
    loaded = load_runs(list(runs), runs)
    figures = dict(paper_figures(loaded, table(report, "curves"), ratio_curves))
    correct = figures[next(k for k in figures if k.endswith("correct"))]
    titles = [a.text for a in correct.layout.annotations]
    assert titles[:2] == ["None CoT | Nuclear norm", "Detailed CoT | Nuclear norm"]
    none_run = next(
        path
        for path, labels in runs.items()
        if labels == {**labels, "style": "none", "correctness": "correct"}
    )
    q_trace = next(t for t in correct.data if t.name == "Proj_Q" and t.xaxis == "x")
    assert np.allclose(q_trace.y, nuclear_curve(none_run, "q_proj"))
