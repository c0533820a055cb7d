"""Coverage: every run states which decoder-layer weights it profiled, their share of the
decoder layers' parameters, and names every weight it left out (console and manifest)."""

from __future__ import annotations

import pytest
import torch
from conftest import GSM8K, TINY_MOE_CONFIGS
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import gradspec
from gradspec.adapters import NOT_SELECTED, find_decoder_layers
from gradspec.cli import app
from gradspec.families import coverage, find_targets

DATA = GSM8K.parent / "gsm8k_no_cot.json"


def decoder_weights(model_dir) -> tuple[dict[str, int], dict[str, int]]:
    """Size of every decoder-layer parameter of the saved model, and every parameter's
    number of dimensions, read independently."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    layers_name, _ = find_decoder_layers(model)
    return {
        name: p.numel() for name, p in model.named_parameters() if name.startswith(layers_name)
    }, {name: p.ndim for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", [*TINY_MOE_CONFIGS, "llama"])
def test_manifest_states_coverage_and_names_what_is_left_out(arch, tiny_model, tmp_path):
    model_dir = tiny_model(arch)
    tables = gradspec.profile(model_dir, DATA, tmp_path / "run", device="cpu", limit=1)
    sizes, ndims = decoder_weights(model_dir)
    profiled = set(tables.spectra["param"])
    entry = tables.manifest["coverage"]
    assert set(entry["profiled"]) == profiled
    assert entry["decoder_parameters"] == sum(sizes.values())
    assert entry["profiled_parameters"] == sum(sizes[name] for name in profiled)
    assert entry["share"] == pytest.approx(
        sum(sizes[name] for name in profiled) / sum(sizes.values())
    )
    # Weights of two or more dimensions; GPT-OSS's per-expert biases are biases.
    weights = {name for name in sizes if ndims[name] >= 2 and not name.endswith("bias")}
    assert set(entry["left_out"]) == weights - profiled
    assert all(reason.startswith("not supported") for reason in entry["left_out"].values())
    again = gradspec.profile(model_dir, DATA, tmp_path / "run", device="cpu", limit=1)
    assert again.manifest["coverage"] == entry, "a rerun loading no model keeps the statement"


def test_modules_selection_is_named_as_not_selected(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("deepseek_v3"))
    stated = coverage(model, find_targets(model, "attn"))
    mlp = {t.param for t in find_targets(model, "mlp")}
    assert mlp and {stated.left_out[name] for name in mlp} == {NOT_SELECTED}
    assert all(".self_attn." in name for name in stated.profiled)


def test_console_names_left_out_weights(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = ["profile", "--model", str(tiny_model("llama")), "--data", str(DATA)]
    result = CliRunner().invoke(
        app, [*args, "--out", str(out), "--limit", "1", "--device", "cpu", "--modules", "attn"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "coverage: profiled 8 decoder-layer weights" in text
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        assert f"left out: model.layers.*.mlp.{leaf}.weight (2 layers): {NOT_SELECTED}" in text


def test_a_weight_no_family_reads_is_named_as_not_supported(tiny_model):
    """A decoder-layer weight the families have no capture for (here a 3-D parameter added
    to a Llama layer) is left out by name with its shape, and counted in the share."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    extra = torch.nn.Parameter(torch.zeros(2, 3, 4))
    model.model.layers[1].mlp.register_parameter("mixer", extra)
    stated = coverage(model, find_targets(model, "all"))
    assert stated.left_out == {
        "model.layers.1.mlp.mixer": "not supported: no per-example capture for this "
        "3-D weight (2x3x4)"
    }
    assert stated.decoder_parameters - stated.profiled_parameters >= extra.numel()
