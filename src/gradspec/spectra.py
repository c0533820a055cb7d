"""The math: singular values of a per-example linear-layer gradient, and their statistics.

For a linear map with inputs X (T x d_in) and output gradients G (T x d_out) over one
example's T tokens, the weight gradient is G^T X (d_out x d_in). With thin QR factors
X^T = Q_x R_x and G^T = Q_g R_g (Q with orthonormal columns), G^T X = Q_g (R_g R_x^T) Q_x^T,
so its singular values are those of the small matrix R_g R_x^T (at most T x T). The full
gradient is formed only when that costs fewer flops (T large against min(d_in, d_out)).
"""

from __future__ import annotations

import math

import numpy as np
import torch

RANK_TOLERANCE = 1e-7  # singular values at or below s_1 * this count as zero
STAT_COLUMNS = ("nuclear_norm", "spectral_norm", "frobenius_norm", "effective_rank")


SVD_COST_FACTOR = 3.0  # an SVD runs at about a third of the flop rate of QR and GEMM


def _qr_flops(rows: int, cols: int) -> float:
    long, short = max(rows, cols), min(rows, cols)
    return 2.0 * long * short**2 - 2.0 * short**3 / 3


def _svd_flops(rows: int, cols: int) -> float:
    long, short = max(rows, cols), min(rows, cols)
    return SVD_COST_FACTOR * (4.0 * long * short**2 - 4.0 * short**3 / 3)


def builds_full_gradient(tokens: int, d_out: int, d_in: int) -> bool:
    """Whether forming G^T X and taking its SVD costs fewer flops than the factor route."""
    k_out, k_in = min(d_out, tokens), min(d_in, tokens)
    factor = (
        _qr_flops(d_out, tokens)
        + _qr_flops(d_in, tokens)
        + 2.0 * k_out * tokens * k_in
        + _svd_flops(k_out, k_in)
    )
    full = 2.0 * tokens * d_out * d_in + _svd_flops(d_out, d_in)
    return full < factor


def tall_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """svdvals of a matrix or its transpose, whichever is tall (LAPACK is faster on those)."""
    return torch.linalg.svdvals(matrix if matrix.shape[-2] >= matrix.shape[-1] else matrix.mT)


def token_factor(a: torch.Tensor) -> torch.Tensor:
    """R of the thin QR of a^T (T x T at most), which keeps the singular values of a."""
    return torch.linalg.qr(a.mT, mode="r").R


def gradient_singular_values(
    g: torch.Tensor, x: torch.Tensor, x_factor: torch.Tensor | None = None
) -> torch.Tensor:
    """Descending singular values of g^T x, without building it when T is small.

    ``g`` is (..., T, d_out) and ``x`` (..., T, d_in); leading dimensions are a batch of
    examples (zero rows for padding change nothing). ``x_factor`` may pass a precomputed
    ``token_factor(x)``, shared by matrices that read the same input (q/k/v, gate/up).
    """
    if builds_full_gradient(g.shape[-2], g.shape[-1], x.shape[-1]):
        return tall_singular_values(g.mT @ x)
    r_x = token_factor(x) if x_factor is None else x_factor
    return tall_singular_values(token_factor(g) @ r_x.mT)


def spectrum_statistics(singular_values: np.ndarray, top_k: int = 0) -> dict[str, object]:
    """Nuclear, spectral and Frobenius norms and the effective rank (Roy and Vetterli).

    The effective rank is exp(entropy) of p_i = s_i / sum(s) over the non-zero s_i, those
    above s_1 * 1e-7; it is 0 for an all-zero gradient.
    """
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    largest = float(s[0]) if s.size else 0.0
    stats: dict[str, object] = {
        "nuclear_norm": float(s.sum()),
        "spectral_norm": largest,
        "frobenius_norm": float(math.sqrt(float(np.square(s).sum()))),
        "effective_rank": effective_rank(s),
    }
    if top_k:
        stats["top_singular_values"] = [float(v) for v in s[:top_k]]
    return stats


def effective_rank(descending: np.ndarray) -> float:
    """exp(-sum p log p) over the singular values above s_1 * RANK_TOLERANCE."""
    if not descending.size or descending[0] <= 0:
        return 0.0
    nonzero = descending[descending > descending[0] * RANK_TOLERANCE]
    p = nonzero / nonzero.sum()
    return float(math.exp(-float(np.sum(p * np.log(p)))))
