"""Loading a local causal LM and its tokenizer, and fingerprinting them for the manifest."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from .errors import GradspecError
from .gguf_checkpoint import MANIFEST as GGUF_MANIFEST
from .gguf_checkpoint import converted_checkpoint, find_gguf

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# The device types gradspec runs on, and whether this machine has each.
DEVICE_AVAILABLE = {
    "cpu": lambda: True,
    "cuda": torch.cuda.is_available,
    "mps": torch.backends.mps.is_available,
}


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; otherwise cpu, cuda, cuda:N or mps, if this
    machine has it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in DEVICE_AVAILABLE:
        raise GradspecError(f"--device {device}: use auto, cpu, cuda, cuda:N or mps")
    if not DEVICE_AVAILABLE[resolved.type]():
        raise GradspecError(f"--device {device}: {resolved.type} is not available on this machine")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise GradspecError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device, model_dir: Path) -> torch.dtype:
    """'auto' runs float32 on CPU and the checkpoint's own dtype (bf16 if float32) on GPU."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise GradspecError(f"--dtype {dtype}: use one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    from transformers import AutoConfig

    config_dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    return config_dtype if config_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def resolve_spectra_dtype(spectra_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """'auto' is float32 (float64 for a float64 model): as precise as the float32
    gradients it starts from, and 3-4x faster than float64 on a CPU."""
    if spectra_dtype == "auto":
        return torch.float64 if model_dtype == torch.float64 else torch.float32
    if spectra_dtype not in ("float32", "float64"):
        raise GradspecError(f"--spectra-dtype {spectra_dtype}: use auto, float32 or float64")
    return DTYPES[spectra_dtype]


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint folder; ``gguf`` describes the GGUF file it was converted from."""

    directory: Path
    gguf: dict[str, Any] | None = None


def check_model_path(model: str | os.PathLike) -> Path:
    """``model`` if it is a checkpoint folder or names a GGUF file; nothing is converted."""
    return find_gguf(model) or check_model_dir(model)


def resolve_checkpoint(model: str | os.PathLike) -> Checkpoint:
    """The checkpoint folder ``model`` names, converting a GGUF file (once, cached) first."""
    gguf_path = find_gguf(model)
    if gguf_path is None:
        return Checkpoint(check_model_dir(model))
    directory, described = converted_checkpoint(gguf_path)
    return Checkpoint(directory, described.record())


def check_model_dir(model: str | os.PathLike) -> Path:
    """A local checkpoint directory with a config.json; gradspec never downloads from a hub."""
    path = Path(model)
    if not (path / "config.json").is_file():
        raise GradspecError(
            f"--model {model}: not a local checkpoint directory with a "
            "config.json, nor a .gguf file (gradspec loads local paths only)"
        )
    return path


def load_model_and_tokenizer(
    model_dir: Path, dtype: torch.dtype, device: torch.device, eager_attention: bool = False
) -> tuple[torch.nn.Module, Any]:
    """The model in eval mode (no dropout) with frozen weights, and its tokenizer.

    ``eager_attention`` is for left padding: SDPA turns attention rows that see only
    padding (as in sliding-window layers) into NaN, eager attention does not.
    """
    transformers_logging.disable_progress_bar()  # gradspec shows its own progress
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    implementation = {"attn_implementation": "eager"} if eager_attention else {}
    if dtype == torch.float64:  # transformers' grouped experts kernels have no float64
        implementation["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **implementation)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def gguf_identity(manifest: Path) -> bytes:
    """A converted GGUF's description without the path it was converted from: the same file
    (by its sha256) converted from another place is the same model."""
    described = json.loads(manifest.read_text())
    described.pop("path", None)
    return json.dumps(described, sort_keys=True).encode()


# Config attributes that hold a model's context length, by architecture family.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def context_length(model_dir: Path) -> int | None:
    """The longest input the model was made for (its config's position count), if known."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    return next(
        (
            value
            for name in CONTEXT_ATTRIBUTES
            if isinstance(value := getattr(config, name, None), int) and value > 0
        ),
        None,
    )


def model_signature(model_dir: Path) -> dict[str, Any]:
    """Hash of the config, tokenizer and GGUF-source files plus weight file names and sizes.

    Weights are identified by name and size rather than hashed, since hashing many GB of
    weights on every run would cost more than the run itself.
    """
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + (model_dir / name).read_bytes())
    if (model_dir / GGUF_MANIFEST).is_file():
        digest.update(GGUF_MANIFEST.encode() + gguf_identity(model_dir / GGUF_MANIFEST))
    weights = sorted(
        (p.name, p.stat().st_size) for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES
    )
    digest.update(repr(weights).encode())
    return {"config_and_tokenizer_sha256": digest.hexdigest(), "weight_files": len(weights)}
