"""The shared data's layout, named once in gradspec.shared_data, against the real folder."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA

from gradspec.errors import GradspecError
from gradspec.labels import CORRECTNESS
from gradspec.shared_data import (
    MATH_DIR,
    REASONING_DIR,
    SHARED_DATA_ENV,
    STYLE_LABELS,
    all_files,
    shared_data_dir,
)


def test_the_layout_names_every_file_of_the_shared_data(shared_data: Path) -> None:
    on_disk = {p.relative_to(shared_data) for p in shared_data.rglob("*.json")}
    named = [f for correctness in CORRECTNESS for f in all_files(correctness)]
    assert len(named) == len(set(named)) == 2 * (4 * 3 + 3 * 2 + 4)
    assert set(named) == on_disk


@pytest.mark.parametrize("study", sorted((REPO / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_studies_name_layout_files_with_matching_labels(study: Path) -> None:
    """Each dataset is a file of the layout; its correctness and (reasoning, MATH) style
    labels are those its folder and file name stand for."""
    layout = {f for correctness in CORRECTNESS for f in all_files(correctness)}
    for dataset in tomllib.loads(study.read_text())["datasets"]:
        path = Path(dataset["path"])
        assert path in layout, path
        domain, correctness, _ = path.parts
        assert dataset["correctness"] == correctness, path
        if domain in (REASONING_DIR, MATH_DIR):
            suffix = max((s for s in STYLE_LABELS if path.stem.endswith(f"_{s}")), key=len)
            assert dataset["style"] == STYLE_LABELS[suffix], path


@pytest.mark.usefixtures("shared_data")
def test_shared_data_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(GradspecError, match=f"shared data not found at .*{SHARED_DATA_ENV}"):
        shared_data_dir()
    monkeypatch.setenv(SHARED_DATA_ENV, str(SHARED_DATA))
    assert shared_data_dir() == SHARED_DATA
