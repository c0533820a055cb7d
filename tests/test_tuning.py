"""Routes chosen by measurement: the fastest measured exact route per shape class, cached;
forced routes; what the manifest records."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GSM8K

import gradspec
from gradspec import routes
from gradspec.errors import GradspecError
from gradspec.routes import ROUTES, usable_routes
from gradspec.spectra import InputSpectra, Solve, prepare_factor
from gradspec.tuning import RouteChooser, ShapeClass, check_route, shape_class

SECONDS = {"factor": 3.0, "gram": 1.0, "full": 2.0, "factor-eigvalsh": 4.0, "full-eigvalsh": 5.0}


class FakeTimer:
    """A timer that runs each route and says it took SECONDS[route]; counts the runs."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.runs: list[str] = []

    def __call__(self, route: str, compute: Callable[[], torch.Tensor]) -> tuple[float, object]:
        self.runs.append(route)
        return self.seconds[route], compute()


def factors(examples: int, tokens: int, d_out: int = 40, d_in: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(examples, tokens, d_out, generator=generator)
    return g, torch.randn(examples, tokens, d_in, generator=generator)


def explicit(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(g.double().mT @ x.double())


def test_the_choice_is_the_fastest_measured_and_cached_per_shape_class():
    timer = FakeTimer(SECONDS)
    chooser = RouteChooser(timer=timer)
    g, x = factors(2, 30)
    route, solve = chooser.prepare(g, InputSpectra(x), torch.float32)
    assert route == "gram"  # the fastest of the routes timed
    timed = set(timer.runs)
    assert timed == set(usable_routes("cpu", torch.float32)) and len(timer.runs) == 2 * len(timed)
    torch.testing.assert_close(solve().double(), explicit(g, x)[:, :30], rtol=1e-4, atol=1e-5)
    # The same class (T 17-32, 2 examples) takes the cached choice; another T is measured.
    again, _ = chooser.prepare(*_spectra(*factors(2, 20, seed=1)), torch.float32)
    assert again == "gram" and len(timer.runs) == 2 * len(timed)
    chooser.prepare(*_spectra(*factors(2, 40, seed=2)), torch.float32)
    assert len(timer.runs) == 4 * len(timed)
    record = chooser.record()
    assert record["route"] == "auto" and len(record["measured"]) == 2
    first = record["measured"][0]
    assert first["route"] == "gram" and first["tokens"] == 32 and first["examples"] == 2
    assert first["seconds"] == {name: SECONDS[name] for name in timed}


def _spectra(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, InputSpectra]:
    return g, InputSpectra(x)


def test_float64_spectra_time_only_routes_that_keep_float64():
    timer = FakeTimer(SECONDS)
    g, x = factors(1, 30)
    route, solve = RouteChooser(timer=timer).prepare(
        g.double(), InputSpectra(x.double()), torch.float64
    )
    assert set(timer.runs) == {"factor", "full"} and route == "full"
    torch.testing.assert_close(solve(), explicit(g, x), rtol=1e-10, atol=1e-12)


def test_routes_the_cost_model_puts_far_off_are_not_timed():
    timer = FakeTimer(SECONDS)
    g, x = factors(1, 4, d_out=256, d_in=256)  # T = 4: the full 256 x 256 SVD is far off
    RouteChooser(timer=timer).prepare(g, InputSpectra(x), torch.float32)
    assert "full" not in timer.runs and "factor" in timer.runs


def test_a_route_whose_values_disagree_is_never_chosen(monkeypatch):
    def wrong(g: torch.Tensor, x: InputSpectra) -> Solve:
        solve = prepare_factor(g, x)
        return dataclasses.replace(solve, function=lambda core: 2 * torch.linalg.svdvals(core))

    fast_and_wrong = dataclasses.replace(ROUTES["factor"], name="wrong", prepare=wrong)
    monkeypatch.setattr(routes, "ROUTES", {**ROUTES, "wrong": fast_and_wrong})
    chooser = RouteChooser(timer=FakeTimer({**SECONDS, "wrong": 0.1}))
    g, x = factors(1, 30)
    route, _ = chooser.prepare(g, InputSpectra(x), torch.float32)
    assert route == "gram"
    assert chooser.record()["measured"][0]["excluded"] == ["wrong"]


def test_forced_routes_agree_with_each_other_and_the_float64_svd():
    g, x = factors(3, 30)
    expected = explicit(g, x)
    for route in usable_routes("cpu", torch.float32):
        forced, solve = RouteChooser(route).prepare(g, InputSpectra(x), torch.float32)
        values = solve().double()
        assert forced == route
        torch.testing.assert_close(values[:, :30], expected[:, :30], rtol=1e-4, atol=1e-5)


def test_shape_classes_round_tokens_and_examples_up_to_powers_of_two():
    g, x = factors(3, 33)
    assert shape_class(g, x, torch.float32) == ShapeClass("cpu", "float32", 40, 48, 64, 4)


def test_a_route_that_does_not_serve_the_run_is_refused():
    cpu = torch.device("cpu")
    check_route("auto", cpu, torch.float32)
    check_route("factor-eigvalsh", cpu, torch.float32)
    for route, dtype, message in [
        ("nonsense", torch.float32, "use cost, auto or one of full, gram"),
        ("factor-gesvdj", torch.float32, "does not serve float32 spectra on cpu"),
        ("gram", torch.float64, "does not serve float64 spectra on cpu"),
    ]:
        with pytest.raises(GradspecError, match=message):
            check_route(route, cpu, dtype)


def test_the_manifest_records_each_sessions_routes(tiny_model, tmp_path: Path):
    model = tiny_model("llama")
    options = dict(device="cpu", limit=3, batch_size=1)
    auto = gradspec.profile(model, GSM8K, tmp_path / "auto", route="auto", **options)
    recorded = auto.manifest["sessions"][-1]["routes"]
    assert recorded["route"] == "auto" and recorded["measured"]
    for choice in recorded["measured"]:
        timed = choice["seconds"] or {choice["route"]: 0.0}  # one route worth timing: none
        assert choice["route"] == min(timed, key=timed.get) and choice["device"] == "cpu"
    forced = gradspec.profile(model, GSM8K, tmp_path / "forced", route="factor", **options)
    assert forced.manifest["sessions"][-1]["routes"] == {"route": "factor", "measured": []}
    with pytest.raises(GradspecError, match="--route factor-gesvd does not serve"):
        gradspec.profile(model, GSM8K, tmp_path / "refused", route="factor-gesvd", **options)
    assert not (tmp_path / "refused").exists()


def test_the_default_cost_route_reproduces_bit_for_bit(tiny_model, tmp_path: Path):
    """The default takes the cost model's route per matrix, timing nothing: two runs give
    the same bits, and the values agree with the measured choice's to float32 rounding."""
    import pandas as pd

    model = tiny_model("llama")
    options = dict(device="cpu", limit=3, batch_size=1)
    first = gradspec.profile(model, GSM8K, tmp_path / "first", **options)
    assert first.manifest["sessions"][-1]["routes"] == {"route": "cost", "measured": []}
    again = gradspec.profile(model, GSM8K, tmp_path / "again", **options)
    pd.testing.assert_frame_equal(first.spectra, again.spectra)
    auto = gradspec.profile(model, GSM8K, tmp_path / "auto", route="auto", **options)
    columns = ["nuclear_norm", "spectral_norm", "frobenius_norm"]
    assert np.allclose(first.spectra[columns], auto.spectra[columns], rtol=1e-4, atol=1e-7)
