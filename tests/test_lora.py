"""PEFT LoRA adapters as --model: merged, LoRA-factor and both profiles against autograd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GSM8K, read_shared
from hub_cache import cache_repo, gradspec_cli, offline_env
from peft import LoraConfig, PeftModel, get_peft_model
from test_engine import assert_statistics_close, explicit_gradient_statistics, explicit_statistics
from transformers import AutoModelForCausalLM, AutoTokenizer

import gradspec
from gradspec.errors import GradspecError

LORA = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj"],
    init_lora_weights=False,  # random A and B: no factor's gradient is zero
)
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def build_adapter(base: Path, directory: Path) -> Path:
    """A random LoRA adapter on ``base``, saved as PEFT saves it (adapter_config.json)."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LORA).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return build_adapter(tiny_model("llama"), tmp_path_factory.mktemp("adapter"))


def peft_float64(base: Path, adapter: Path) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    return PeftModel.from_pretrained(model, adapter).eval()


def test_merged_matrices_equal_autograd_on_the_merged_model(adapter, tiny_model, tmp_path):
    records = read_shared(GSM8K, 3)
    tables = gradspec.profile(
        adapter, GSM8K, tmp_path / "run", device="cpu", limit=3, dtype="float64"
    )
    merged = tmp_path / "merged"
    peft_float64(tiny_model("llama"), adapter).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(tiny_model("llama")).save_pretrained(merged)
    expected = explicit_gradient_statistics(merged, records, None)
    assert_statistics_close(tables.spectra, expected, rtol=1e-6, rank_rtol=1e-6)
    adapter_record = tables.manifest["model"]["adapter"]
    assert adapter_record["base_model_name_or_path"] == str(tiny_model("llama"))
    assert tables.manifest["fingerprint"]["adapter_matrices"] == "merged"


@pytest.mark.parametrize("matrices", ["lora", "both"])
def test_lora_factors_equal_autograd_and_are_named_as_the_monitor_names_them(
    matrices, adapter, tiny_model, tmp_path
):
    records = read_shared(GSM8K, 3)
    tables = gradspec.profile(
        adapter,
        GSM8K,
        tmp_path / "run",
        device="cpu",
        limit=3,
        dtype="float64",
        adapter_matrices=matrices,
    )
    model = peft_float64(tiny_model("llama"), adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("llama"))
    chosen = {
        name: p
        for name, p in model.named_parameters()
        if ".layers." in name
        and p.ndim == 2
        and (matrices == "both" or ".lora_A." in name or ".lora_B." in name)
    }
    for weight in chosen.values():
        weight.requires_grad_(True)
    expected = explicit_statistics(model, tokenizer, chosen, records, None)
    assert_statistics_close(tables.spectra, expected, rtol=1e-6, rank_rtol=1e-6)
    modules = set(tables.spectra["module"])
    factors = {f"{m}.lora_{x}" for m in ("q_proj", "v_proj", "down_proj") for x in "AB"}
    plain = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert modules == (factors if matrices == "lora" else factors | plain)


def test_an_adapter_on_a_hub_base_profiles_offline(adapter, tiny_model, tmp_path):
    hf_home = tmp_path / "hf"
    cache_repo(tiny_model("llama"), hf_home, "acme/base", COMMIT)
    on_hub = tmp_path / "adapter"
    on_hub.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (on_hub / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "acme/base"})
    )
    (on_hub / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    out = tmp_path / "run"
    args = ["--limit", "2", "--device", "cpu", "--dtype", "float64"]
    result = gradspec_cli(
        "profile",
        "--model",
        str(on_hub),
        "--data",
        str(GSM8K),
        "--out",
        str(out),
        *args,
        env=offline_env(hf_home),
    )
    assert result.returncode == 0, result.stderr
    local = gradspec.profile(
        adapter, GSM8K, tmp_path / "local", device="cpu", limit=2, dtype="float64"
    )
    ours = gradspec.load_run(out)
    assert ours.manifest["model"]["hub"]["repo_id"] == "acme/base"
    assert ours.manifest["model"]["adapter"]["base_model_name_or_path"] == "acme/base"
    columns = ["example_index", "param", "nuclear_norm"]
    assert ours.spectra[columns].equals(local.spectra[columns])


def test_an_adapter_without_a_base_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(GradspecError, match="base_model_name_or_path"):
        gradspec.profile(tmp_path, GSM8K, tmp_path / "run", device="cpu")
