"""Layer-wise analyses of run tables: curves, MAD, relative difference, and their uncertainty.

The definitions are those of the fast-vs-slow-thinking study (arXiv:2410.23743):

- **Curve**: for one run, module (``q_proj``, ...) and statistic, the mean over examples of
  the statistic at each layer. An example with a non-finite value at any layer is dropped
  from that curve and counted (``LayerValues.n_dropped``).
- **MAD** of a curve ``v``: the mean over consecutive layer pairs of ``|v[l+1] - v[l]|``.
- **Early / middle / late**: the layers ``[0, b1)``, ``[b1, b2)`` and ``[b2, L)``. As in the
  study, a part's MAD uses only the pairs inside it, so the two pairs that straddle a
  boundary count in the whole-network MAD only; a part with fewer than two layers has no
  MAD (NaN). The study cut its 26/28/32/42-layer models at fixed layers (7/20, 7/21, 10/20,
  12/30). The ``"thirds"`` rule (default) cuts any depth at ``b1 = round(L/3)`` and
  ``b2 = round(2L/3)``; ``"study"`` uses the study's cuts for its four depths and thirds
  otherwise; ``"b1,b2"`` gives the boundaries explicitly.
- **Relative difference** of run ``b`` from run ``a``: the mean over layers of
  ``|a_l - b_l| / |a_l|`` between their curves (``a_l = 0`` counts as 1e-10, as the study).

Uncertainty (the study reports none): basic bootstrap confidence intervals that resample
examples, and a paired permutation test that swaps
the two runs' values of randomly chosen examples. Runs compared on the same instructions
are paired by ``example_index``: both resample (or swap) the same examples.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import GradspecError
from .statistics import REPORT_STATISTICS, STAT_COLUMNS
from .store import RunTables

STUDY_BOUNDARIES = {26: (7, 20), 28: (7, 21), 32: (10, 20), 42: (12, 30)}
SEGMENTS = ("all", "early", "middle", "late")
TOP_LAYERS = 5
ZERO_DENOMINATOR = 1e-10

Curves = list[np.ndarray]  # mean curves, each (n_layers,) or (n_replicates, n_layers)


@dataclass(frozen=True)
class LayerValues:
    """One statistic of one module of one run: rows are examples, columns are layers."""

    values: np.ndarray  # (n_examples, n_layers), all finite
    example_index: np.ndarray  # (n_examples,)
    layers: np.ndarray  # (n_layers,)
    n_dropped: int  # examples left out for a non-finite value

    def curve(self) -> np.ndarray:
        """Mean over examples at each layer."""
        return self.values.mean(axis=0)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval (scalars or per-layer arrays)."""

    value: np.ndarray | float
    low: np.ndarray | float
    high: np.ndarray | float


# ---------------------------------------------------------------- experts pooled

# Columns that identify a pooled row: one per example (and step of a training run) and
# expert matrix of a layer, e.g. the gate matrices of all experts of layer 3.
POOL_KEYS = ("example_index", "example_id", "param", "layer", "module", "kind")


def is_expert_row(spectra: pd.DataFrame) -> pd.Series:
    """Which rows are a routed expert's matrix (format 3 runs; none in older ones)."""
    if "expert" not in spectra:
        return pd.Series(False, index=spectra.index)
    return spectra["expert"].notna()


def pool_experts(spectra: pd.DataFrame) -> pd.DataFrame:
    """The spectra with each layer's experts pooled: per example and expert matrix, every
    statistic's mean over the experts that received tokens of the example (0 when none
    did) and ``expert_tokens`` their sum; other rows unchanged. Analyses, findings and
    quality scores read these, so an MoE layer weighs as much as a dense one."""
    routed = is_expert_row(spectra)
    if not routed.any():
        return spectra
    experts = spectra[routed]
    keys = [k for k in (*POOL_KEYS, "step") if k in spectra]
    active = experts[list(STAT_COLUMNS)].mask(experts["expert_tokens"].eq(0), axis=0)
    grouped = active.assign(**{k: experts[k] for k in keys}).groupby(keys, sort=False)
    pooled = grouped[list(STAT_COLUMNS)].mean().fillna(0.0)
    pooled["expert_tokens"] = experts.groupby(keys, sort=False)["expert_tokens"].sum()
    pooled = pooled.reset_index().assign(expert=pd.NA)
    frame = pd.concat([spectra[~routed], pooled[[c for c in spectra if c in pooled]]])
    return frame.sort_values(["example_index", "layer", "param", "module"], ignore_index=True)


def pooled_tables(tables: RunTables) -> RunTables:
    """A run's tables with its experts pooled (``pool_experts``)."""
    return RunTables(tables.manifest, tables.examples, pool_experts(tables.spectra))


# ---------------------------------------------------------------- per-example values


def statistic_values(tables: RunTables, statistic: str) -> pd.Series:
    """The statistic for every spectra row; the two ratios are derived from stored columns."""
    spectra = tables.spectra
    if statistic in STAT_COLUMNS:
        return spectra[statistic].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if statistic == "spectral_ratio":
            return spectra["spectral_norm"] / spectra["nuclear_norm"]
        if statistic == "nuclear_per_loss":
            loss = spectra["example_index"].map(tables.examples.set_index("example_index")["loss"])
            return spectra["nuclear_norm"] / loss.astype(float)
    raise GradspecError(
        f"unknown statistic '{statistic}' (use one of {', '.join(REPORT_STATISTICS)})"
    )


def layer_values(tables: RunTables, module: str, statistic: str = "nuclear_norm") -> LayerValues:
    """Examples x layers matrix of ``statistic`` for ``module``, without non-finite rows."""
    rows = tables.spectra["module"] == module
    frame = pd.DataFrame(
        {
            "example_index": tables.spectra.loc[rows, "example_index"],
            "layer": tables.spectra.loc[rows, "layer"],
            "value": statistic_values(tables, statistic)[rows],
        }
    )
    if frame.empty:
        raise GradspecError(f"module '{module}' has no spectra in this run")
    try:
        wide = frame.pivot(index="example_index", columns="layer", values="value")
    except ValueError:
        raise GradspecError(
            f"module '{module}' has several matrices per layer; "
            "profile with --modules selecting one of them"
        ) from None
    matrix = wide.to_numpy(dtype=float)
    finite = np.isfinite(matrix).all(axis=1)
    return LayerValues(
        matrix[finite], wide.index.to_numpy()[finite], wide.columns.to_numpy(), int((~finite).sum())
    )


def paired(values: Sequence[LayerValues]) -> list[LayerValues]:
    """All restricted to the examples (by example_index) that all kept, in the same order."""
    if any(not np.array_equal(v.layers, values[0].layers) for v in values):
        raise GradspecError("cannot compare runs profiled on different layers")
    common = functools.reduce(np.intersect1d, [v.example_index for v in values])
    return [_subset(v, common) for v in values]


def _subset(values: LayerValues, example_index: np.ndarray) -> LayerValues:
    rows = np.searchsorted(values.example_index, example_index)
    return LayerValues(values.values[rows], example_index, values.layers, values.n_dropped)


# ---------------------------------------------------------------- curve statistics


def layer_split(n_layers: int, rule: str = "thirds") -> tuple[int, int]:
    """Boundaries (b1, b2) of the early/middle/late parts for a ``n_layers``-deep model."""
    if rule == "study" and n_layers in STUDY_BOUNDARIES:
        return STUDY_BOUNDARIES[n_layers]
    if rule in ("thirds", "study"):
        return round(n_layers / 3), round(2 * n_layers / 3)
    try:
        b1, b2 = (int(part) for part in rule.split(","))
    except ValueError:
        raise GradspecError(
            f"layer split '{rule}': use thirds, study, or two layer numbers 'b1,b2'"
        ) from None
    if not 0 < b1 < b2 < n_layers:
        raise GradspecError(f"layer split '{rule}': need 0 < b1 < b2 < {n_layers} layers")
    return b1, b2


def segment_slices(n_layers: int, rule: str = "thirds") -> dict[str, slice]:
    """Layer slices of the whole network and of its early, middle and late parts."""
    b1, b2 = layer_split(n_layers, rule)
    return {
        "all": slice(0, n_layers),
        "early": slice(0, b1),
        "middle": slice(b1, b2),
        "late": slice(b2, n_layers),
    }


def mad(curve: np.ndarray) -> np.ndarray | float:
    """Mean absolute difference between consecutive layers (over the last axis); NaN if < 2."""
    if curve.shape[-1] < 2:
        return np.full(curve.shape[:-1], np.nan) if curve.ndim > 1 else float("nan")
    return np.abs(np.diff(curve, axis=-1)).mean(axis=-1)


def relative_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Mean over layers (the last axis) of |a - b| / |a|, with a = 0 taken as 1e-10."""
    denominator = np.where(a == 0, ZERO_DENOMINATOR, np.abs(a))
    return (np.abs(a - b) / denominator).mean(axis=-1)


def largest_difference_layers(
    a: np.ndarray, b: np.ndarray, layers: np.ndarray, top: int = TOP_LAYERS
) -> list[int]:
    """The layers where |a - b| / |a| is largest, largest first."""
    per_layer = np.abs(a - b) / np.where(a == 0, ZERO_DENOMINATOR, np.abs(a))
    return [int(layers[i]) for i in np.argsort(-per_layer, kind="stable")[:top]]


# ---------------------------------------------------------------- uncertainty


def bootstrap(
    groups: Sequence[Sequence[LayerValues]],
    statistic: Callable[[Curves], object],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    floor: float | Sequence[float] = -np.inf,
) -> Estimate:
    """``statistic`` of the mean curves, with a basic (reverse-percentile) bootstrap interval.

    Each group holds runs on the same examples (see :func:`paired`); a replicate draws the
    examples of each group with replacement, the same draw for every run of the group and
    independent draws across groups. ``statistic`` gets the mean curves in the order of
    ``groups``, each of shape (n_layers,) for the estimate and (n_boot, n_layers) for the
    replicates, and must work on both. The basic interval (2 x estimate minus the upper
    and lower percentiles) corrects for the upward bias that statistics of absolute
    differences (MAD, relative difference) have on few examples; so when two runs barely
    differ, the interval can lie below the study's own, biased, estimate. ``floor`` (a
    scalar, or one per element of the statistic) cuts the interval of a quantity that
    cannot be smaller, such as 0 for a norm, a MAD or a relative difference.
    """
    return Replicates.draw(groups, statistic, n_boot, seed).estimate(level, floor)


@dataclass(frozen=True)
class Replicates:
    """A statistic's value and its bootstrap replicates, so that intervals at any level
    (e.g. one corrected for the number of verdicts, known only later) come from one draw."""

    value: np.ndarray
    replicates: np.ndarray  # (n_boot, *value.shape)

    @classmethod
    def draw(
        cls,
        groups: Sequence[Sequence[LayerValues]],
        statistic: Callable[[Curves], object],
        n_boot: int = 2000,
        seed: int = 0,
    ) -> Replicates:
        """The statistic of the mean curves and of ``n_boot`` resampled ones (see bootstrap)."""
        rng = np.random.default_rng(seed)
        replicates: Curves = []
        for group in groups:
            n = len(group[0].example_index)
            if n == 0:
                raise GradspecError("no example left to bootstrap (all were skipped or dropped)")
            weights = resampling_weights(rng, n, n_boot)
            replicates.extend(weights @ run.values for run in group)
        curves = [run.curve() for group in groups for run in group]
        value = np.asarray(statistic(curves), dtype=float)
        return cls(value, np.asarray(statistic(replicates), dtype=float))

    def estimate(self, level: float = 0.95, floor: float | Sequence[float] = -np.inf) -> Estimate:
        """The value with its basic bootstrap interval at ``level``, cut at ``floor``."""
        tail = 100 * (1 - level) / 2
        with warnings.catch_warnings():  # a part without a MAD is NaN in every replicate
            warnings.simplefilter("ignore", RuntimeWarning)
            upper, lower = np.nanpercentile(self.replicates, [100 - tail, tail], axis=0)
        low = np.maximum(2 * self.value - upper, floor)
        high = np.maximum(2 * self.value - lower, floor)
        return Estimate(self.value[()], low[()], high[()])


def resampling_weights(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) weights: how often each example is drawn in a replicate, divided by n."""
    draws = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n) / n


def permutation_test(
    first: Sequence[LayerValues],
    second: Sequence[LayerValues],
    statistic: Callable[[Curves], object],
    n_perm: int = 2000,
    seed: int = 0,
) -> float:
    """p-value that paired runs differ: swap first[i] and second[i] for random examples.

    ``first`` and ``second`` are lists of paired runs (for instance one per module) on the
    same examples; ``statistic(first curves + second curves)`` must grow with the
    difference. p = (1 + #{permuted >= observed}) / (1 + n_perm).
    """
    rng = np.random.default_rng(seed)
    n = len(first[0].example_index)
    swaps = rng.integers(0, 2, size=(n_perm, n)).astype(float) / n
    permuted_first, permuted_second = [], []
    for a, b in zip(first, second, strict=True):
        shift = swaps @ (a.values - b.values)
        permuted_first.append(a.curve() - shift)
        permuted_second.append(b.curve() + shift)
    observed = statistic([a.curve() for a in first] + [b.curve() for b in second])
    permuted = np.asarray(statistic(permuted_first + permuted_second))
    return float((1 + np.sum(permuted >= observed - 1e-12 * abs(observed))) / (1 + n_perm))


def mean_relative_difference(curves: Curves) -> object:
    """Module-averaged relative difference: curves are [a_1..a_m, b_1..b_m]."""
    half = len(curves) // 2
    return np.mean(
        [relative_difference(a, b) for a, b in zip(curves[:half], curves[half:], strict=True)],
        axis=0,
    )
