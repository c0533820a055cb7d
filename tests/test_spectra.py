"""The spectra math against float64 SVDs of explicitly built gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspec.spectra import builds_full_gradient, gradient_singular_values, token_factor
from gradspec.statistics import STAT_COLUMNS, STATISTICS, spectrum_statistics
from gradspec.store import SPECTRA_FIELDS


def explicit_statistics(gradient: np.ndarray) -> dict[str, float]:
    """Reference statistics straight from a float64 SVD of the full gradient matrix."""
    s = np.linalg.svd(gradient, compute_uv=False)
    kept = s[s > s[0] * 1e-7]
    p = kept / kept.sum()
    return {
        "nuclear_norm": s.sum(),
        "spectral_norm": s.max(),
        "frobenius_norm": np.linalg.norm(gradient, "fro"),
        "effective_rank": np.exp(-(p * np.log(p)).sum()),
        "stable_rank": np.linalg.norm(gradient, "fro") ** 2 / np.linalg.norm(gradient, 2) ** 2,
    }


@pytest.mark.parametrize(
    ("tokens", "d_out", "d_in", "full"),
    [
        (7, 40, 30, False),  # factor route, T < both dims
        (25, 30, 64, False),  # factor route, d_out < d_in
        (200, 30, 64, True),  # full route, T far above both dims
        (300, 64, 16, True),  # full route, wide gradient (taken in its tall orientation)
        (1, 16, 16, False),  # a single token: rank one
    ],
)
def test_singular_values_match_explicit_gradient(
    tokens: int, d_out: int, d_in: int, full: bool
) -> None:
    generator = torch.Generator().manual_seed(tokens + d_out)
    g = torch.randn(tokens, d_out, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=generator, dtype=torch.float64)
    expected = explicit_statistics((g.T @ x).numpy())
    stats = spectrum_statistics(gradient_singular_values(g, x))
    assert set(expected) == set(STAT_COLUMNS)
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value, rel=1e-10), name
    assert builds_full_gradient(tokens, d_out, d_in) == full


def test_route_choice_at_llama_8b_shapes() -> None:
    assert not builds_full_gradient(407, 4096, 4096)
    assert not builds_full_gradient(1024, 1024, 4096)  # k/v: factors beat a 4096x1024 SVD
    assert builds_full_gradient(8192, 1024, 4096)


def test_shared_input_factor_gives_the_same_values() -> None:
    g = torch.randn(9, 33, dtype=torch.float64)
    x = torch.randn(9, 21, dtype=torch.float64)
    direct = gradient_singular_values(g, x)
    shared = gradient_singular_values(g, x, token_factor(x))
    torch.testing.assert_close(direct, shared, rtol=1e-12, atol=0)


def test_rank_deficient_gradient_counts_only_nonzero_singular_values() -> None:
    # Repeated token rows (as in layer 0, where inputs are embeddings) make G^T X rank 2.
    x_rows = torch.randn(2, 20, dtype=torch.float64)
    g_rows = torch.randn(2, 24, dtype=torch.float64)
    x = x_rows[[0, 1, 0, 1, 0, 1]]
    g = g_rows[[0, 1, 0, 1, 0, 1]] * torch.tensor(
        [[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]], dtype=torch.float64
    )
    full = (g.T @ x).numpy()
    s = np.linalg.svd(full, compute_uv=False)[:2]
    p = s / s.sum()
    stats = spectrum_statistics(gradient_singular_values(g, x))
    assert stats["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert 1.0 < stats["effective_rank"] < 2.0


def test_statistics_of_known_spectrum_and_top_k() -> None:
    stats = spectrum_statistics(torch.tensor([1.0, 3.0, 2.0, 0.0]), top_k=2)
    assert stats["nuclear_norm"] == 6.0
    assert stats["spectral_norm"] == 3.0
    assert stats["frobenius_norm"] == pytest.approx(np.sqrt(14.0))
    p = np.array([3.0, 2.0, 1.0]) / 6.0
    assert stats["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert stats["stable_rank"] == pytest.approx(14.0 / 9.0)
    assert stats["top_singular_values"] == [3.0, 2.0]


def test_zero_gradient_has_zero_statistics() -> None:
    assert spectrum_statistics(torch.zeros(5)) == dict.fromkeys(STAT_COLUMNS, 0.0)


def test_statistics_of_a_batch_equal_those_of_each_example() -> None:
    batch = torch.rand(3, 6, dtype=torch.float64).sort(dim=-1, descending=True).values
    batch[2] = 0.0
    for stat in STATISTICS:
        values = stat.compute(batch)
        for row, value in zip(batch, values, strict=True):
            assert float(value) == pytest.approx(spectrum_statistics(row)[stat.name], rel=1e-12)


def test_every_registered_statistic_is_a_stored_column() -> None:
    stored = [name for name, _ in SPECTRA_FIELDS]
    assert stored[-len(STAT_COLUMNS) :] == list(STAT_COLUMNS)
