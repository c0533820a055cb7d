"""The loss weight of each example's response tokens, read back from the logits' gradient.

Whatever the Trainer's loss normalisation (tokens of the whole batch, ``num_items_in_batch``,
gradient accumulation, DDP's world-size factor, a loss scaler), every response token of a
batch gets the same weight w in the loss that is differentiated. For cross-entropy,
dL/dlogits_t = w (softmax_t - onehot_t), so w can be read from the logits' gradient; the
monitor rescales each example's output gradients by 1 / (w n_i), so that its spectra are
those of its own mean response loss.
"""

from __future__ import annotations

import torch

from ..data import IGNORE_INDEX
from ..errors import GradspecError

# How far the per-token weights read from the logits' gradient may spread (relative): a
# loss that does not weight response tokens equally (label smoothing, a custom loss) is
# refused rather than converted wrongly.
WEIGHT_SPREAD = {torch.float64: 1e-6, torch.float32: 1e-3}
HALF_PRECISION_SPREAD = 5e-2


def response_token_weights(
    logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: the loss weight w of its response tokens (read from the logits'
    gradient), its mean response-token loss, and its number of response tokens.

    ``logits[b, t]`` predicts ``labels[b, t + 1]``; for cross-entropy with weight w,
    grad_t = w (p_t - onehot_t), so w = <grad_t, r_t> / |r_t|^2 with r_t = p_t - onehot_t.
    """
    targets = labels[:, 1:]
    weights, losses, counts = [], [], []
    rows = zip(logits[:, :-1], grad[:, :-1], targets, strict=True)
    for row_logits, row_grad, row_targets in rows:
        valid = row_targets != IGNORE_INDEX
        z, g, y = row_logits[valid].float(), row_grad[valid].float(), row_targets[valid]
        log_p = z.log_softmax(-1)
        residual = log_p.exp()
        residual[torch.arange(len(y)), y] -= 1.0
        norm = residual.square().sum(-1)
        usable = norm > 1e-12
        token_w = (g * residual).sum(-1)[usable] / norm[usable]
        weights.append(_common_weight(token_w, grad.dtype))
        losses.append(-log_p[torch.arange(len(y)), y].mean())
        counts.append(valid.sum())
    return torch.stack(weights), torch.stack(losses), torch.stack(counts)


def fused_token_weights(
    log_probs: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`response_token_weights` for TRL's fused LM head, whose output is the
    log-probability of each next token: there, w is minus its gradient."""
    valid = labels[:, 1:] != IGNORE_INDEX
    weights, losses = [], []
    for row_lp, row_grad, row_valid in zip(log_probs.float(), grad, valid, strict=True):
        weights.append(_common_weight(-row_grad[row_valid].float(), grad.dtype))
        losses.append(-row_lp[row_valid].mean())
    return torch.stack(weights), torch.stack(losses), valid.sum(1)


def _common_weight(token_w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight shared by an example's response tokens; nan when it has none."""
    if not token_w.numel():
        return token_w.new_tensor(float("nan"))
    w = token_w.mean()
    spread = float((token_w - w).abs().max() / w.abs().clamp_min(1e-30))
    if spread > WEIGHT_SPREAD.get(dtype, HALF_PRECISION_SPREAD):
        raise GradspecError(
            "the training loss does not weight response tokens equally (relative spread "
            f"{spread:.2g}): gradspec converts only token-mean cross-entropy (no label "
            "smoothing or custom compute_loss)"
        )
    return w
