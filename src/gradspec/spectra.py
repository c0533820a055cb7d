"""The math: the singular values of a per-example linear-layer gradient (statistics.py).

For a linear map with inputs X (T x d_in) and output gradients G (T x d_out) over one
example's T tokens, the weight gradient is G^T X (d_out x d_in), of rank at most T. Three
exact routes give its singular values, each with a cost estimate (the registry that
chooses among them and says where their solves run is routes.py):

- ``full``: form G^T X and take its SVD (T large against min(d_in, d_out));
- ``gram``: with X X^T = C C^T, the squared non-zero singular values are the eigenvalues
  of the symmetric T x T matrix C^T (G G^T) C. The Grams are accumulated in float64 (a Gram
  squares the condition number), so the square roots are as precise as float32 gradients;
- ``factor``: with thin QRs X^T = Q_x R_x and G^T = Q_g R_g, the singular values of the
  small R_g R_x^T. A side with no more columns than tokens (k/v's 192 outputs at T = 300)
  is used as it is: its QR would not shrink it, and G^T R_x^T has the singular values of
  G^T X since Q_x has orthonormal columns.

Each route splits into GEMM work (``prepare_full``, ``prepare_gram``, ``prepare_factor``:
on the model's device, while the gradients exist) and a small T x T ``Solve``, which may
run elsewhere (another thread, or the CPU: ``Solve.to``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

# Costs in float32-GEMM flop equivalents, the same on every device: they only estimate
# which routes are worth timing (tuning.py measures the run's own shapes on its own device
# and picks the fastest) and choose where nothing is measured.
SVD_COST_FACTOR = 3.0  # an SVD runs at about a third of the flop rate of QR and GEMM
FLOAT64_COST_FACTOR = 2.0  # a float64 GEMM against a float32 one
EIGVALSH_COST_FACTOR = 4.0  # float64 eigvalsh per (4/3) T^3 flops, mostly matrix-vector bound


def _token_factor_flops(width: int, tokens: int) -> float:
    """Flops of ``token_factor`` on a T x width side: a QR where T < width, else none."""
    if tokens >= width:
        return 0.0
    return 2.0 * width * tokens**2 - 2.0 * tokens**3 / 3


def _svd_flops(rows: int, cols: int) -> float:
    long, short = max(rows, cols), min(rows, cols)
    return SVD_COST_FACTOR * (4.0 * long * short**2 - 4.0 * short**3 / 3)


def full_cost(tokens: int, d_out: int, d_in: int, device_type: str) -> float:
    """Estimated cost of the ``full`` route for one example: G^T X and its SVD."""
    return 2.0 * tokens * d_out * d_in + _svd_flops(d_out, d_in)


def gram_cost(tokens: int, d_out: int, d_in: int, device_type: str) -> float:
    """Estimated cost of the ``gram`` route for one example (no input work shared)."""
    gram_products = 2.0 * tokens**2 * (d_out + d_in) + tokens**3 / 3 + 4.0 * tokens**3
    gram = FLOAT64_COST_FACTOR * gram_products + EIGVALSH_COST_FACTOR * 4 / 3 * tokens**3
    return gram


def factor_cost(tokens: int, d_out: int, d_in: int, device_type: str) -> float:
    """Estimated cost of the ``factor`` route for one example (no input work shared)."""
    k_out, k_in = min(d_out, tokens), min(d_in, tokens)
    return (
        _token_factor_flops(d_out, tokens)
        + _token_factor_flops(d_in, tokens)
        + 2.0 * k_out * tokens * k_in
        + _svd_flops(k_out, k_in)
    )


def tall_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """svdvals of a matrix or its transpose, whichever is tall (LAPACK is faster on those).

    On a CPU this beats a float64 Gram's ``eigvalsh`` on the square T x T cores from T ~ 265
    (bench/README.md)."""
    return torch.linalg.svdvals(matrix if matrix.shape[-2] >= matrix.shape[-1] else matrix.mT)


def driver_singular_values(matrix: torch.Tensor, driver: str) -> torch.Tensor:
    """svdvals through one cuSOLVER driver (``gesvd``: QR iteration, ``gesvdj``: Jacobi;
    CUDA only), on the tall orientation."""
    return torch.linalg.svdvals(
        matrix if matrix.shape[-2] >= matrix.shape[-1] else matrix.mT, driver=driver
    )


def gram_product_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values as square roots of the eigenvalues of the float64 Gram product of
    the smaller side (M^T M or M M^T): one symmetric eigenproblem instead of an SVD. The
    Gram squares the condition number, so values keep float32's precision, not float64's."""
    m = matrix.to(torch.float64)
    product = m.mT @ m if m.shape[-1] <= m.shape[-2] else m @ m.mT
    values = torch.linalg.eigvalsh(product).clamp(min=0).sqrt().flip(-1)
    return values.to(matrix.dtype)


def token_factor(a: torch.Tensor) -> torch.Tensor:
    """a^T (..., d, T), or the R of its thin QR where that is smaller (T < d): a left factor
    with orthonormal columns away, so a product with it keeps its singular values."""
    tokens, width = a.shape[-2:]
    return torch.linalg.qr(a.mT, mode="r").R if tokens < width else a.mT


@dataclass
class InputGram:
    """X X^T in float64 with padding rows set to the identity, and which rows are real.

    A zero row of X adds nothing to G^T X; an identity row there (and the matching row of
    G G^T zeroed) keeps the Gram positive definite without changing the spectrum.
    ``factor`` (C with C C^T = the Gram) is computed once by the first solve needing it.
    """

    gram: torch.Tensor
    kept: torch.Tensor
    factor: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> InputGram:
        """A copy on ``device`` (its factor, if computed, included)."""
        factor = None if self.factor is None else self.factor.to(device)
        return InputGram(self.gram.to(device), self.kept.to(device), factor)


def input_gram(x: torch.Tensor) -> InputGram:
    """The float64 Gram of the rows of x (..., T, d_in), rows of zeros marked as padding."""
    x64 = x.to(torch.float64)
    gram = x64 @ x64.mT
    kept = gram.diagonal(dim1=-2, dim2=-1) > 0
    gram.diagonal(dim1=-2, dim2=-1).masked_fill_(~kept, 1.0)
    return InputGram(gram, kept)


def output_gram(g: torch.Tensor, x_gram: InputGram) -> torch.Tensor:
    """G G^T in float64, zero on the rows and columns where X is zero."""
    g64 = g.to(torch.float64).masked_fill(~x_gram.kept.unsqueeze(-1), 0.0)
    return g64 @ g64.mT


def gram_factor(x_gram: InputGram) -> torch.Tensor:
    """C with C C^T = X X^T: Cholesky, or from eigh where the Gram is singular
    (repeated tokens), both backward stable. Cached on ``x_gram``."""
    if x_gram.factor is None:
        factor, info = torch.linalg.cholesky_ex(x_gram.gram)
        failed = info != 0
        if failed.any():
            values, vectors = torch.linalg.eigh(x_gram.gram[failed])
            factor[failed] = vectors * values.clamp(min=0).sqrt().unsqueeze(-2)
        x_gram.factor = factor
    return x_gram.factor


def gram_singular_values(x_gram: InputGram, g_gram: torch.Tensor) -> torch.Tensor:
    """Descending singular values of G^T X from the two Grams (float64, on their device)."""
    factor = gram_factor(x_gram)
    core = factor.mT @ g_gram @ factor
    eigenvalues = torch.linalg.eigvalsh(core)
    return eigenvalues.clamp(min=0).sqrt().flip(-1)


class InputSpectra:
    """One input X as the routes read it, each factor computed once for all the matrices
    that read X (q/k/v, gate/up)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self._qr: torch.Tensor | None = None
        self._gram: InputGram | None = None

    def qr_factor(self) -> torch.Tensor:
        if self._qr is None:
            self._qr = token_factor(self.rows)
        return self._qr

    def gram(self) -> InputGram:
        if self._gram is None:
            self._gram = input_gram(self.rows)
        return self._gram


@dataclass(frozen=True)
class Solve:
    """A route's small solve, split from its GEMMs: ``function(*operands)`` gives the
    descending singular values of each example. Its operands can be moved (``to``), so the
    solve can run on another device than the GEMMs."""

    function: Callable[..., torch.Tensor]
    operands: tuple[Any, ...]

    def __call__(self) -> torch.Tensor:
        return self.function(*self.operands)

    def to(self, device: torch.device | str) -> Solve:
        """The same solve with its tensors (and Grams) on ``device``."""
        moved = tuple(
            item.to(device) if isinstance(item, (torch.Tensor, InputGram)) else item
            for item in self.operands
        )
        return replace(self, operands=moved)


def prepare_full(g: torch.Tensor, x: InputSpectra) -> Solve:
    """Build each example's G^T X now; its SVD is the solve."""
    return Solve(tall_singular_values, (g.mT @ x.rows,))


def prepare_factor(g: torch.Tensor, x: InputSpectra) -> Solve:
    """The small core R_g R_x^T now (X's factor shared); its SVD is the solve."""
    return Solve(tall_singular_values, (token_factor(g) @ x.qr_factor().mT,))


def prepare_gram(g: torch.Tensor, x: InputSpectra) -> Solve:
    """Both float64 Grams now (X's shared); the T x T eigenvalue problem is the solve."""
    x_gram = x.gram()
    return Solve(_gram_solve, (x_gram, output_gram(g, x_gram), g.dtype))


def _gram_solve(x_gram: InputGram, g_gram: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return gram_singular_values(x_gram, g_gram).to(dtype)
