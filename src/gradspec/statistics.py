"""The one registry of per-matrix statistics of a gradient's singular values.

A statistic listed in ``STATISTICS`` gets its column in the spectra table (store.py), its
value in every row the engine writes, its place among the CLI's and the report's
``--statistic`` choices, and, with a suspect direction, a per-example quality score
(quality.py). Adding one here, and bumping ``store.FORMAT_VERSION`` so runs with and
without its column are never mixed, is all it takes.

Every function takes descending singular values ``s`` (..., k), zero-padded, as a float64
torch tensor, and returns one value per leading index; an all-zero gradient gives 0.
This module imports no torch itself, so the CLI can read the registry without loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

RANK_TOLERANCE = 1e-7  # singular values at or below s_1 * this count as zero


@dataclass(frozen=True)
class Statistic:
    """One statistic: how to compute it, how it is stored, and what it means for quality."""

    name: str
    compute: Callable[[torch.Tensor], torch.Tensor]
    help: str
    column_type: str = "float64"  # Arrow type alias of its spectra column
    suspect: Literal[-1, 0, 1] = 0  # +1: higher is more suspect, -1: lower; 0: not a score
    per_example: Literal["sum", "mean"] = "mean"  # how a score combines an example's matrices


def nuclear_norm(s: torch.Tensor) -> torch.Tensor:
    """Sum of the singular values."""
    return s.sum(-1)


def spectral_norm(s: torch.Tensor) -> torch.Tensor:
    """The largest singular value."""
    return s[..., 0]


def frobenius_norm(s: torch.Tensor) -> torch.Tensor:
    """Square root of the sum of squared singular values."""
    return s.square().sum(-1).sqrt()


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of p_i = s_i / sum(s) over the s_i above s_1 * RANK_TOLERANCE (Roy and
    Vetterli)."""
    kept = s * (s > s[..., :1] * RANK_TOLERANCE)
    p = kept / kept.sum(-1, keepdim=True)
    return (-p.xlogy(p).sum(-1)).exp().nan_to_num(0.0)


def stable_rank(s: torch.Tensor) -> torch.Tensor:
    """Frobenius^2 / spectral^2, computed as sum((s_i / s_1)^2) so it cannot underflow."""
    return (s / s[..., :1]).square().sum(-1).nan_to_num(0.0)


STATISTICS = (
    Statistic(
        "nuclear_norm",
        nuclear_norm,
        "nuclear norm (sum of singular values)",
        suspect=1,
        per_example="sum",
    ),
    Statistic("spectral_norm", spectral_norm, "spectral norm (largest singular value)"),
    Statistic("frobenius_norm", frobenius_norm, "Frobenius norm"),
    Statistic(
        "effective_rank",
        effective_rank,
        "effective rank (exp of the entropy of the normalised singular values)",
        suspect=-1,
    ),
    Statistic("stable_rank", stable_rank, "stable rank (Frobenius^2 / spectral^2)"),
)
STAT_COLUMNS = tuple(stat.name for stat in STATISTICS)
# Statistics the analyses derive from stored columns, with what they mean.
DERIVED_STATISTICS = {
    "spectral_ratio": "spectral norm / nuclear norm",
    "nuclear_per_loss": "nuclear norm / loss",
}
REPORT_STATISTICS = (*STAT_COLUMNS, *DERIVED_STATISTICS)


def statistic_help() -> str:
    """One line per statistic the report can draw, for the CLI's help."""
    described = {stat.name: stat.help for stat in STATISTICS} | DERIVED_STATISTICS
    return "; ".join(f"{name}: {text}" for name, text in described.items())


def batch_statistics(singular_values: torch.Tensor) -> torch.Tensor:
    """Every registered statistic, in ``STAT_COLUMNS`` order along a new last dimension, of
    each row of zero-padded descending singular values (..., k): float64 (..., statistics)."""
    s = singular_values.double()
    table = s.new_zeros(*s.shape[:-1], len(STATISTICS))
    for column, stat in enumerate(STATISTICS):
        table[..., column] = stat.compute(s)
    return table


def spectrum_statistics(singular_values: torch.Tensor, top_k: int = 0) -> dict[str, object]:
    """Every registered statistic of one matrix's singular values, and the top_k largest."""
    s = singular_values.double().flatten().sort(descending=True).values
    if not s.numel():
        s = s.new_zeros(1)
    stats: dict[str, object] = dict(zip(STAT_COLUMNS, batch_statistics(s).tolist(), strict=True))
    if top_k:
        stats["top_singular_values"] = s[:top_k].tolist()
    return stats
