"""Batches of encoded examples and their per-example losses.

Shared by the profiling engine and the default model's trainer: examples of similar length
are grouped so padding stays small, padded so padding changes nothing, and each example's
mean response-token loss is computed separately.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Encoded

MAX_PADDING = 0.1  # automatic batches: the share of padding an example may bring


@dataclass
class Batch:
    """Padded tensors for one forward pass; ``members`` index the chunk's examples.

    ``token_mask`` marks real tokens. ``attention_mask`` is what the model gets: None for
    right padding, where causality alone keeps real tokens from seeing the padding after
    them (and no fully masked attention row can turn into NaN).
    """

    members: list[int]
    input_ids: torch.Tensor
    token_mask: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    labels: torch.Tensor


def plan_batches(
    lengths: list[int], batch_size: int | None, token_budget: int, max_padding: float = MAX_PADDING
) -> list[list[int]]:
    """Group positions into batches, longest first, so padding stays small.

    A fixed ``batch_size`` takes that many per batch; otherwise a batch grows while its
    padded size (members x longest) stays within ``token_budget`` and each new member is
    at most ``max_padding`` (a share) shorter than the longest: padding costs as much as
    real tokens, and on a CPU batching gains little. Deterministic, so a resumed run forms
    the same batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        longest = lengths[current[0]] if current else 0
        fits = current is not None and (
            len(current) < batch_size
            if batch_size
            else (len(current) + 1) * longest <= token_budget
            and lengths[i] >= (1 - max_padding) * longest
        )
        if fits:
            current.append(i)
        else:
            batches.append([i])
    return batches


def collate(
    members: list[int], encoded: list[Encoded], pad_id: int, padding_side: str, device: torch.device
) -> Batch:
    """Pad a batch; position ids count real tokens only, so padding changes nothing."""
    width = max(len(encoded[m].input_ids) for m in members)
    ids = torch.full((len(members), width), pad_id, dtype=torch.long)
    labels = torch.full((len(members), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(members), width), dtype=torch.long)
    for row, member in enumerate(members):
        enc = encoded[member]
        n = len(enc.input_ids)
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, span] = torch.tensor(enc.input_ids)
        labels[row, span] = torch.tensor(enc.labels)
        mask[row, span] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    mask = mask.to(device)
    return Batch(
        members,
        ids.to(device),
        mask,
        mask if padding_side == "left" else None,
        positions.to(device),
        labels.to(device),
    )


def response_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token of some example of the batch,
    and the tokens they predict (IGNORE_INDEX where not a response token).

    The LM head skips the other positions (HF's ``logits_to_keep``), which saves much of
    its cost and memory at large vocabularies.
    """
    targets = batch.labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,
    }
    if _accepts_logits_to_keep(type(model)):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, keep]
    return logits, targets[:, keep]


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    """Whether the class's forward takes ``logits_to_keep`` (HF models do since 4.50)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def per_example_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each example's response tokens, ``logits[b, k]`` predicting
    ``targets[b, k]``, in float32 as HF computes it with labels (for float64 models too).

    Upcasts one example at a time, so float32 logits of a whole batch never coexist.
    """
    losses = []
    for row_logits, row_targets in zip(logits, targets, strict=True):
        token_losses = F.cross_entropy(
            row_logits.float(), row_targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        losses.append(token_losses / (row_targets != IGNORE_INDEX).sum())
    return torch.stack(losses)
