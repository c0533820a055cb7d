"""Shared fixtures: the shared data, a tokenizer trained on it, tiny random models per arch.

The shared data is needed only by the tests that ask for it (through ``shared_data``,
``tokenizer`` or ``tiny_model``); without it those are skipped and the pure-math and table
tests still run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)
from vocab import train_tokenizer

from gradspec.shared_data import SHARED_DATA_ENV, reasoning_file, shared_data_path

REPO = Path(__file__).resolve().parents[1]
# Only a path here: nothing is read until a test asks for the data.
SHARED_DATA = shared_data_path()
GSM8K = SHARED_DATA / reasoning_file("gsm8k", "with_cot")
GSM8K_DETAILED = SHARED_DATA / reasoning_file("gsm8k", "with_cot_gpt4o")  # the longest
NO_CUDA = (
    "no CUDA device here (torch.cuda.is_available() is False): these run on a GPU machine, "
    "as bench/gpu_check.sh does"
)
# The devices a device-parametrized test runs on: the CPU always, CUDA where there is one.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)],
    ),
]

# Small configs that keep each architecture's distinctive structure (GQA, fused QKV,
# Conv1D, soft-capping, parallel residual).
TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
TINY_GQA = {**TINY, "num_key_value_heads": 2}
TINY_CONFIGS: dict[str, dict] = {
    "llama": TINY_GQA,
    "mistral": TINY_GQA,
    "qwen2": TINY_GQA,
    "gemma": {**TINY_GQA, "head_dim": 12},
    "phi3": {**TINY_GQA, "max_position_embeddings": 1024},
    "gemma2": {**TINY_GQA, "head_dim": 12, "query_pre_attn_scalar": 12, "sliding_window": 16},
    "gpt2": dict(n_embd=48, n_layer=2, n_head=4, n_positions=1024),
    "gpt_neox": {**TINY, "max_position_embeddings": 1024},
    "phi": {**TINY, "max_position_embeddings": 1024},
}
# Mixtures of experts: 8 experts of width 32, 2 per token; DeepSeek-V3 with its low-rank
# attention, a dense first layer and a shared expert.
TINY_EXPERTS = dict(num_experts_per_tok=2, intermediate_size=32)
TINY_MOE_CONFIGS: dict[str, dict] = {
    "qwen3_moe": {**TINY_GQA, **TINY_EXPERTS, "num_experts": 8, "moe_intermediate_size": 32},
    "mixtral": {**TINY_GQA, **TINY_EXPERTS, "num_local_experts": 8},
    "olmoe": {**TINY_GQA, **TINY_EXPERTS, "num_experts": 8},
    "gpt_oss": {**TINY_GQA, **TINY_EXPERTS, "num_local_experts": 8, "head_dim": 12},
    "deepseek_v3": {  # multi-head latent attention: no key/value head groups
        **TINY,
        "intermediate_size": 96,
        "num_experts_per_tok": 2,
        "n_routed_experts": 8,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": 24,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 8,
        "v_head_dim": 12,
    },
}
TINY_CONFIGS.update(TINY_MOE_CONFIGS)


def read_shared(path: Path, n: int | None = None) -> list[dict]:
    """The first ``n`` records of a shared data file."""
    return json.loads(path.read_text())[:n]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """The device a test runs on: "cpu", and "cuda" (skipped with the reason without a GPU)."""
    return request.param


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; tests that need it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA} (set {SHARED_DATA_ENV})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer(shared_data: Path) -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE trained on real reasoning data."""
    texts = [r["instruction"] + "\n" + r["output"] for r in read_shared(GSM8K, 300)]
    return train_tokenizer(texts, vocab_size=512)


def build_tiny_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, directory: Path, seed: int = 0
) -> Path:
    """Save a randomly initialised tiny ``arch`` model and the tokenizer to ``directory``."""
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIGS[arch],
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(
    tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """Factory: the directory of a tiny random model of the given architecture (cached)."""
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tokenizer, tmp_path_factory.mktemp(arch))
        return built[arch]

    return make
