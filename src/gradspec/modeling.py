"""Resolving ``--model`` (a local folder, a GGUF file, a Hub id, a PEFT adapter) to a
checkpoint folder, loading the causal LM and its tokenizer, and fingerprinting them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from .adapters import Target
from .errors import GradspecError
from .families import find_targets
from .gguf_checkpoint import MANIFEST as GGUF_MANIFEST
from .gguf_checkpoint import converted_checkpoint, find_gguf
from .hub import is_hub_id, model_snapshot
from .lora import Adapter, find_adapter, is_lora_factor, load_adapter
from .options import AdapterMatrices

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


def resolve_dtype(
    dtype: str, device: torch.device, model_dir: Path, trust_remote_code: bool = False
) -> torch.dtype:
    """'auto' runs float32 on CPU and the checkpoint's own dtype (bf16 if float32) on GPU."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise GradspecError(f"--dtype {dtype}: use one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    from transformers import AutoConfig

    with remote_code_refused(model_dir):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    config_dtype = getattr(config, "dtype", None)
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
    """The folder a model loads from; how ``--model`` named it (a GGUF file it was converted
    from, a Hub id and commit); a PEFT adapter applied on top of it."""

    directory: Path
    gguf: dict[str, Any] | None = None
    hub: dict[str, Any] | None = None
    adapter: Adapter | None = None
    trust_remote_code: bool = False

    def record(self) -> dict[str, Any]:
        """The manifest's ``model`` section (without the signature)."""
        named = {"gguf": self.gguf, "hub": self.hub}
        named["adapter"] = self.adapter.record() if self.adapter else None
        return {"path": str(self.directory.resolve()), **{k: v for k, v in named.items() if v}}

    @cached_property
    def signature(self) -> dict[str, Any]:
        """What identifies the weights, computed once: the folder's signature, the Hub id
        and commit, the adapter's hash (not the local paths, so a Hub id and its cached
        folder agree)."""
        identity = model_signature(self.directory)
        if self.hub:
            identity["hub"] = {k: self.hub[k] for k in ("repo_id", "commit")}
        if self.adapter:
            identity["adapter_sha256"] = self.adapter.sha256
        return identity


def check_model_path(
    model: str | os.PathLike, revision: str | None = None, trust_remote_code: bool = False
) -> Path | str:
    """``model`` if it names a checkpoint folder, a GGUF file, a PEFT adapter or a Hub
    model (fetched into the Hub cache when online); nothing is converted."""
    if _is_local(model):
        _refuse_revision(model, revision)
        return find_gguf(model) or _adapter_or_model_dir(Path(model))
    resolve_checkpoint(model, revision, trust_remote_code)
    return os.fspath(model)


def resolve_checkpoint(
    model: str | os.PathLike | Checkpoint,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Checkpoint:
    """The checkpoint ``model`` names: a local folder or GGUF file (converted once, cached)
    wins over a Hub id (``org/name``, ``org/name@revision``) of the same spelling; a folder
    with ``adapter_config.json`` is a PEFT adapter on its base model (local or Hub). A
    resolved Checkpoint is returned as it is."""
    if isinstance(model, Checkpoint):
        return model
    if _is_local(model):
        _refuse_revision(model, revision)
        gguf_path = find_gguf(model)
        if gguf_path is not None:
            directory, described = converted_checkpoint(gguf_path)
            return Checkpoint(directory, gguf=described.record())
        checkpoint = Checkpoint(_adapter_or_model_dir(Path(model)))
    else:
        snapshot = model_snapshot(os.fspath(model), revision, trust_remote_code)
        checkpoint = Checkpoint(snapshot.directory, hub=snapshot.record())
    adapter = find_adapter(checkpoint.directory, checkpoint.hub)
    if adapter is None:
        return dataclasses.replace(checkpoint, trust_remote_code=trust_remote_code)
    base = resolve_checkpoint(adapter.base, adapter.base_revision, trust_remote_code)
    return dataclasses.replace(base, adapter=adapter)


def _is_local(model: str | os.PathLike) -> bool:
    """A path that exists, or one that cannot be a Hub id (so it is reported as a path)."""
    return Path(model).exists() or not is_hub_id(os.fspath(model))


def _refuse_revision(model: str | os.PathLike, revision: str | None) -> None:
    if revision:
        raise GradspecError(
            f"--revision {revision}: only for a Hub model id; --model {model} is a local path"
        )


def _adapter_or_model_dir(path: Path) -> Path:
    """``path`` if it holds a PEFT adapter, else it must be a checkpoint folder."""
    return path if find_adapter(path, None) is not None else check_model_dir(path)


def check_model_dir(model: str | os.PathLike) -> Path:
    """A local checkpoint directory with a config.json."""
    path = Path(model)
    if not (path / "config.json").is_file():
        raise GradspecError(
            f"--model {model}: not a local checkpoint directory with a config.json, a "
            ".gguf file, a PEFT adapter folder (adapter_config.json), nor a Hub id (org/name)"
        )
    return path


@contextmanager
def remote_code_refused(model_dir: Path) -> Iterator[None]:
    """transformers' refusal of a model whose code lives in its repository, as one line."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise GradspecError(
            f"--model {model_dir}: its code lives in its repository; run it only if you "
            "trust that code, with --trust-remote-code"
        ) from None


def load_model_and_tokenizer(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    eager_attention: bool = False,
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """The model in eval mode (no dropout) with frozen weights, and its tokenizer.

    ``eager_attention`` is for left padding: SDPA turns attention rows that see only
    padding (as in sliding-window layers) into NaN, eager attention does not. A model whose
    code lives in its repository loads only with ``trust_remote_code``.
    """
    transformers_logging.disable_progress_bar()  # gradspec shows its own progress
    implementation = {"attn_implementation": "eager"} if eager_attention else {}
    if dtype == torch.float64 and has_routed_experts(model_dir):
        implementation["experts_implementation"] = "eager"  # grouped kernels lack float64
    with remote_code_refused(model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **implementation
        )
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


def context_length(model_dir: Path, trust_remote_code: bool = False) -> int | None:
    """The longest input the model was made for (its config's position count), if known."""
    from transformers import AutoConfig

    with remote_code_refused(model_dir):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    config = config.get_text_config()
    return next(
        (
            value
            for name in CONTEXT_ATTRIBUTES
            if isinstance(value := getattr(config, name, None), int) and value > 0
        ),
        None,
    )


def load_checkpoint(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    matrices: AdapterMatrices,
    eager_attention: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """The model of ``checkpoint`` (with its PEFT adapter, merged or not) and tokenizer."""
    model, tokenizer = load_model_and_tokenizer(
        checkpoint.directory, dtype, device, eager_attention, checkpoint.trust_remote_code
    )
    if checkpoint.adapter is None:
        return model, tokenizer
    return load_adapter(model, checkpoint.adapter, matrices, tokenizer)


def checkpoint_targets(
    model: torch.nn.Module, checkpoint: Checkpoint, modules: str, matrices: AdapterMatrices
) -> list[Target]:
    """The matrices to profile; with an unmerged adapter its LoRA factors (``lora``) or
    those and the base matrices (``both``), named as the training monitor names them (the
    model families name a PEFT wrapper's matrices so)."""
    targets = find_targets(model, modules)
    if checkpoint.adapter is not None and matrices == AdapterMatrices.lora:
        targets = [t for t in targets if is_lora_factor(t)]
    if not targets:
        raise GradspecError(f"--modules '{modules}' selects no LoRA matrix of the adapter")
    return targets


MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def has_routed_experts(model_dir: Path) -> bool:
    """Whether the config names routed experts (only such models take, and only transformers
    versions that fuse experts know, the ``experts_implementation`` argument)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return any(config.get(key) for key in MOE_CONFIG_KEYS)


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
