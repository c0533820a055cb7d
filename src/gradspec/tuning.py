"""Routes chosen by measurement: the fastest exact route for each shape class of a run.

The cost model (routes.py) guesses; the device decides. The first time a run meets a shape
class (device, spectra dtype, d_out, d_in, T up to the next power of two, number of
examples solved together up to the next power of two), ``RouteChooser`` times every usable
route on that very matrix, G and X as the backward hook holds them: each route's GEMMs and
its small solve (on the CPU for the ``-cpu`` routes, the copy included), the device's queue
drained around each, each run twice and the second kept (the first loads kernels and
handles). Routes the cost model puts over ``WORTH_TIMING`` times the cheapest estimate are
not timed, nor is a route whose values disagree with an exact float64-capable route's (a
solver that did not converge). The fastest is cached for the class and used from then on;
the values its timing produced are the matrix's spectra, so measuring wastes no result.

A forced route (``--route NAME``) is used for every matrix, nothing timed. ``record`` lists
the choices, with the seconds measured, for the run's manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import routes
from .errors import GradspecError
from .routes import SolvePlace, choose_route, prepare_spectra, route_costs, usable_routes
from .spectra import InputSpectra, Solve

AUTO = "auto"
# The cost model's cheapest route for each matrix, nothing timed: the same inputs give the
# same bits in every run (a resumed run, another process, another rank), which measured
# choices cannot promise when two routes time alike.
COST = "cost"
WORTH_TIMING = 8.0  # time routes whose estimated cost is within this factor of the cheapest
AGREEMENT = 1e-3  # max |values - reference| / s1 of a route that counts as exact
# (route name, run it) -> (seconds, values); the default drains the device's queue.
Timer = Callable[[str, Callable[[], torch.Tensor]], tuple[float, torch.Tensor]]


@dataclass(frozen=True)
class ShapeClass:
    """Matrices whose routes rank alike: same device, precision and widths, similar T."""

    device: str
    dtype: str
    d_out: int
    d_in: int
    tokens: int  # the next power of two at or above T
    examples: int  # the next power of two at or above the examples solved together


def shape_class(g: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> ShapeClass:
    """The class of a group's G (examples, T, d_out) and X (examples, T, d_in)."""
    examples, tokens, d_out = g.shape
    return ShapeClass(
        str(g.device),
        str(dtype).removeprefix("torch."),
        d_out,
        x.shape[-1],
        1 << (tokens - 1).bit_length(),
        1 << (examples - 1).bit_length(),
    )


def synchronized_timer(route: str, compute: Callable[[], torch.Tensor]) -> tuple[float, Any]:
    """Seconds of ``compute()``, every CUDA queue drained before and after."""
    drain = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    drain()
    started = time.perf_counter()
    values = compute()
    drain()
    return time.perf_counter() - started, values


def check_route(route: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a forced route that is unknown or does not serve this device and precision."""
    if route in (AUTO, COST):
        return
    if route not in routes.ROUTES:
        raise GradspecError(f"--route {route}: use cost, auto or one of {', '.join(routes.ROUTES)}")
    if not routes.ROUTES[route].runs_on(device.type, dtype):
        usable = ", ".join(usable_routes(device.type, dtype))
        raise GradspecError(
            f"--route {route} does not serve {str(dtype).removeprefix('torch.')} spectra on "
            f"{device.type}; use cost, auto or one of {usable}"
        )


def worth_timing(
    tokens: int, d_out: int, d_in: int, device_type: str, usable: list[str]
) -> list[str]:
    """The usable routes whose estimated cost is within WORTH_TIMING of the cheapest."""
    costs = route_costs(tokens, d_out, d_in, device_type)
    cheapest = min(costs[name] for name in usable)
    return [name for name in usable if costs[name] <= WORTH_TIMING * cheapest]


def run_route(g: torch.Tensor, x: torch.Tensor, route: str) -> torch.Tensor:
    """A route's GEMMs and solve, where it solves, on fresh input factors (none shared)."""
    solve = prepare_spectra(g, InputSpectra(x), route)
    if routes.ROUTES[route].place == SolvePlace.CPU:
        solve = solve.to("cpu")
    return solve()


def disagreement(values: torch.Tensor, reference: torch.Tensor) -> float:
    """max |values - reference| / s1, the shorter padded with zeros (a route gives at most
    T values, another the rank's)."""
    width = max(values.shape[-1], reference.shape[-1])
    a, b = (
        torch.nn.functional.pad(v.detach().cpu().double(), (0, width - v.shape[-1]))
        for v in (values, reference)
    )
    return float((a - b).abs().max() / b[..., 0].max().clamp_min(1e-300))


@dataclass
class Choice:
    """The route of one shape class, and the seconds each timed route took."""

    shape: ShapeClass
    route: str
    seconds: dict[str, float]
    excluded: list[str]  # timed, but their values disagreed


class RouteChooser:
    """Each group's route: the forced one, or its shape class's fastest, measured once."""

    def __init__(self, route: str = AUTO, timer: Timer = synchronized_timer):
        self.route = route
        self.timer = timer
        self.choices: dict[ShapeClass, Choice] = {}

    def prepare(self, g: torch.Tensor, x: InputSpectra, dtype: torch.dtype) -> tuple[str, Solve]:
        """The route for G (examples, T, d_out) and X, and its solve after its GEMMs."""
        if self.route == COST:
            name = choose_route(g.shape[1], g.shape[-1], x.rows.shape[-1], dtype, g.device.type)
            return name, prepare_spectra(g, x, name)
        if self.route != AUTO:
            return self.route, prepare_spectra(g, x, self.route)
        shape = shape_class(g, x.rows, dtype)
        if shape not in self.choices:
            usable = usable_routes(g.device.type, dtype)
            names = worth_timing(g.shape[1], shape.d_out, shape.d_in, g.device.type, usable)
            if len(names) > 1:
                return self._measure(shape, names, g, x.rows)
            self.choices[shape] = Choice(shape, names[0], {}, [])  # nothing to compare
        route = self.choices[shape].route
        return route, prepare_spectra(g, x, route)

    def _measure(
        self, shape: ShapeClass, names: list[str], g: torch.Tensor, x: torch.Tensor
    ) -> tuple[str, Solve]:
        """Time the routes on (G, X); cache and return the fastest exact one, with the
        values its timing gave."""
        seconds, values = {}, {}
        for name in names:
            self.timer(name, lambda name=name: run_route(g, x, name))  # warm-up
            seconds[name], values[name] = self.timer(name, lambda name=name: run_route(g, x, name))
        reference = values[([n for n in names if routes.ROUTES[n].float64] or names)[0]]
        excluded = [n for n in names if disagreement(values[n], reference) > AGREEMENT]
        route = min((n for n in names if n not in excluded), key=seconds.__getitem__)
        self.choices[shape] = Choice(shape, route, seconds, excluded)
        return route, Solve(_given, (values[route],))

    def record(self) -> dict[str, Any]:
        """The choices as the manifest records them."""
        if self.route != AUTO:
            return {"route": self.route, "measured": []}
        measured = [
            {
                **asdict(choice.shape),
                "route": choice.route,
                "seconds": choice.seconds,
                "excluded": choice.excluded,
            }
            for choice in self.choices.values()
        ]
        return {"route": AUTO, "measured": measured}


def _given(values: torch.Tensor) -> torch.Tensor:
    """The values a measurement already computed."""
    return values
