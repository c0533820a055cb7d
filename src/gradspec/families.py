"""The registry of model families: which family reads a model, and its profiled targets.

A family (adapters.ModelFamily) says which modules of a model are its decoder layers,
which matrices in them are targets, how they are named and of which kind they are. The
default family's heuristics read every transformers causal LM tried so far.

To add a family, subclass ``ModelFamily`` in a module of its own (say ``fused_qkv_family.py``),
overriding what differs, with ``matches`` saying which models it reads, and put an
instance in ``FAMILIES`` before the default; nothing else changes.
"""

from __future__ import annotations

from torch import nn

from .adapters import (
    NOT_SELECTED,
    Coverage,
    ModelFamily,
    Target,
    is_weight_matrix,
    select_targets,
    unsupported,
)

FAMILIES: tuple[ModelFamily, ...] = (ModelFamily(),)  # the first that matches reads a model


def family_for(model: nn.Module) -> ModelFamily:
    """The first registered family that reads ``model`` (the default reads any)."""
    return next(family for family in FAMILIES if family.matches(model))


def find_targets(model: nn.Module, modules: str = "all") -> list[Target]:
    """The matrices of ``model``'s decoder layers that ``modules`` selects (``all``,
    ``attn``, ``mlp``, or a regular expression matched against the parameter name)."""
    return select_targets(family_for(model).targets(model), modules, type(model).__name__)


def coverage(model: nn.Module, targets: list[Target]) -> Coverage:
    """What ``targets`` cover of the decoder layers' weights (all parameters are counted,
    norms and biases too; only weight matrices and fused weights are named when left out)."""
    family = family_for(model)
    layers_name, layers = family.decoder_layers(model)
    weights = {f"{layers_name}.{name}": p for name, p in layers.named_parameters()}
    profiled = {t.param for t in targets}
    supported = {t.param for t in family.targets(model)}
    left_out = {
        name: NOT_SELECTED if name in supported else unsupported(p)
        for name, p in weights.items()
        if is_weight_matrix(name, p) and name not in profiled
    }
    return Coverage(
        tuple(name for name in weights if name in profiled),
        left_out,
        sum(p.numel() for name, p in weights.items() if name in profiled),
        sum(p.numel() for p in weights.values()),
    )
