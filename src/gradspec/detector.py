"""A bad-response detector learned from corrupted twins of the run's own examples.

The user of a data set has no labels, but can corrupt their own data. ``learn_flags``
draws a sample of the run's profiled examples, gives each a corrupted twin
(:mod:`gradspec.corruptions`: stitched, swapped, wrong final answer, truncated; the kinds
taken in turn), profiles the twins with the run's model and options into a sibling run
directory (``<run>-twins/<kinds>_n<sample>_seed<seed>/``, resumable like any run), and
fits a classifier that tells an original from its twin on per-example features
(``example_features``):

- per layer and module kind (attn / mlp / other): the log of the summed nuclear norms,
  the mean effective rank and the mean S_max / S_sum (spectral / nuclear norm);
- the cross-layer MAD of the example's own nuclear-norm curves (quality.layer_mad);
- loss, response-only loss and IFD (the last two with ``--ifd``), response length in tokens.

The classifier is scikit-learn's L2-penalised logistic regression on median-imputed,
standardised features, Platt-calibrated (``CalibratedClassifierCV``, sigmoid) on folds
that keep an original and its twin together. Every real example gets the calibrated
probability that it is a corruption of the kinds learnt from, at the twins' share of the
training set (one half: an original and its twin each), and the features that pushed it
up most (the largest terms w_j z_j of the logistic regression fit on all pairs). The
originals of the sample are scored out of fold (by models that never saw their pair), and
the out-of-fold AUROC of twins against originals is the detector's held-out check.

Deterministic given the seed (the twins depend on it; the fits use no randomness).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .corruptions import CORRUPTIONS, Twin, check_kinds, corrupted_twins
from .data import Example, data_sha256, load_examples
from .errors import GradspecError
from .files import write_json_atomic, write_text_atomic
from .formats.fields import parse_fields
from .options import ProfileOptions
from .quality import auroc, example_scores, layer_mad, ok_spectra, rank_table, save_table
from .store import RunTables, load_run

BASELINE_FEATURES = ("loss", "ifd", "length")  # what the gradient features are measured against
MIN_PAIRS = 20  # fewer (original, twin) pairs than this: nothing to learn from
FOLDS = 5  # out-of-fold scoring and calibration folds (fewer with fewer pairs)
REGULARISATION = 0.1  # C of the logistic regression: the inverse L2 penalty
TOP_DRIVERS = 3
DEFAULT_SAMPLE = 256
# Options of the run not given to the twins' run: how many examples, and how the user's
# records map to fields (the twins are chat records of their own).
NOT_FOR_TWINS = {"limit", "fields"}


@dataclass
class LearnedFlags:
    """Per real example its probability and drivers; per twin its out-of-fold probability."""

    ranking: pd.DataFrame
    twins: pd.DataFrame
    summary: dict[str, Any]
    folder: Path


# ---------------------------------------------------------------- features


def example_features(tables: RunTables) -> pd.DataFrame:
    """One row per example profiled without problems, one column per feature."""
    spectra = ok_spectra(tables)
    spectra = spectra.assign(
        smax_ssum=spectra["spectral_norm"]
        / spectra["nuclear_norm"].where(spectra["nuclear_norm"] > 0)
    )
    per_part = spectra.groupby(["example_index", "layer", "kind"]).agg(
        log_nuc=("nuclear_norm", "sum"),
        erank=("effective_rank", "mean"),
        smax_ssum=("smax_ssum", "mean"),
    )
    per_part["log_nuc"] = np.log(per_part["log_nuc"].clip(lower=np.finfo(np.float64).tiny))
    wide = per_part.unstack(["layer", "kind"])
    wide.columns = [f"{name}_L{layer}_{kind}" for name, layer, kind in wide.columns]
    examples = tables.examples.set_index("example_index")
    ok = examples.index[examples["status"] == "ok"]
    table = pd.DataFrame(index=ok)
    table["mad"] = layer_mad(spectra)
    for name in ("loss", "response_only_loss", "ifd"):
        table[name] = examples.loc[ok, name]
    table["length"] = examples.loc[ok, "n_response_tokens"].astype("float64")
    return table.join(wide).astype("float64")


# ---------------------------------------------------------------- the classifier


@dataclass
class Detector:
    """A calibrated classifier of twins against originals, and the fit that explains it."""

    columns: list[str]
    calibrated: Any
    explainer: Any

    def probability(self, features: pd.DataFrame) -> np.ndarray:
        """Calibrated probability that each row is a corruption."""
        return self.calibrated.predict_proba(features[self.columns])[:, 1]

    def drivers(self, features: pd.DataFrame, top: int = TOP_DRIVERS) -> list[str]:
        """The features with the largest positive terms w_j z_j of each row's score."""
        imputer, scaler, logistic = (step for _, step in self.explainer.steps)
        z = scaler.transform(imputer.transform(features[self.columns]))
        terms = z * logistic.coef_[0]
        order = np.argsort(-terms, axis=1, kind="stable")[:, :top]
        return [
            ", ".join(f"{self.columns[j]} {terms[i, j]:+.2f}" for j in row if terms[i, j] > 0)
            for i, row in enumerate(order)
        ]


def sklearn_modules() -> Any:
    """scikit-learn, or a one-line error saying how to install it."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise GradspecError(
            "flag --learn needs scikit-learn: pip install 'gradspec[learn]'"
        ) from None
    from sklearn import (
        base,
        calibration,
        impute,
        linear_model,
        model_selection,
        pipeline,
        preprocessing,
    )

    return base, calibration, impute, linear_model, model_selection, pipeline, preprocessing


def group_folds(groups: np.ndarray, n: int = FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row positions of folds that keep each group (a pair) together."""
    model_selection = sklearn_modules()[4]
    splits = min(n, len(np.unique(groups)))
    return list(model_selection.GroupKFold(splits).split(groups, groups=groups))


def fit_detector(
    features: pd.DataFrame, y: np.ndarray, groups: np.ndarray, c: float = REGULARISATION
) -> Detector:
    """Fit the calibrated logistic regression on the columns that hold any value."""
    base, calibration, impute, linear_model, _, pipeline, preprocessing = sklearn_modules()
    columns = [name for name in features if features[name].notna().any()]
    model = pipeline.make_pipeline(
        impute.SimpleImputer(strategy="median"),
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(C=c, max_iter=2000),
    )
    x = features[columns]
    calibrated = calibration.CalibratedClassifierCV(
        model, method="sigmoid", cv=group_folds(groups)
    ).fit(x, y)
    explainer = base.clone(model).fit(x, y)
    return Detector(columns, calibrated, explainer)


def out_of_fold(
    features: pd.DataFrame, y: np.ndarray, groups: np.ndarray, c: float = REGULARISATION
) -> np.ndarray:
    """Each row's probability from a detector fit on the folds without its group."""
    from threadpoolctl import threadpool_limits

    probability = np.full(len(y), np.nan)
    with threadpool_limits(1):  # small fits: BLAS threads only contend
        for train, test in group_folds(groups):
            detector = fit_detector(features.iloc[train], y[train], groups[train], c)
            probability[test] = detector.probability(features.iloc[test])
    return probability


# ---------------------------------------------------------------- twins of a run


def twins_folder(run_dir: str | os.PathLike, kinds: Sequence[str], sample: int, seed: int) -> Path:
    """The sibling folder of a run that holds one setting's twins and their run."""
    run = Path(run_dir).resolve()
    return run.with_name(f"{run.name}-twins") / f"{'+'.join(kinds)}_n{sample}_seed{seed}"


def run_examples(manifest: dict[str, Any]) -> list[Example]:
    """The examples a run profiled, read from its data files (a Hub data set's saved split)
    after checking their hash, with the ``--fields`` mapping the run read them with."""
    data = manifest.get("data", {})
    files = [Path(p) for p in data.get("paths", [])]
    missing = [f for f in files if not f.exists()]
    if not files or missing:
        raise GradspecError(f"the run's data {missing[0] if missing else '(none)'} is not found")
    if data_sha256(files) != data.get("sha256"):
        raise GradspecError(
            f"{', '.join(map(str, files))}: not the data the run profiled (its sha256 differs)"
        )
    mapping = parse_fields(data["fields"]) if data.get("fields") else None
    examples = [example for path in files for example in load_examples(path, mapping)]
    return [
        Example(i, ex.source, ex.row, ex.line, ex.record, ex.kind)
        for i, ex in enumerate(examples[: data.get("n_examples")])
    ]


def twin_options(manifest: dict[str, Any]) -> dict[str, Any]:
    """The run's profiling options (all but its limit), to profile the twins the same way."""
    names = {option.name for option in fields(ProfileOptions)} - NOT_FOR_TWINS
    return {k: v for k, v in manifest.get("options", {}).items() if k in names}


def write_if_changed(path: Path, text: str) -> None:
    """Write a file atomically, leaving an identical one untouched (a run hashes its data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        write_text_atomic(path, text)


def profile_twins(
    tables: RunTables,
    folder: Path,
    kinds: Sequence[str],
    sample: int,
    seed: int,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    minimum: int = MIN_PAIRS,
) -> tuple[list[Twin], RunTables]:
    """Build the twins of a sample of the run's examples and profile them (resumably);
    refused with fewer than ``minimum`` twins."""
    from .engine import profile

    manifest = tables.manifest
    ok = set(tables.examples.loc[tables.examples["status"] == "ok", "example_index"])
    examples = [ex for ex in run_examples(manifest) if ex.index in ok]
    twins = corrupted_twins(examples, kinds, sample, seed)
    check_enough(len(twins), len(examples), "examples could be corrupted", minimum)
    write_if_changed(folder / "twins.json", json.dumps([t.record for t in twins], indent=1))
    twin_tables = profile(
        model or manifest["model"]["path"],
        folder / "twins.json",
        folder / "run",
        device=device or manifest.get("device", "auto"),
        progress=progress,
        **twin_options(manifest),
    )
    return twins, twin_tables


def check_enough(n_pairs: int, n_examples: int, what: str, minimum: int = MIN_PAIRS) -> None:
    """Refuse to learn from fewer than ``minimum`` pairs."""
    if n_pairs < minimum:
        raise GradspecError(
            f"--learn needs at least {minimum} examples with a corrupted twin; only "
            f"{n_pairs} of {n_examples} {what}: profile more examples"
        )


def training_pairs(real: pd.DataFrame, fake: pd.DataFrame, twins: Sequence[Twin]) -> pd.DataFrame:
    """The (twin, original) pairs whose two sides were both profiled without problems."""
    pairs = pd.DataFrame(
        {
            "twin_index": range(len(twins)),
            "example_index": [t.example_index for t in twins],
            "kind": [t.kind for t in twins],
        }
    )
    usable = pairs["twin_index"].isin(fake.index) & pairs["example_index"].isin(real.index)
    return pairs[usable].reset_index(drop=True)


def pair_features(
    real: pd.DataFrame, fake: pd.DataFrame, pairs: pd.DataFrame
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Features (originals, then twins), labels (1 = twin) and groups (the original)."""
    x = pd.concat(
        [real.loc[pairs["example_index"]], fake.loc[pairs["twin_index"]]], ignore_index=True
    )
    y = np.r_[np.zeros(len(pairs)), np.ones(len(pairs))]
    groups = np.r_[pairs["example_index"], pairs["example_index"]]
    return x, y, groups


def learnable_run(run_dir: str | os.PathLike, kinds: Sequence[str], sample: int) -> RunTables:
    """The run's tables, after refusing what cannot be learnt from (before any work)."""
    sklearn_modules()
    check_kinds(kinds)
    if sample < MIN_PAIRS:
        raise GradspecError(f"--twins {sample}: give at least {MIN_PAIRS}")
    tables = load_run(run_dir)
    check_enough(int((tables.examples["status"] == "ok").sum()), len(tables.examples), "are 'ok'")
    return tables


def learn_flags(
    run_dir: str | os.PathLike,
    kinds: Sequence[str] = tuple(CORRUPTIONS),
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LearnedFlags:
    """Score every example of a run with a detector learned from corrupted twins."""
    tables = learnable_run(run_dir, kinds, sample)
    folder = twins_folder(run_dir, kinds, sample, seed)
    twins, twin_tables = profile_twins(tables, folder, kinds, sample, seed, model, device, progress)
    real, fake = example_features(tables), example_features(twin_tables)
    pairs = training_pairs(real, fake, twins)
    check_enough(len(pairs), len(twins), "twins and their originals were profiled 'ok'")
    x, y, groups = pair_features(real, fake, pairs)
    held_out = out_of_fold(x, y, groups)
    detector = fit_detector(x, y, groups)
    probability = pd.Series(detector.probability(real), index=real.index)
    probability.loc[pairs["example_index"].to_numpy()] = held_out[: len(pairs)]
    drivers = pd.Series(detector.drivers(real), index=real.index)
    scored = example_scores(tables).assign(
        probability=lambda s: s["example_index"].map(probability),
        drivers=lambda s: s["example_index"].map(drivers),
        label=pd.NA,
    )
    ranking = rank_table(
        scored[scored["probability"].notna()],
        "probability",
        ["flag", "flag_pct", "probability", "label", "drivers"],
    )
    twin_table = pairs.assign(probability=held_out[len(pairs) :])
    summary = held_out_summary(held_out, pairs, seed)
    write_json_atomic(folder / "learned.json", summary)
    save_table(twin_table, folder / "twins.csv")
    return LearnedFlags(ranking, twin_table, summary, folder)


def held_out_summary(held_out: np.ndarray, pairs: pd.DataFrame, seed: int) -> dict[str, Any]:
    """Out-of-fold AUROC of twins against originals (all, and per kind) and calibration."""
    n = len(pairs)
    originals, twins = held_out[:n], held_out[n:]
    per_kind = {
        kind: auroc(
            np.r_[originals, twins[(pairs["kind"] == kind).to_numpy()]],
            np.r_[np.zeros(n, bool), np.ones(int((pairs["kind"] == kind).sum()), bool)],
        )
        for kind in dict.fromkeys(pairs["kind"])
    }
    return {
        "pairs": n,
        "seed": seed,
        "twins_per_kind": pairs["kind"].value_counts().to_dict(),
        "held_out_auroc": auroc(held_out, np.r_[np.zeros(n, bool), np.ones(n, bool)]),
        "held_out_auroc_per_kind": per_kind,
        "mean_probability": float(np.mean(held_out)),
        "twin_share": 0.5,
    }
