"""Mixture-of-experts layers: where the routed experts and their routers are, and how
their fused weights split into each expert's gate, up and down matrices.

transformers keeps the routed experts of Qwen3-MoE, Mixtral, OLMoE, GPT-OSS and DeepSeek-V3
as fused 3-D parameters of one module (``mlp.experts.gate_up_proj``: experts x 2I x H,
``down_proj``: experts x H x I; GPT-OSS stores them transposed, with biases, and its gate
and up columns interleaved), not as Linear modules. Expert e maps only the tokens routed
to it, so for example b its weight gradients are sums over b's tokens t routed to e:

    d gate_up[e] = sum_t g_t^T x_t    g_t = dL/d(gate_up output of t), x_t its input
    d down[e]    = sum_t d_t^T a_t    d_t = dL/d(down output of t) = w_t dL/dy_t

with a_t the gated activation and w_t the routing weight the forward multiplies the down
output by (so it sits in d_t). gate and up are the two row blocks of gate_up; their
gradients take the matching columns of g. Each (expert, example) pair is a small
linear-layer gradient G^T X over its n tokens; expert_capture.py captures and solves them.
The router's weight (experts x H, in a module of its own beside the experts) maps every
token to its logits: a plain linear-layer gradient.
"""

from __future__ import annotations

import torch
from torch import nn

ROUTER = "router"


def is_routed_experts(module: nn.Module) -> bool:
    """Whether a module holds routed experts as fused 3-D parameters in transformers'
    layout (its ``use_experts_implementation`` classes)."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.ndim == 3 and hasattr(module, "is_transposed")


def is_router(module: nn.Module, experts: nn.Module) -> bool:
    """Whether a sibling of ``experts`` is its router: a 2-D ``weight`` of one row per expert
    outside a Linear module (the router's logits are ``hidden @ weight.T``)."""
    weight = getattr(module, "weight", None)
    return (
        not isinstance(module, nn.Linear)
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and weight.shape[0] == experts.down_proj.shape[0]
    )


def first_projection(experts: nn.Module) -> str:
    """Name of the fused parameter the experts' input goes through first."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def expert_matrices(experts: nn.Module) -> dict[str, str]:
    """Canonical matrix name -> the fused parameter holding it, for one experts module."""
    first = first_projection(experts)
    firsts = {"gate_proj": first, "up_proj": first} if experts.has_gate else {"up_proj": first}
    return {**firsts, "down_proj": "down_proj"}


def output_columns(experts: nn.Module, matrix: str) -> slice:
    """The columns of the fused projection's output (and rows of its out x in matrix) that
    are ``matrix``: gate then up, or interleaved gate/up pairs (GPT-OSS)."""
    if matrix == "down_proj" or not experts.has_gate:
        return slice(None)
    half = getattr(experts, first_projection(experts)).shape[2 if experts.is_transposed else 1] // 2
    if experts.is_concatenated:
        return slice(0, half) if matrix == "gate_proj" else slice(half, None)
    return slice(0, None, 2) if matrix == "gate_proj" else slice(1, None, 2)


def expert_gradient(
    experts: nn.Module, matrix: str, expert: int, grad: torch.Tensor
) -> torch.Tensor:
    """Expert ``expert``'s ``matrix`` (out x in) within a gradient of its fused parameter."""
    fused = grad[expert].mT if experts.is_transposed else grad[expert]
    return fused[output_columns(experts, matrix)]
