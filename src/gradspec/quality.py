"""Data-quality scores from a run's tables: per-example scores, percentiles, the flag detector.

Every score is computed from the examples and spectra tables alone (no model is loaded):

- ``nuclear_norm``: sum of the nuclear norms of all profiled matrices of the example;
  ``nuclear_norm_attn`` / ``_mlp`` / ``_other``: the same sum over the matrices of one
  module kind (null when the run has no matrix of that kind).
- every statistic of the registry (statistics.py) with a suspect direction, combined over
  the example's matrices as the registry says: ``effective_rank`` is the mean effective
  rank over all profiled matrices.
- ``layer_mad``: cross-layer MAD of the example's own curves: for each canonical module,
  the mean over consecutive profiled layers of |nuclear norm at one - at the next| (the
  study's MAD, see analysis.py), averaged over modules (null with one profiled layer).
- ``loss``, ``ifd``: the engine's loss, and instruction-following difficulty (loss of the
  response given the instruction / loss of the response alone; null unless profiled with
  ``--ifd``).
- ``flag``: the unsupervised detector of responses that do not answer their instruction:
  the mean, over all profiled matrices, of the robust z-score of the example's log nuclear
  norm against the run's own examples ((x - median) / (1.4826 * MAD)). Positive means
  larger gradients than the run's typical example.

Two more scores need a second run and are used by ``bench/eval_quality.py``:
``instruction_gradient_scores`` compares each example's gradients with those of the same
response given an empty instruction (``nuclear_ifd``, ``flag_ifd``: gradient analogues of
IFD), and ``two_sided`` turns any score into its distance from the run's typical example.

Each score also has a ``<score>_pct`` column: the fraction of the run's scored examples
whose score is smaller than or equal to this one, in (0, 1]. Examples that were not
profiled (status other than 'ok') get null scores.

A training run (the monitor's) is scored row by row, one row per profiled occurrence with
its ``step`` and ``epoch``; its ``flag`` compares an occurrence with all of the run's
occurrences, of every step (the online ``flag_score`` of its examples table compares it
with the recent ones only).

Which end of a score is suspect is fixed a priori (``SUSPECT_DIRECTION``): higher norms,
MAD, loss, IFD and flag, and lower effective rank.

Fixed, not learnt from the run, although some directions reverse on a real model. On
SmolLM2-135M-Instruct (bench/results-quality-smollm2.md) IFD points the wrong way for
truncated responses (AUROC 0.31) and effective rank for irrelevant, swapped and
wrong-answer responses (0.45, 0.48, 0.40) while it is right for truncated ones (0.83);
the flag and the nuclear norms never reverse (0.61-0.74 on every kind). The detector keeps
its a-priori direction because (1) the reversals depend on the kind of bad data, and a
run holds an unknown mixture of kinds, so a sign fitted on the run's own distribution
would follow whichever kind dominates and could flip between subsets of the same data;
(2) the direction-free alternative, the two-sided robust z (``two_sided``), measured worse
than the one-sided score on every kind (flag 0.74 / 0.62 / 0.63 / 0.62 vs |flag| 0.63 /
0.45 / 0.38 / 0.51 for irrelevant / swapped / wrong answer / truncated); (3) the flag's
own direction held. Where directions do differ, a few labels settle them: the calibrated
flag below fits each feature's sign from the labels. With a few labelled examples the flag is
calibrated into a probability by an L2-penalised logistic regression on the robust z-scores
of ``CALIBRATION_FEATURES``, which also learns their directions from the labels.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis import mad, pool_experts
from .errors import GradspecError
from .files import atomic_path
from .statistics import STATISTICS
from .store import TRAINING_ID_COLUMNS, RunTables

KINDS = ("attn", "mlp", "other")
ID_COLUMNS = ("example_index", "example_id", "source", "source_line", "status")
# Direction fixed a priori from the studies (arXiv:2410.23743, 2504.10766): +1 where a higher
# value is more suspect (an irrelevant or low-quality response), -1 where a lower one is.
SPECTRAL_SCORES = tuple(stat for stat in STATISTICS if stat.suspect)
SUSPECT_DIRECTION = {
    **{stat.name: stat.suspect for stat in SPECTRAL_SCORES},
    **{f"nuclear_norm_{kind}": 1 for kind in KINDS},
    "layer_mad": 1,
    "loss": 1,
    "ifd": 1,
    "flag": 1,
}
SCORES = tuple(SUSPECT_DIRECTION)
CALIBRATION_FEATURES = ("flag", "loss", "ifd", "effective_rank", "layer_mad")
ROBUST_SCALE = 1.4826  # makes the median absolute deviation estimate a normal's sigma
CALIBRATION_L2 = 1.0


# ---------------------------------------------------------------- per-example scores


def example_scores(tables: RunTables) -> pd.DataFrame:
    """One row per example of the run: ids, status, every score and its percentile."""
    examples = tables.examples.set_index("example_index", drop=False)
    ok = examples.index[examples["status"] == "ok"]
    spectra = ok_spectra(tables)
    scores = gradient_scores(spectra).reindex(ok)
    scores["loss"] = examples.loc[ok, "loss"]
    scores["ifd"] = examples.loc[ok, "ifd"]
    scores["flag"] = flag_scores(spectra).reindex(ok)
    scores = scores.reindex(examples.index)[list(SCORES)].astype("float64")
    for name in SCORES:
        scores[f"{name}_pct"] = percentile_within(scores[name])
    frame = pd.concat([examples[id_columns(examples)], scores], axis=1)
    return frame.reset_index(drop=True)


def id_columns(table: pd.DataFrame) -> list[str]:
    """The columns that say which example a row is: in a training run, also its step."""
    return [c for c in (*ID_COLUMNS, *TRAINING_ID_COLUMNS) if c in table]


def gradient_scores(spectra: pd.DataFrame) -> pd.DataFrame:
    """The registry's scores, nuclear norms per kind and layer MAD per example."""
    by_example = spectra.groupby("example_index")
    scores = pd.DataFrame(
        {stat.name: by_example[stat.name].agg(stat.per_example) for stat in SPECTRAL_SCORES}
    )
    per_kind = spectra.pivot_table(
        index="example_index", columns="kind", values="nuclear_norm", aggfunc="sum"
    )
    for kind in KINDS:
        scores[f"nuclear_norm_{kind}"] = per_kind.get(kind, np.nan)
    scores["layer_mad"] = layer_mad(spectra)
    return scores


def layer_mad(spectra: pd.DataFrame) -> pd.Series:
    """The study's MAD of each module's own nuclear-norm curve, averaged over modules."""
    curves = spectra.pivot_table(
        index=["example_index", "module"], columns="layer", values="nuclear_norm", aggfunc="sum"
    )
    per_module = pd.Series(mad(curves.to_numpy()), index=curves.index, dtype="float64")
    return per_module.groupby(level="example_index").mean()


def percentile_within(values: pd.Series) -> pd.Series:
    """Fraction of the non-null values that are <= each value; null stays null."""
    return values.rank(method="max") / values.notna().sum()


# ---------------------------------------------------------------- the flag detector


def gradient_signature(spectra: pd.DataFrame) -> pd.DataFrame:
    """Examples x matrices table of log nuclear norms: the per-example gradient fingerprint."""
    table = spectra.pivot_table(
        index="example_index", columns="param", values="nuclear_norm", aggfunc="sum"
    )
    return np.log(table.clip(lower=np.finfo(np.float64).tiny))


def robust_center_scale(table: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Column-wise median and 1.4826 * MAD (a normal's sigma, robustly)."""
    median = table.median()
    return median, ROBUST_SCALE * (table - median).abs().median()


def robust_z(table: pd.DataFrame) -> pd.DataFrame:
    """Column-wise (x - median) / (1.4826 * MAD); a column without spread scores 0."""
    median, scale = robust_center_scale(table)
    return (table - median) / scale.where(scale > 0, np.inf)


def flag_scores(spectra: pd.DataFrame) -> pd.Series:
    """Mean robust z-score of the example's log nuclear norms against the run's examples."""
    return robust_z(gradient_signature(spectra)).mean(axis=1)


class OnlineFlagger:
    """The ``flag`` score made online (the training monitor's): the robust z-score of each
    example's log nuclear norms against a running window of recent examples, averaged
    over the matrices whose window has spread."""

    def __init__(self, window: int, min_window: int, threshold: float):
        self.window: deque[np.ndarray] = deque(maxlen=window)
        self.min_window, self.threshold = min_window, threshold

    def score(self, log_nuclear: np.ndarray) -> np.ndarray:
        """Scores (nan until the window holds ``min_window`` examples) of examples x
        matrices, each against the window before them; then the window takes them in."""
        scores = np.full(len(log_nuclear), np.nan)
        for i, values in enumerate(log_nuclear):
            if len(self.window) >= self.min_window:
                scores[i] = self._against_window(values)
            self.window.append(values)
        return scores

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        """Which scores exceed the threshold (nan never does)."""
        return np.nan_to_num(scores, nan=-np.inf) > self.threshold

    def _against_window(self, values: np.ndarray) -> float:
        median, scale = robust_center_scale(pd.DataFrame(np.stack(self.window)))
        usable = (scale > 0).to_numpy()
        if not usable.any():
            return float("nan")
        center, spread = median.to_numpy()[usable], scale.to_numpy()[usable]
        return float(np.mean((values[usable] - center) / spread))


def instruction_gradient_scores(given: RunTables, blank: RunTables) -> pd.DataFrame:
    """Gradient analogues of IFD from a run and its twin with the instructions blanked.

    ``nuclear_ifd``: the example's total nuclear norm given its instruction / given an empty
    instruction (the same template, so only the instruction's content differs), as IFD
    divides the losses. ``flag_ifd``: the mean over matrices of the robust z-score of
    log(nuclear given / nuclear blank) against the run's examples. An instruction that
    explains its response shrinks the gradient, so higher is suspect, as for IFD.
    """
    log_ratio = gradient_signature(ok_spectra(given)) - gradient_signature(ok_spectra(blank))
    totals = [ok_spectra(t).groupby("example_index")["nuclear_norm"].sum() for t in (given, blank)]
    return pd.DataFrame(
        {
            "nuclear_ifd": totals[0] / totals[1],
            "flag_ifd": robust_z(log_ratio.dropna()).mean(axis=1),
        }
    )


def ok_spectra(tables: RunTables) -> pd.DataFrame:
    """The spectra rows of the examples profiled without problems, routed experts pooled
    per layer (so an MoE layer weighs as much as a dense one)."""
    ok = tables.examples.loc[tables.examples["status"] == "ok", "example_index"]
    return pool_experts(tables.spectra[tables.spectra["example_index"].isin(ok)])


def two_sided(values: pd.Series) -> pd.Series:
    """|robust z| within the run: how far from the run's typical example, in either direction.

    Used where a score's suspect direction is not known in advance (see the module notes).
    """
    return robust_z(values.to_frame()).iloc[:, 0].abs()


def flag_ranking(scores: pd.DataFrame, labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """Scored examples ranked most suspect first, with a probability when labels are given.

    ``labels`` has ``example_index`` and ``label`` (1 = does not answer its instruction);
    a penalised logistic regression on robust z-scores of the calibration features then
    gives ``probability``, which also orders the ranking.
    """
    ranked = scores[scores["flag"].notna()]
    if labels is None:
        ranked = ranked.assign(probability=np.nan, label=pd.NA)
        order = "flag"
    else:
        ranked = ranked.merge(labels, on="example_index", how="left")
        ranked["probability"] = calibrated_probability(ranked)
        order = "probability"
    return rank_table(ranked, order, ["flag", "flag_pct", "probability", "label"])


def rank_table(ranked: pd.DataFrame, order: str, columns: list[str]) -> pd.DataFrame:
    """Rows ranked by ``order``, highest (most suspect) first, ties by example index."""
    ranked = ranked.sort_values([order, "example_index"], ascending=[False, True])
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    return ranked[["rank", *id_columns(ranked), *columns]].reset_index(drop=True)


def calibrated_probability(ranked: pd.DataFrame) -> np.ndarray:
    """Probability of a bad response from a logistic fit on the labelled rows."""
    usable = [c for c in CALIBRATION_FEATURES if ranked[c].notna().any()]
    features = robust_z(ranked[usable]).fillna(0.0).to_numpy()
    labelled = ranked["label"].notna().to_numpy()
    y = ranked.loc[labelled, "label"].to_numpy(dtype=np.float64)
    if len(set(y)) < 2:
        raise GradspecError(
            "calibration needs labelled examples of both kinds (label 1 for a "
            "response that does not answer its instruction, 0 for a good one)"
        )
    weights = fit_logistic(features[labelled], y, CALIBRATION_L2)
    return logistic(np.column_stack([np.ones(len(features)), features]) @ weights)


def logistic(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fit_logistic(features: np.ndarray, y: np.ndarray, l2: float, steps: int = 100) -> np.ndarray:
    """Weights (intercept first) minimising the log loss + l2/2 * |w|^2, by Newton's method.

    The penalty (not applied to the intercept) keeps the weights finite when a handful of
    labels is perfectly separable.
    """
    x = np.column_stack([np.ones(len(features)), features])
    penalty = np.diag([1e-9] + [l2] * features.shape[1])
    weights = np.zeros(x.shape[1])
    for _ in range(steps):
        p = logistic(x @ weights)
        gradient = x.T @ (p - y) + penalty @ weights
        hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-12:
            break
    return weights


def read_labels(path: str | os.PathLike, scores: pd.DataFrame) -> pd.DataFrame:
    """A CSV of ``example_id`` or ``example_index`` and ``label`` (0/1), as example indices."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise GradspecError(f"--labels {path}: cannot read it as CSV ({exc})") from None
    key = next((c for c in ("example_id", "example_index") if c in table), None)
    if key is None or "label" not in table:
        raise GradspecError(
            f"--labels {path}: needs a 'label' column (1 = does not answer its "
            "instruction, 0 = good) and 'example_id' or 'example_index'"
        )
    if not table["label"].isin([0, 1]).all():
        raise GradspecError(f"--labels {path}: 'label' must be 0 or 1")
    known = pd.Series(scores["example_index"].to_numpy(), index=scores[key])
    unknown = table.loc[~table[key].isin(known.index), key].tolist()
    if unknown:
        raise GradspecError(
            f"--labels {path}: {len(unknown)} {key}s not in the run, e.g. {unknown[0]!r}"
        )
    return pd.DataFrame(
        {
            "example_index": known.loc[table[key]].to_numpy(),
            "label": table["label"].astype("int64").to_numpy(),
        }
    )


# ---------------------------------------------------------------- evaluation and output


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney, ties averaged).

    The probability that a random positive outscores a random negative, ties counting one
    half; NaN when either class is empty.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


TABLE_SUFFIXES = (".parquet", ".csv")


def check_table_path(path: str | os.PathLike, option: str) -> Path:
    """``path`` if it names a table file gradspec writes: .parquet or .csv."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise GradspecError(f"{option} {path}: name a .parquet or .csv file")
    return path


def save_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table atomically, as CSV when the name ends in .csv, else as Parquet."""
    path = check_table_path(path, "table")
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
    return path
