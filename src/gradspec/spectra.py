"""The math: the singular values of a per-example linear-layer gradient (statistics.py).

For a linear map with inputs X (T x d_in) and output gradients G (T x d_out) over one
example's T tokens, the weight gradient is G^T X (d_out x d_in). With thin QR factors
X^T = Q_x R_x and G^T = Q_g R_g (Q with orthonormal columns), G^T X = Q_g (R_g R_x^T) Q_x^T,
so its singular values are those of the small matrix R_g R_x^T (at most T x T). The full
gradient is formed only when that costs fewer flops (T large against min(d_in, d_out)).
"""

from __future__ import annotations

import torch

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
