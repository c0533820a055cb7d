"""Models that do not fit one device: FSDP2 (``fully_shard``) across the ranks.

Each rank keeps 1/N of every decoder layer's weights and still profiles its own examples:
before a layer runs (forward, and again in backward) FSDP all-gathers its weights, so the
capture hooks see the rank's own full activations and output gradients, and the spectra
are those of the unsharded model. FSDP's all-gathers are collectives, so every rank must
run the same sequence of passes: :class:`gradspec.distributed.Lockstep` keeps them in step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
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
            "--shard fsdp splits the model over the ranks of a process group and this is one "
            "process: start it with `torchrun --nproc-per-node N` (N >= 2), or drop --shard"
        )
    if method == Method.reference:
        raise GradspecError(
            "--shard fsdp works with --method fast only: the reference method's weight "
            "gradients would be summed over the ranks"
        )


def shard_model(model: nn.Module, device: torch.device, ranks: Ranks) -> None:
    """``fully_shard`` each decoder layer (the model's ``_no_split_modules``), then the rest
    (embeddings, final norm, LM head) as one group, over all ranks; shards go to ``device``."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise GradspecError(
            f"--shard fsdp: {type(model).__name__} names no decoder layer class "
            "(_no_split_modules) to shard by"
        )
    mesh = init_device_mesh(device.type, (ranks.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
