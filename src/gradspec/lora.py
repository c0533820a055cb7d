"""PEFT adapters as ``--model``: a folder (or Hub repository) with ``adapter_config.json``.

The adapter is loaded with ``peft`` onto its base model (``base_model_name_or_path``: a
local folder or a Hub id, at ``revision`` when the adapter records one). Profiled are the
merged matrices W + s BA (``merge_and_unload``: the model the adapter stands for), or the
adapter's own A and B matrices, or both the frozen base matrices and A and B of the
unmerged model, which is what the training monitor profiles while a LoRA model trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .adapters import LORA_MATRICES, Target
from .errors import GradspecError
from .options import AdapterMatrices

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # an adapter trained with added tokens has one


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter folder, the base model it names, and the hash of its files."""

    directory: Path
    base: str
    base_revision: str | None
    peft_type: str
    sha256: str
    hub: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """What the manifest records about the adapter."""
        record = {
            "path": str(self.directory.resolve()),
            "base_model_name_or_path": self.base,
            "peft_type": self.peft_type,
            "sha256": self.sha256,
        }
        return {**record, **({"hub": self.hub} if self.hub else {})}


def find_adapter(directory: Path, hub: dict[str, Any] | None) -> Adapter | None:
    """The adapter in ``directory``, or None when it holds no ``adapter_config.json``."""
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GradspecError(f"{config_path}: not valid JSON ({exc})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise GradspecError(
            f"{config_path}: field 'base_model_name_or_path' must name the base model "
            "(a folder or a Hub id)"
        )
    peft_type = str(config.get("peft_type"))
    return Adapter(directory, base, config.get("revision"), peft_type, _sha256(directory), hub)


def _sha256(directory: Path) -> str:
    """Hash of every file of the adapter folder (its config and small weight files)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def is_lora_factor(target: Target) -> bool:
    """Whether ``target`` is a LoRA A or B matrix (``q_proj.lora_A``, as families name them)."""
    return target.module_name.rpartition(".")[2] in LORA_MATRICES


def load_adapter(
    model: nn.Module, adapter: Adapter, matrices: AdapterMatrices, tokenizer: Any
) -> tuple[nn.Module, Any]:
    """``model`` with the adapter (merged into its weights for ``merged``), frozen, and the
    adapter's own tokenizer where it has one, else ``tokenizer``."""
    try:
        from peft import PeftModel
    except ImportError:
        raise GradspecError(
            f"--model {adapter.directory}: a PEFT adapter needs the 'peft' package: "
            "pip install 'gradspec[train]'"
        ) from None
    try:
        wrapped = PeftModel.from_pretrained(model, adapter.directory)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise GradspecError(
            f"--model {adapter.directory}: peft cannot apply it to {adapter.base}: {exc}"
        ) from None
    loaded = wrapped.merge_and_unload() if matrices == AdapterMatrices.merged else wrapped
    loaded.eval()
    loaded.requires_grad_(False)
    if (adapter.directory / TOKENIZER_CONFIG).is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter.directory)
    return loaded, tokenizer
