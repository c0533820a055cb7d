"""Adapters: each family's decoder-layer matrices, their names, layers, kinds and shapes."""

from __future__ import annotations

import pytest
from conftest import TINY_CONFIGS
from transformers import AutoConfig, AutoModelForCausalLM

from gradspec import families
from gradspec.adapters import ModelFamily, find_decoder_layers
from gradspec.errors import GradspecError
from gradspec.families import find_targets

HIDDEN, FFN, KV = 48, 96, 24  # TINY: 4 heads of 12, GQA with 2 key/value heads
LLAMA_LIKE = {
    "self_attn.q_proj": ("q_proj", "attn", (HIDDEN, HIDDEN)),
    "self_attn.k_proj": ("k_proj", "attn", (KV, HIDDEN)),
    "self_attn.v_proj": ("v_proj", "attn", (KV, HIDDEN)),
    "self_attn.o_proj": ("o_proj", "attn", (HIDDEN, HIDDEN)),
    "mlp.gate_proj": ("gate_proj", "mlp", (FFN, HIDDEN)),
    "mlp.up_proj": ("up_proj", "mlp", (FFN, HIDDEN)),
    "mlp.down_proj": ("down_proj", "mlp", (HIDDEN, FFN)),
}
# Per family: the decoder layers' path, and per matrix (path inside a layer): canonical
# module, kind and the stored weight's shape (GPT-2's Conv1D stores it as (d_in, d_out)).
FAMILIES = {
    "llama": ("model.layers", LLAMA_LIKE),
    "qwen2": ("model.layers", LLAMA_LIKE),
    "gemma": ("model.layers", LLAMA_LIKE),
    "mistral": ("model.layers", LLAMA_LIKE),
    "gpt2": (
        "transformer.h",
        {
            "attn.c_attn": ("qkv_proj", "attn", (HIDDEN, 3 * HIDDEN)),
            "attn.c_proj": ("o_proj", "attn", (HIDDEN, HIDDEN)),
            "mlp.c_fc": ("fc_in", "mlp", (HIDDEN, 4 * HIDDEN)),
            "mlp.c_proj": ("fc_out", "mlp", (4 * HIDDEN, HIDDEN)),
        },
    ),
    "gpt_neox": (
        "gpt_neox.layers",
        {
            "attention.query_key_value": ("qkv_proj", "attn", (3 * HIDDEN, HIDDEN)),
            "attention.dense": ("o_proj", "attn", (HIDDEN, HIDDEN)),
            "mlp.dense_h_to_4h": ("fc_in", "mlp", (FFN, HIDDEN)),
            "mlp.dense_4h_to_h": ("fc_out", "mlp", (HIDDEN, FFN)),
        },
    ),
}


def tiny(arch: str):
    """A random two-layer model of the family, from its tiny config (no weights downloaded)."""
    config = AutoConfig.for_model(arch, vocab_size=64, **TINY_CONFIGS[arch])
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_targets_of_each_family(arch):
    layers_name, matrices = FAMILIES[arch]
    model = tiny(arch)
    assert find_decoder_layers(model)[0] == layers_name
    targets = find_targets(model)
    expected = [
        (f"{layers_name}.{layer}.{path}.weight", layer, module, kind, shape)
        for layer in range(2)
        for path, (module, kind, shape) in matrices.items()
    ]
    found = [
        (t.param, t.layer, t.module_name, t.kind, tuple(t.module.weight.shape)) for t in targets
    ]
    assert sorted(found) == sorted(expected)
    parameters = dict(model.named_parameters())
    assert all(parameters[t.param] is t.module.weight for t in targets)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_modules_selects_by_kind_and_by_regex(arch):
    model = tiny(arch)
    everything = find_targets(model)
    attn, mlp = find_targets(model, "attn"), find_targets(model, "mlp")
    assert {t.kind for t in attn} == {"attn"} and {t.kind for t in mlp} == {"mlp"}
    assert sorted(t.param for t in attn + mlp) == sorted(t.param for t in everything)
    first_layer = find_targets(model, r"\.0\.")
    assert {t.layer for t in first_layer} == {0}
    assert len(first_layer) == len(everything) // 2


def test_bad_module_selections_are_clear_errors():
    model = tiny("llama")
    with pytest.raises(GradspecError, match="selects no weight matrix"):
        find_targets(model, "nonexist_xyz")
    with pytest.raises(GradspecError, match="not a valid regular expression"):
        find_targets(model, "(")


class MlpOnlyGpt2(ModelFamily):
    """A family for GPT-2 models alone that reads only their MLP matrices, named its own way."""

    name = "mlp-only-gpt2"

    def matches(self, model):
        return model.config.model_type == "gpt2"

    def matrices(self, layer):
        return ((path, module) for path, module in super().matrices(layer) if "mlp" in path)

    def canonical_name(self, relative_name):
        return f"gpt2-{relative_name}"


def test_a_registered_family_reads_the_models_it_matches(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", (MlpOnlyGpt2(), *families.FAMILIES))
    gpt2, llama = tiny("gpt2"), tiny("llama")
    assert families.family_for(gpt2).name == "mlp-only-gpt2"
    assert families.family_for(llama).name == "default"
    found = [(t.param, t.module_name, t.kind) for t in find_targets(gpt2)]
    assert found == [
        (f"transformer.h.{layer}.mlp.{leaf}.weight", f"gpt2-mlp.{leaf}", "mlp")
        for layer in range(2)
        for leaf in ("c_fc", "c_proj")
    ]
    assert len(find_targets(llama)) == 2 * len(LLAMA_LIKE)


def test_lora_matrices_are_named_after_the_merged_models_matrices():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    names = {(t.param.split(".layers.")[1], t.module_name, t.kind) for t in find_targets(model)}
    base = "base_model.model.model.layers.0"
    assert find_decoder_layers(model)[0] == base.removesuffix(".0")
    for path, module, kind in [
        ("self_attn.q_proj.base_layer", "q_proj", "attn"),
        ("self_attn.q_proj.lora_A.default", "q_proj.lora_A", "attn"),
        ("self_attn.q_proj.lora_B.default", "q_proj.lora_B", "attn"),
        ("self_attn.k_proj", "k_proj", "attn"),
        ("mlp.down_proj.base_layer", "down_proj", "mlp"),
        ("mlp.down_proj.lora_B.default", "down_proj.lora_B", "mlp"),
    ]:
        assert (f"0.{path}.weight", module, kind) in names
