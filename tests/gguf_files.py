"""Tiny GGUF files written with the `gguf` package, as llama.cpp's converter writes them.

:func:`tiny_checkpoint` saves a random tiny Llama or Qwen2 (dimensions that are multiples
of Q8_0's 32-value blocks) with a tokenizer; :func:`write_gguf` writes its weights to a
GGUF file: 2-D weights in the requested type, norms and biases in F32, Llama's Q and K
rows permuted as llama.cpp does (transformers' loader permutes them back), tokenizer and
config in the metadata. :func:`expected_weights` is the state dict the GGUF stands for:
the weights themselves for F32, ``dequantize(quantize(w))`` for quantised types.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=2.0**-20,  # exact in float32, as GGUF stores it
)
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def tiny_checkpoint(
    arch: str, tokenizer: PreTrainedTokenizerFast, directory: Path, tied: bool, seed: int = 0
) -> Path:
    """Save a random tiny ``arch`` model (float32) and ``tokenizer`` to ``directory``."""
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_DIMS,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random biases and norms, so a lost one changes the profile
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _permute_like_llama_cpp(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Llama's Q and K (rotary halves interleaved)."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tensor_bytes(weights: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """``weights`` encoded as ``kind``; zeros of the right size for types gguf cannot encode."""
    if kind == GGMLQuantizationType.F32:
        return weights.astype(np.float32)
    if kind in gguf.quants._type_traits:
        return gguf.quants.quantize(weights.astype(np.float32), kind)
    return np.zeros(gguf.quant_shape_to_byte_shape(weights.shape, kind), dtype=np.uint8)


def write_gguf(
    checkpoint: Path,
    out: Path,
    kind: GGMLQuantizationType = GGMLQuantizationType.F32,
    architecture: str | None = None,
) -> Path:
    """Write the checkpoint's weights, config and tokenizer as one GGUF file ``out``.

    ``architecture`` overrides the recorded ``general.architecture`` (for refusals).
    """
    config = AutoConfig.from_pretrained(checkpoint)
    arch = config.model_type
    writer = gguf.GGUFWriter(out, architecture or gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, checkpoint)
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], config.num_hidden_layers)
    for name, tensor in load_file(checkpoint / "model.safetensors").items():
        weights = tensor.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weights = _permute_like_llama_cpp(weights, heads)
        encoded = _tensor_bytes(weights, kind if weights.ndim == 2 else GGMLQuantizationType.F32)
        raw_dtype = None if encoded.dtype == np.float32 else kind
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(gguf_name, encoded, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Path) -> None:
    """The byte-level BPE of ``checkpoint`` in llama.cpp's ``gpt2`` tokenizer metadata."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    model = tokenizer.backend_tokenizer.model
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([TOKEN_CONTROL if i in special else TOKEN_NORMAL for _, i in vocab])
    writer.add_token_merges([" ".join(pair) for pair in _merges(model)])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer.chat_template)


def _merges(model: models.Model) -> list[tuple[str, str]]:
    """The BPE merges of a tokenizers model, in order."""
    state = json.loads(Tokenizer(model).to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state]


def expected_weights(checkpoint: Path, kind: GGMLQuantizationType) -> dict[str, torch.Tensor]:
    """The float32 state dict a GGUF of ``checkpoint`` in ``kind`` stands for."""
    weights = load_file(checkpoint / "model.safetensors")
    if kind == GGMLQuantizationType.F32:
        return weights
    return {
        name: torch.from_numpy(
            gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), kind), kind).copy()
        )
        if t.ndim == 2
        else t
        for name, t in weights.items()
    }


def reference_checkpoint(
    checkpoint: Path, converted: Path, weights: dict[str, torch.Tensor], out: Path
) -> Path:
    """``checkpoint``'s config with ``weights``, and the tokenizer rebuilt from the GGUF.

    The GGUF's tokenizer may split text differently (Qwen2 splits digits), so the
    reference uses it too: the comparison is about the weights.
    """
    out.mkdir(parents=True)
    (out / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    for path in converted.iterdir():
        if path.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            (out / path.name).write_bytes(path.read_bytes())
    tensors = {name: tensor.contiguous() for name, tensor in weights.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
