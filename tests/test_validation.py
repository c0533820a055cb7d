"""Validation before writing: a failed start leaves no trace, or an existing run untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import GSM8K_DETAILED

import gradspec
from gradspec.errors import GradspecError

LONG = GSM8K_DETAILED


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a directory with its content."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _without_chat_template(model_dir: Path, copy: Path) -> Path:
    """A copy of a checkpoint whose tokenizer has no chat template."""
    shutil.copytree(model_dir, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return copy


def test_bad_modules_leave_no_trace_and_the_corrected_rerun_succeeds(tiny_model, tmp_path):
    model_dir, out = tiny_model("llama"), tmp_path / "run"
    with pytest.raises(GradspecError, match="'nonexist_xyz' selects no weight matrix"):
        gradspec.profile(model_dir, LONG, out, device="cpu", limit=2, modules="nonexist_xyz")
    assert not out.exists()
    tables = gradspec.profile(model_dir, LONG, out, device="cpu", limit=2, modules="attn")
    assert list(tables.examples["example_index"]) == [0, 1]
    assert set(tables.spectra["kind"]) == {"attn"}


@pytest.mark.parametrize(
    ("template", "chat_template", "message"),
    [
        ("markdown", True, "--template markdown: use one of plain, chat"),
        ("chat", False, "no chat template"),
    ],
)
def test_a_template_that_cannot_encode_leaves_no_trace(
    template, chat_template, message, tiny_model, tmp_path
):
    model_dir = tiny_model("llama")
    if not chat_template:
        model_dir = _without_chat_template(model_dir, tmp_path / "model")
    out = tmp_path / "run"
    with pytest.raises(GradspecError, match=message):
        gradspec.profile(model_dir, LONG, out, device="cpu", limit=2, template=template)
    assert not out.exists()


def test_bad_options_are_refused_before_anything_is_written(tiny_model, tmp_path):
    out = tmp_path / "run"
    for options in (dict(limit=0), dict(method="exact"), dict(dtype="int8")):
        with pytest.raises(GradspecError):
            gradspec.profile(tiny_model("llama"), LONG, out, device="cpu", **options)
    assert not out.exists()


def test_a_failed_start_leaves_an_existing_run_untouched(tiny_model, tmp_path):
    """Weights that no longer load (same name and size) fail the start, not the run."""
    model_dir = shutil.copytree(tiny_model("llama"), tmp_path / "model")
    out = tmp_path / "run"
    gradspec.profile(model_dir, LONG, out, device="cpu", limit=2)
    before = _snapshot(out)
    with pytest.raises(GradspecError, match="modules: was"):
        gradspec.profile(model_dir, LONG, out, device="cpu", limit=4, modules="mlp")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))
    with pytest.raises(Exception, match=r"(?i)header|safetensors|deserializ"):
        gradspec.profile(model_dir, LONG, out, device="cpu", limit=4)
    assert _snapshot(out) == before
