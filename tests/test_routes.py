"""The route registry: a registered route is chosen where cheapest, and each place where a
solve can run gives the values in the order the solves were prepared."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA

import gradspec
from gradspec import routes
from gradspec.routes import ROUTES, SolvePlace, SolverRoute, StartedSolves
from gradspec.spectra import InputSpectra, Solve, prepare_gram

DATA = SHARED_DATA / "reasoning_cot" / "correct" / "gsm8k_with_cot_gpt4o.json"
OPTIONS = dict(limit=4, chunk_size=4, batch_size=2)


def explicit_singular_values(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Descending singular values of each example's g^T x, from a float64 SVD of it built."""
    return torch.linalg.svdvals(g.double().mT @ x.double())


@pytest.mark.parametrize("place", list(SolvePlace))
def test_each_place_gives_the_values_in_the_order_prepared(place, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    cases = [(torch.randn(1, t, 12, generator=generator), t) for t in (5, 3, 7)]
    inputs = [torch.randn(1, t, 10, generator=generator) for _, t in cases]
    moved = {name: dataclasses.replace(route, place=place) for name, route in ROUTES.items()}
    monkeypatch.setattr(routes, "ROUTES", moved)
    names = ["factor", "full", "gram"]
    prepared = [
        (name, routes.prepare_spectra(g, InputSpectra(x), name))
        for name, (g, _), x in zip(names, cases, inputs, strict=True)
    ]
    with ThreadPoolExecutor(max_workers=1) as worker:
        values = StartedSolves(prepared, worker).values()
    for found, (g, _), x in zip(values, cases, inputs, strict=True):
        expected = explicit_singular_values(g, x)[0]
        rank = found.shape[-1]  # at most T values; the SVD's others are zero
        torch.testing.assert_close(found[0].double(), expected[:rank], rtol=1e-4, atol=1e-6)
        assert torch.all(expected[rank:] < 1e-6 * expected[0])


def test_an_error_of_a_solve_is_raised_when_its_values_are_read(monkeypatch):
    def broken() -> torch.Tensor:
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    with ThreadPoolExecutor(max_workers=1) as worker:
        started = StartedSolves([("full", Solve(broken, ()))], worker)
        with pytest.raises(torch.linalg.LinAlgError, match="failed to converge"):
            started.values()


def test_a_solve_moves_its_operands_to_another_device():
    g, x = torch.randn(1, 6, 9), torch.randn(1, 6, 7)
    solve = prepare_gram(g, InputSpectra(x))
    moved = solve.to("meta")
    assert all(
        item.gram.device.type == "meta" if hasattr(item, "gram") else item.device.type == "meta"
        for item in moved.operands[:2]
    )
    assert moved.operands[2] == solve.operands[2] == g.dtype


@pytest.mark.parametrize("place", [SolvePlace.INLINE, SolvePlace.CPU])
def test_a_registered_route_is_chosen_and_run_by_the_engine(
    tiny_model, tmp_path, monkeypatch, place
):
    """A route added to the registry (here the Gram route's math, costing nothing, solved
    inline or on the CPU) is what the capture takes; its spectra are the usual ones."""
    model_dir = tiny_model("llama")
    taken: list[int] = []

    def noted_gram(g: torch.Tensor, x: InputSpectra) -> Solve:
        taken.append(g.shape[0])
        return prepare_gram(g, x)

    free: Callable[..., float] = lambda *shape: 0.0  # noqa: E731
    added = SolverRoute("gram-elsewhere", free, noted_gram, place=place, float64=False)
    usual = gradspec.profile(model_dir, DATA, tmp_path / "usual", device="cpu", **OPTIONS)
    monkeypatch.setattr(routes, "ROUTES", {**ROUTES, added.name: added})
    tables = gradspec.profile(model_dir, DATA, tmp_path / "added", device="cpu", **OPTIONS)
    assert sum(taken) == len(usual.spectra)  # every (example, matrix) took the new route
    columns = ["nuclear_norm", "spectral_norm", "frobenius_norm"]
    pd.testing.assert_frame_equal(tables.spectra[columns], usual.spectra[columns], rtol=1e-4)
