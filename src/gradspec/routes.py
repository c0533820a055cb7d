"""The solver routes: which exact route gives a matrix's spectra, and where its solve runs.

A route (``SolverRoute``) has a name, a cost estimate for one example of T tokens of a
d_out x d_in matrix, a ``prepare`` that does its GEMMs while the gradients exist and
returns the small solve (spectra.py holds the math), and the place its solve runs
(``SolvePlace``). ``choose_route`` takes the cheapest route allowed for the spectra dtype;
the capture (capture.py) prepares the chosen route in the backward hook and hands its
solve to ``submit_solve``, so neither knows the routes.

To add a route, add one ``SolverRoute`` to ``ROUTES`` below (its math beside the others
in spectra.py, or here): the cost model then chooses it where it is cheapest. A route
that does existing math elsewhere (say the Gram route's solve on the CPU instead of the
GPU) is the same ``prepare`` with another ``place`` and cost. To add a place, add one
function to ``PLACES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

import torch

from .spectra import (
    InputSpectra,
    Solve,
    driver_singular_values,
    factor_cost,
    full_cost,
    gram_cost,
    gram_product_singular_values,
    prepare_factor,
    prepare_full,
    prepare_gram,
)

RouteCost = Callable[[int, int, int, str], float]  # (tokens, d_out, d_in, device type)
Prepare = Callable[[torch.Tensor, InputSpectra], Solve]


class SolvePlace(StrEnum):
    """Where a route's small solve runs, once its GEMMs are done in the backward hook."""

    INLINE = "inline"  # at once, in the backward hook, on the gradients' device
    WORKER = "worker"  # on the capture's solver thread (overlapping the backward), same device
    CPU = "cpu"  # on the solver thread, its operands first copied to the CPU (GPU offload)


@dataclass(frozen=True)
class SolverRoute:
    """One exact route to a matrix's per-example singular values."""

    name: str
    cost: RouteCost  # float32-GEMM flop equivalents for one example
    prepare: Prepare
    place: SolvePlace = SolvePlace.WORKER
    float64: bool = True  # keeps float64 precision (a Gram halves it)
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types its GEMMs may run on

    def runs_on(self, device_type: str, dtype: torch.dtype) -> bool:
        """Whether the route serves gradients on this device at this spectra precision."""
        return device_type in self.devices and (dtype != torch.float64 or self.float64)


def with_core_solver(prepare: Prepare, values: Callable[[torch.Tensor], torch.Tensor]) -> Prepare:
    """The same GEMMs as ``prepare`` (full or factor: one core operand), the core's singular
    values taken by ``values``."""

    def prepared(g: torch.Tensor, x: InputSpectra) -> Solve:
        return dataclasses.replace(prepare(g, x), function=values)

    return prepared


# Other solvers of a full or factor core: two cuSOLVER drivers of torch's svdvals (its
# default driver on CUDA is gesvdj, falling back to gesvd when Jacobi does not converge) and
# one symmetric eigenproblem of the float64 Gram product.
CORE_SOLVERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[str, ...], bool]] = {
    "gesvd": (partial(driver_singular_values, driver="gesvd"), ("cuda",), True),
    "gesvdj": (partial(driver_singular_values, driver="gesvdj"), ("cuda",), True),
    "eigvalsh": (gram_product_singular_values, ("cpu", "cuda"), False),
}
BASE_ROUTES = (
    SolverRoute("full", full_cost, prepare_full),
    SolverRoute("gram", gram_cost, prepare_gram, float64=False),
    SolverRoute("factor", factor_cost, prepare_factor),
)
ROUTES: dict[str, SolverRoute] = {
    route.name: route
    for route in (
        *BASE_ROUTES,
        *(
            dataclasses.replace(
                base,
                name=f"{base.name}-{solver}",
                prepare=with_core_solver(base.prepare, values),
                devices=devices,
                float64=float64,
            )
            for base in BASE_ROUTES
            if base.name != "gram"
            for solver, (values, devices, float64) in CORE_SOLVERS.items()
        ),
        # The small solves on the CPU while the GPU goes on with the model (GPU offload).
        *(
            dataclasses.replace(
                base, name=f"{base.name}-cpu", place=SolvePlace.CPU, devices=("cuda",)
            )
            for base in BASE_ROUTES
        ),
    )
}


def route_costs(tokens: int, d_out: int, d_in: int, device_type: str = "cpu") -> dict[str, float]:
    """Estimated cost of each route for one example (no input work shared)."""
    return {name: route.cost(tokens, d_out, d_in, device_type) for name, route in ROUTES.items()}


def usable_routes(device_type: str, dtype: torch.dtype) -> list[str]:
    """The routes that serve gradients on this device at this spectra precision."""
    return [name for name, route in ROUTES.items() if route.runs_on(device_type, dtype)]


def choose_route(
    tokens: int, d_out: int, d_in: int, dtype: torch.dtype, device_type: str = "cpu"
) -> str:
    """The name of the cheapest usable route by the cost model (ties: the first registered,
    so the base routes); float64 spectra take only routes that keep float64 precision."""
    costs = route_costs(tokens, d_out, d_in, device_type)
    return min(usable_routes(device_type, dtype), key=costs.__getitem__)


def prepare_spectra(g: torch.Tensor, x: InputSpectra, route: str) -> Solve:
    """Do the named route's GEMMs now and return its small solve: descending singular
    values of each example's g^T x, in g's dtype (zero rows, such as padding, change
    nothing)."""
    return ROUTES[route].prepare(g, x)


def builds_full_gradient(tokens: int, d_out: int, d_in: int) -> bool:
    """Whether forming G^T X costs less than the factor route (the per-matrix benchmark's
    'full' column)."""
    return choose_route(tokens, d_out, d_in, torch.float64) == "full"


def gradient_singular_values(
    g: torch.Tensor, x: torch.Tensor, route: str | None = None
) -> torch.Tensor:
    """Descending singular values of g^T x, without building it when T is small.

    ``g`` is (..., T, d_out) and ``x`` (..., T, d_in); leading dimensions are a batch of
    examples. ``route`` defaults to the cost model's choice.
    """
    chosen = route or choose_route(g.shape[-2], g.shape[-1], x.shape[-1], g.dtype, g.device.type)
    return prepare_spectra(g, InputSpectra(x), chosen)()


# ---------------------------------------------------------------- where solves run


def _run_inline(solves: list[Solve], worker: Executor) -> Future[list[torch.Tensor]]:
    """Run the solves now; their values (or error) wait in a finished future."""
    future: Future[list[torch.Tensor]] = Future()
    try:
        future.set_result([solve() for solve in solves])
    except Exception as exc:
        future.set_exception(exc)
    return future


def _run_on_worker(solves: list[Solve], worker: Executor) -> Future[list[torch.Tensor]]:
    return worker.submit(lambda: [solve() for solve in solves])


def _run_on_cpu(solves: list[Solve], worker: Executor) -> Future[list[torch.Tensor]]:
    """Copy the operands to the CPU on the worker thread (the hook does not wait), solve there."""
    return worker.submit(lambda: [solve.to("cpu")() for solve in solves])


PLACES: dict[SolvePlace, Callable[[list[Solve], Executor], Future[list[torch.Tensor]]]] = {
    SolvePlace.INLINE: _run_inline,
    SolvePlace.WORKER: _run_on_worker,
    SolvePlace.CPU: _run_on_cpu,
}


class StartedSolves:
    """Prepared solves started where their routes run them, those of one place together."""

    def __init__(self, prepared: list[tuple[str, Solve]], worker: Executor):
        by_place: dict[SolvePlace, list[int]] = {}
        for position, (route, _) in enumerate(prepared):
            by_place.setdefault(ROUTES[route].place, []).append(position)
        self.count = len(prepared)
        self.parts = [
            (positions, PLACES[place]([prepared[i][1] for i in positions], worker))
            for place, positions in by_place.items()
        ]

    def values(self) -> list[torch.Tensor]:
        """Each solve's values, in the order prepared; an error raised by one is raised here."""
        ordered: list[torch.Tensor] = [None] * self.count  # type: ignore[list-item]
        for positions, future in self.parts:
            for position, values in zip(positions, future.result(), strict=True):
                ordered[position] = values
        return ordered
