"""The spectra math against float64 SVDs of explicitly built gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspec.routes import ROUTES, choose_route, gradient_singular_values, usable_routes
from gradspec.spectra import gram_factor, input_gram, token_factor
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


def assert_matches_explicit(g: torch.Tensor, x: torch.Tensor, route: str, rel: float) -> None:
    """Statistics of one route against a float64 SVD of the built gradient (effective rank
    to 1e-3 for float32, as its noise floor adds tiny singular values)."""
    expected = explicit_statistics((g.double().T @ x.double()).numpy())
    assert set(expected) == set(STAT_COLUMNS)
    stats = spectrum_statistics(gradient_singular_values(g, x, route))
    for name, value in expected.items():
        tolerance = max(rel, 1e-3) if name == "effective_rank" else rel
        assert stats[name] == pytest.approx(value, rel=tolerance), (route, name)


SHAPES = [  # tokens, d_out, d_in, the cost model's route (the same on every device)
    (7, 40, 30, "factor"),  # T < both dims
    (25, 30, 64, "factor"),  # d_out < d_in
    (200, 30, 64, "full"),  # T far above both dims
    (300, 64, 16, "full"),  # wide gradient (taken in its tall orientation)
    (1, 16, 16, "factor"),  # a single token: rank one
]
CPU_ROUTES = usable_routes("cpu", torch.float32)  # every device's: test_devices.py


@pytest.mark.parametrize(("tokens", "d_out", "d_in", "cost_route"), SHAPES)
@pytest.mark.parametrize("route", CPU_ROUTES)
def test_every_route_matches_explicit_gradient(
    tokens: int, d_out: int, d_in: int, cost_route: str, route: str
) -> None:
    generator = torch.Generator().manual_seed(tokens + d_out)
    g = torch.randn(tokens, d_out, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=generator, dtype=torch.float64)
    assert_matches_explicit(g.float(), x.float(), route, rel=1e-4)
    if ROUTES[route].float64:  # a Gram halves float64 precision, so float64 never takes it
        assert_matches_explicit(g, x, route, rel=1e-10)
    for device_type in ("cpu", "cuda"):
        assert choose_route(tokens, d_out, d_in, torch.float32, device_type) == cost_route
        assert choose_route(tokens, d_out, d_in, torch.float64, device_type) == cost_route


@pytest.mark.parametrize(
    ("tokens", "d_out", "d_in", "cost_route"),
    [
        (407, 4096, 4096, "factor"),  # Llama-3.1-8B q/o
        (1024, 1024, 4096, "factor"),  # k/v: factors beat a 4096 x 1024 SVD
        (741, 4096, 14336, "factor"),  # down
        (8192, 1024, 4096, "full"),
        (300, 576, 576, "factor"),  # SmolLM2-135M q/o
        (300, 192, 576, "factor"),  # its k/v
    ],
)
def test_route_choice_at_real_shapes(tokens: int, d_out: int, d_in: int, cost_route: str) -> None:
    for device_type in ("cpu", "cuda"):
        assert choose_route(tokens, d_out, d_in, torch.float32, device_type) == cost_route
        assert choose_route(tokens, d_out, d_in, torch.float64, device_type) == cost_route


def ill_conditioned_inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """float32 (G, X) pairs that make X X^T singular or nearly so."""
    generator = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    repeat = [0, 1, 2, 0, 1, 2, 0, 3, 1, 0, 2, 3]  # layer 0: the same token, the same row
    padded_x, padded_g = randn(3, 20, 48), randn(3, 20, 40)
    padded_x[0, 14:], padded_g[0, 14:] = 0.0, 0.0  # right padding
    padded_x[1, 5:], padded_g[1, 5:] = 0.0, 0.0
    scales = torch.logspace(0, -5, 30).unsqueeze(0)  # singular values of X from 1 to 1e-5
    basis = torch.linalg.qr(randn(64, 30)).Q
    return {
        "repeated tokens": (randn(12, 40) * torch.arange(1.0, 13.0)[:, None], randn(4, 48)[repeat]),
        "padding": (padded_g, padded_x),
        "condition 1e5": (randn(30, 40), (torch.linalg.qr(randn(30, 30)).Q * scales) @ basis.T),
        "zero gradient rows": (randn(16, 40) * (torch.arange(16) % 3 == 0)[:, None], randn(16, 48)),
    }


@pytest.mark.parametrize("case", list(ill_conditioned_inputs()))
@pytest.mark.parametrize("route", CPU_ROUTES)
def test_routes_on_ill_conditioned_inputs(case: str, route: str) -> None:
    g, x = ill_conditioned_inputs()[case]
    values_per_example = gradient_singular_values(g, x, route)
    batch = values_per_example.reshape(-1, values_per_example.shape[-1])
    for values, example_g, example_x in zip(
        batch, g.reshape(-1, *g.shape[-2:]), x.reshape(-1, *x.shape[-2:]), strict=True
    ):
        expected = explicit_statistics((example_g.double().T @ example_x.double()).numpy())
        stats = spectrum_statistics(values)
        for name, value in expected.items():
            tolerance = 1e-3 if name == "effective_rank" else 1e-4
            assert stats[name] == pytest.approx(value, rel=tolerance), (case, route, name)


def test_token_factor_runs_a_qr_only_where_it_shrinks_the_side() -> None:
    wide, narrow = torch.randn(2, 30, 48), torch.randn(2, 30, 24)  # T = 30 tokens
    r = token_factor(wide)
    assert r.shape == (2, 30, 30) and torch.equal(r, r.triu())
    torch.testing.assert_close(r.mT @ r, wide @ wide.mT, rtol=1e-4, atol=1e-4)
    kept = token_factor(narrow)  # a QR would return a 24 x 30 R: the side as it is instead
    assert kept.data_ptr() == narrow.data_ptr() and torch.equal(kept, narrow.mT)


def test_singular_gram_falls_back_to_an_exact_factor() -> None:
    # Seeded: for some draws rounding leaves the rank-2 Gram numerically positive definite.
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 20, dtype=torch.float64, generator=generator)
    x = rows[[0, 1, 0, 1, 0, 1]]  # rank 2: Cholesky of X X^T breaks down
    assert (torch.linalg.cholesky_ex(x @ x.T).info != 0).item()
    x_gram = input_gram(x)
    factor = gram_factor(x_gram)
    torch.testing.assert_close(factor @ factor.T, x @ x.T, rtol=0, atol=1e-12)


def test_padding_rows_become_identity_rows_of_the_gram() -> None:
    x = torch.randn(5, 8, dtype=torch.float64)
    x[3:] = 0.0
    x_gram = input_gram(x)
    assert x_gram.kept.tolist() == [True, True, True, False, False]
    torch.testing.assert_close(x_gram.gram[3:, 3:], torch.eye(2, dtype=torch.float64))
    assert (torch.linalg.cholesky_ex(x_gram.gram).info == 0).item()


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
