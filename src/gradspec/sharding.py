"""Models that do not fit one device: FSDP2 (``fully_shard``) across the ranks.

Each rank keeps a shard of every decoder layer's weights and still profiles its own
examples: before a layer runs (forward, and again in backward) FSDP all-gathers its
weights, so the capture hooks see the rank's own full activations and output gradients,
and the spectra are those of the unsharded model. ``fsdp`` shards over all ranks; ``hsdp``
over the ranks of each node (``LOCAL_WORLD_SIZE``), so the all-gathers stay inside a node
while each node holds a whole copy; with frozen weights there is nothing to reduce across
nodes. FSDP's all-gathers are collectives, so every rank must run the same sequence of
passes: :class:`gradspec.distributed.Lockstep` keeps them in step.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from .distributed import Ranks
from .errors import GradspecError
from .options import Method, Shard


def check_shard(shard: Shard, ranks: Ranks, method: Method) -> None:
    """Refuse a sharding the run cannot use, before anything is loaded."""
    if shard == Shard.none:
        return
    if not ranks.distributed:
        raise GradspecError(
            f"--shard {shard} splits the model over the ranks of a process group and this is "
            "one process: start it with `torchrun --nproc-per-node N` (N >= 2), or drop --shard"
        )
    if method == Method.reference:
        raise GradspecError(
            f"--shard {shard} works with --method fast only: the reference method's weight "
            "gradients would be summed over the ranks"
        )
    if shard == Shard.hsdp and ranks.size % ranks_per_node(ranks) != 0:
        raise GradspecError(
            f"--shard hsdp: {ranks.size} ranks do not make nodes of {ranks_per_node(ranks)} "
            "(LOCAL_WORLD_SIZE) each; start the same number of ranks on every node"
        )


def ranks_per_node(ranks: Ranks) -> int:
    """The launcher's ``LOCAL_WORLD_SIZE`` (all ranks when it is not set)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", ranks.size))


def shard_model(model: nn.Module, device: torch.device, ranks: Ranks, shard: Shard) -> None:
    """``fully_shard`` each decoder layer (the model's ``_no_split_modules``), then the rest
    (embeddings, final norm, LM head) as one group; shards go to ``device``."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise GradspecError(
            f"--shard {shard}: {type(model).__name__} names no decoder layer class "
            "(_no_split_modules) to shard by"
        )
    mesh = _mesh(device, ranks, shard)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _mesh(device: torch.device, ranks: Ranks, shard: Shard) -> DeviceMesh:
    """All ranks in one shard group (fsdp), or one per node, replicated across nodes (hsdp)."""
    if shard == Shard.hsdp:
        per_node = ranks_per_node(ranks)
        shape, names = (ranks.size // per_node, per_node), ("replicate", "shard")
        return init_device_mesh(device.type, shape, mesh_dim_names=names)
    return init_device_mesh(device.type, (ranks.size,))
