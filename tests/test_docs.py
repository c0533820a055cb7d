"""The README's Python example runs as written, on a tiny model and real shared data."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import GSM8K, REPO, read_shared


def readme_example() -> str:
    """The Python block under the README's 'From Python' heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_python_example_runs(
    tiny_model: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps(read_shared(GSM8K, 3)))
    monkeypatch.chdir(tmp_path)
    code = readme_example().replace("path/to/checkpoint", str(tiny_model("llama")))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["tables"].examples) == 3
    assert (tmp_path / "runs" / "mine" / "manifest.json").is_file()
