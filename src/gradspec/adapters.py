"""Model adapters: find the decoder layers of a causal LM and the projection matrices in them.

``ModelFamily`` says how gradspec reads a family of models: which modules are its decoder
layers, which matrices in them are targets, how they are named canonically and of which
kind they are. This class is the default family, whose heuristics work on the module tree,
not on a list of model classes: the decoder layers are the ModuleList with one entry per
hidden layer, and the matrices are the Linear (or GPT-2 Conv1D) modules inside them.
Names are then mapped to canonical module names, so a Llama ``self_attn.q_proj``, a GPT-2
``attn.c_attn`` and a GPT-NeoX ``attention.query_key_value`` land in comparable columns;
a PEFT LoRA wrapper's frozen base matrix is named as the merged model's, its ``lora_A`` /
``lora_B`` matrices get a suffix (``q_proj.lora_A``).

The default family also reads routed experts stored as fused 3-D parameters (found by
structure, experts.py: one ``Target`` per expert and matrix) and their routers. A family
whose layout these heuristics miss (say a fused qkv to be split) subclasses
``ModelFamily`` in its own module and is registered in families.py, which picks the
family of a model and selects its targets.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import GradspecError
from .experts import ROUTER, expert_gradient, expert_matrices, is_routed_experts, is_router

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP_MODULES = ("gate_proj", "up_proj", "gate_up_proj", "down_proj", "fc_in", "fc_out", ROUTER)

# Leaf names used by transformers' architectures, mapped to canonical names.
CANONICAL_NAMES = {
    "q_proj": "q_proj",
    "query": "q_proj",
    "k_proj": "k_proj",
    "key": "k_proj",
    "v_proj": "v_proj",
    "value": "v_proj",
    "o_proj": "o_proj",
    "out_proj": "o_proj",
    "qkv_proj": "qkv_proj",
    "c_attn": "qkv_proj",
    "query_key_value": "qkv_proj",
    "Wqkv": "qkv_proj",
    "W_pack": "qkv_proj",
    "gate_proj": "gate_proj",
    "w1": "gate_proj",
    "up_proj": "up_proj",
    "w3": "up_proj",
    "gate_up_proj": "gate_up_proj",
    "down_proj": "down_proj",
    "w2": "down_proj",
    "c_fc": "fc_in",
    "fc1": "fc_in",
    "fc_in": "fc_in",
    "dense_h_to_4h": "fc_in",
    "fc2": "fc_out",
    "fc_out": "fc_out",
    "dense_4h_to_h": "fc_out",
}
# Leaf names that mean the attention output in an attention block, the MLP output elsewhere.
OUTPUT_NAMES = {"c_proj", "dense"}
ATTENTION_PARENT = re.compile(r"attn|attention", re.IGNORECASE)
LORA_MATRICES = ("lora_A", "lora_B")
LORA_BASE = "base_layer"
SHARED_EXPERT = re.compile(r"shared_expert")


@dataclass(frozen=True)
class Target:
    """One weight matrix whose per-example gradient spectra are profiled."""

    param: str  # name in model.named_parameters()
    layer: int
    module_name: str  # canonical: q_proj, ..., fc_out, router
    kind: str  # "attn", "mlp" or "other"
    module: nn.Module
    expert: int | None = None  # a routed expert's matrix within the fused ``param``

    def weight(self) -> nn.Parameter:
        """The parameter holding the matrix (a fused 3-D one for an expert)."""
        return getattr(self.module, self.param.rsplit(".", 1)[1])

    def matrix(self, gradient: torch.Tensor) -> torch.Tensor:
        """This target's matrix (out x in) within a gradient of ``weight()``."""
        if self.expert is None:
            return gradient
        return expert_gradient(self.module, self.module_name, self.expert, gradient)


class ModelFamily:
    """How gradspec reads one family of causal LMs; this class holds the default heuristics.

    A family overrides what differs: ``matches`` (which models it reads), ``decoder_layers``,
    ``matrices`` (which modules of a layer are targets), ``canonical_name``, ``kind``, or
    ``targets`` as a whole (where one parameter holds several matrices).
    """

    name = "default"

    def matches(self, model: nn.Module) -> bool:
        """Whether this family reads ``model`` (the default reads every model)."""
        return True

    def decoder_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The (name, ModuleList) of decoder layers: one entry per hidden layer of the config."""
        return find_decoder_layers(model)

    def matrices(self, layer: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """(path inside the layer, module) of each 2-D projection matrix of a decoder layer."""
        for relative, module in layer.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and module.weight.ndim == 2:
                yield relative, module

    def canonical_name(self, relative_name: str) -> str:
        """Canonical name of a matrix from its path inside a decoder layer."""
        return lora_canonical_name(relative_name)

    def kind(self, module_name: str, relative_name: str) -> str:
        """'attn', 'mlp' or 'other'."""
        return module_kind(module_name, relative_name)

    def targets(self, model: nn.Module) -> list[Target]:
        """Every matrix of every decoder layer, in layer order: the Linear ones, then each
        routed expert's (within a fused 3-D weight) and the experts' routers."""
        layers_name, layers = self.decoder_layers(model)
        targets = []
        for layer_index, layer in enumerate(layers):
            prefix = f"{layers_name}.{layer_index}."
            for relative, module in self.matrices(layer):
                name = self.canonical_name(relative)
                kind = self.kind(name, relative)
                param = f"{prefix}{relative}.weight"
                targets.append(Target(param, layer_index, name, kind, module))
            targets += expert_targets(layer, prefix, layer_index)
        return targets


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (name, ModuleList) of decoder layers: one entry per hidden layer of the config."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for name, modules in lists:
        if len(modules) == n_layers:
            return name, modules
    if lists:  # No layer count in the config: take the longest list of same-class blocks.
        uniform = [(n, m) for n, m in lists if len({type(x) for x in m}) == 1]
        if uniform:
            return max(uniform, key=lambda item: len(item[1]))
    raise GradspecError(
        f"could not find the decoder layers of {type(model).__name__}: "
        "no ModuleList with one block per hidden layer"
    )


def canonical_module_name(relative_name: str) -> str:
    """Canonical name of a matrix from its path inside a decoder layer, e.g. 'mlp.c_proj'."""
    parts = relative_name.split(".")
    leaf, parents = parts[-1], ".".join(parts[:-1])
    if leaf in OUTPUT_NAMES:
        return "o_proj" if ATTENTION_PARENT.search(parents) else "fc_out"
    name = CANONICAL_NAMES.get(leaf, leaf)
    # A shared expert (DeepSeek, Qwen2-MoE) works beside the routed experts' gate_proj,
    # up_proj and down_proj in the same layer: its own names keep the two apart.
    return f"shared_{name}" if SHARED_EXPERT.search(parents) else name


def module_kind(module_name: str, relative_name: str) -> str:
    """'attn' or 'mlp' for known matrices; by the parent path for unknown ones."""
    if module_name in ATTENTION_MODULES:
        return "attn"
    if module_name in MLP_MODULES:
        return "mlp"
    if ATTENTION_PARENT.search(relative_name):
        return "attn"
    return "mlp" if re.search(r"mlp|ffn|feed_forward", relative_name) else "other"


def lora_canonical_name(relative_name: str) -> str:
    """``canonical_module_name``, where a PEFT wrapper's base_layer gets its parent's name
    and its lora_A / lora_B matrices their parent's name with a suffix."""
    parts = relative_name.split(".")
    if parts[-1] == LORA_BASE:
        return canonical_module_name(".".join(parts[:-1]))
    if len(parts) >= 3 and parts[-2] in LORA_MATRICES:
        return f"{canonical_module_name('.'.join(parts[:-2]))}.{parts[-2]}"
    return canonical_module_name(relative_name)


def select_targets(targets: list[Target], modules: str, model_name: str) -> list[Target]:
    """The targets ``modules`` selects: ``all``, ``attn``, ``mlp``, or a regular expression
    matched against the parameter name (for instance ``'layers\\.(0|1)\\.mlp'``)."""
    selected = [target for target in targets if _selected(target, modules)]
    if not selected:
        raise GradspecError(
            f"--modules '{modules}' selects no weight matrix in the decoder layers of {model_name}"
        )
    return selected


def expert_targets(layer: nn.Module, prefix: str, layer_index: int) -> list[Target]:
    """Each routed expert's gate, up and down matrices (fused 3-D weights) and the
    experts' router, for every mixture-of-experts block of one decoder layer."""
    targets = []
    for relative, module in layer.named_modules():
        if not is_routed_experts(module):
            continue
        block = relative.rpartition(".")[0]
        for child_name, child in layer.get_submodule(block).named_children():
            if is_router(child, module):
                param = prefix + ".".join(filter(None, (block, child_name, "weight")))
                targets.append(Target(param, layer_index, ROUTER, "mlp", child))
        for matrix, fused in expert_matrices(module).items():
            targets += [
                Target(f"{prefix}{relative}.{fused}", layer_index, matrix, "mlp", module, expert)
                for expert in range(module.down_proj.shape[0])
            ]
    return targets


def _selected(target: Target, modules: str) -> bool:
    if modules == "all":
        return True
    if modules in ("attn", "mlp"):
        return target.kind == modules
    try:
        return re.search(modules, target.param) is not None
    except re.error as exc:
        raise GradspecError(
            f"--modules '{modules}' is not a valid regular expression: {exc}"
        ) from None


NOT_SELECTED = "not selected by --modules"
LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Coverage:
    """Which decoder-layer weights a run profiles, the share of the decoder layers'
    parameters they hold, and every weight of two or more dimensions it leaves out, with
    the reason, so that nothing is skipped silently."""

    profiled: tuple[str, ...]
    left_out: dict[str, str]  # parameter name -> reason
    profiled_parameters: int
    decoder_parameters: int

    def as_dict(self) -> dict[str, Any]:
        """The manifest's ``coverage`` entry."""
        share = self.profiled_parameters / self.decoder_parameters if self.decoder_parameters else 0
        return {
            "profiled": list(self.profiled),
            "profiled_parameters": self.profiled_parameters,
            "decoder_parameters": self.decoder_parameters,
            "share": share,
            "left_out": dict(self.left_out),
        }


def is_weight_matrix(name: str, parameter: nn.Parameter) -> bool:
    """A weight of two or more dimensions; biases stacked per expert (GPT-OSS's
    ``gate_up_proj_bias``: experts x width) are vectors, as other biases."""
    return parameter.ndim >= 2 and not name.endswith("bias")


def unsupported(weight: nn.Parameter) -> str:
    """Why a weight is left out that no family's targets hold."""
    shape = "x".join(str(n) for n in weight.shape)
    return f"not supported: no per-example capture for this {weight.ndim}-D weight ({shape})"


def coverage_lines(entry: dict[str, Any]) -> list[str]:
    """A manifest's coverage for the console: the profiled share, then each left-out
    weight, its layers folded into one line per name and reason."""
    lines = [
        f"profiled {len(entry['profiled'])} decoder-layer weights holding "
        f"{entry['share']:.1%} of the decoder layers' parameters"
    ]
    folded: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, reason in entry["left_out"].items():
        folded[LAYER_INDEX.sub(".*.", name, count=1), reason].append(name)
    for (pattern, reason), names in folded.items():
        named = f"{pattern} ({len(names)} layers)" if len(names) > 1 else names[0]
        lines.append(f"left out: {named}: {reason}")
    return lines
