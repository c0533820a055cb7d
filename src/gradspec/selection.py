"""Training-data selection: keep the best examples by a score, optionally a covering subset.

The kept records are written back in the input's own format (through
:mod:`gradspec.formats`: JSON arrays and JSONL byte for byte, Parquet files and datasets
folders with the same schema and row values), with a sidecar table saying why each
example was kept or dropped. ``diverse`` selection first takes a quality pool (the best
``pool`` x N by the score) and then picks N of it by greedy facility location over
standardised per-example gradient signatures, so the kept set is both good and
representative of the pool. ``within`` ranks each example by its place within its own
stratum (its source file, or a field of the records) rather than by the raw score, so
the kept examples are spread over the strata in proportion to their sizes: scores whose
scale follows the response style (gradient norms grow for short answer-only responses)
then compare examples of the same style only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data import DataSource, Example, data_sha256, load_examples, resolve_data
from .errors import DataError, GradspecError
from .files import refuse_unsafe_output
from .formats import format_of
from .formats.fields import parse_fields
from .quality import (
    SCORES,
    SUSPECT_DIRECTION,
    check_table_path,
    example_scores,
    gradient_signature,
    save_table,
)
from .store import load_run

Decision = tuple[bool, str]  # (kept, reason)
KEEP_HELP = "a count N >= 1 (an integer), or a fraction in (0, 1] with a point (0.5, 1.0)"


@dataclass
class Selection:
    """The per-example report and the files written."""

    report: pd.DataFrame
    outputs: list[Path]
    sidecar: Path
    n_profiled: int  # examples of the data the run profiled (the others were never ranked)


def select(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    keep: str,
    by: str = "flag",
    prefer: str | None = None,
    diverse: bool = False,
    pool: float = 2.0,
    sidecar: str | os.PathLike | None = None,
    within: str | None = None,
    extra_scores: pd.DataFrame | None = None,
) -> Selection:
    """Write the examples of ``data`` kept by score (and coverage) to ``out``.

    ``keep`` is a count N (an integer: "1" keeps one) or a fraction in (0, 1] written
    with a point ("1.0" keeps all) of the examples that have the score;
    ``prefer`` is 'low' or 'high' (default: the less suspect end of ``by``). Refuses data
    that differs from what the run profiled. ``out`` is a file for one data file, a
    directory (one file per input file, same names) for several. ``within`` ('source' or
    a record field) ranks by the place within each stratum (``rank_within``).
    ``extra_scores`` (``example_index`` and score columns, higher = more suspect, e.g. the
    learned detector's ``probability``) adds scores ``by`` can name.
    """
    tables = load_run(run_dir)
    source = run_data(tables.manifest, data)
    files = check_data_unchanged(tables.manifest, source)
    out_path = check_output(Path(out), files)
    targets = output_files(files, out_path)
    sidecar_path = Path(sidecar) if sidecar else default_sidecar(out_path, len(files))
    refuse_unsafe_output(sidecar_path, [*files, *targets], "--sidecar")
    check_table_path(sidecar_path, "--sidecar")
    scores = example_scores(tables)
    known = list(SCORES)
    if extra_scores is not None:
        scores = scores.merge(extra_scores, on="example_index", how="left")
        known += [name for name in extra_scores if name != "example_index"]
    prefer = prefer or ("low" if SUSPECT_DIRECTION.get(by, 1) > 0 else "high")
    ranked = rank_eligible(scores, by, prefer, known)
    fields = tables.manifest["data"].get("fields")
    examples = load_examples(source, parse_fields(fields) if fields else None)
    order, strata = by, None
    if within is not None:
        strata = strata_of(examples, within)
        ranked = rank_within(ranked, strata)
        order = f"{by} within {within}"
    n_keep = parse_keep(keep, len(ranked))
    if diverse:
        decisions = diverse_decisions(tables.spectra, ranked, n_keep, pool, order)
    else:
        decisions = top_decisions(ranked, n_keep, order, prefer)
    report = selection_report(examples, scores, by, ranked, decisions)
    if strata is not None:
        report.insert(
            report.columns.get_loc("rank"), "stratum", report["example_index"].map(strata)
        )
    kept = set(report.loc[report["kept"], "example_index"])
    write_selected(examples, files, kept, targets)
    save_table(report, sidecar_path)
    return Selection(report, targets, sidecar_path, len(scores))


# ---------------------------------------------------------------- checks and options


def run_data(manifest: dict[str, Any], data: str | os.PathLike) -> DataSource:
    """``data`` as the run read it: the split and config it profiled of a Hub data set."""
    hub = manifest.get("data", {}).get("hub")
    if hub and os.fspath(data) == hub["repo_id"]:
        return resolve_data(data, hub["split"], hub["config"])
    return resolve_data(data)


def check_data_unchanged(manifest: dict[str, Any], source: DataSource) -> list[Path]:
    """The data files, if their hash is the one the run's manifest recorded."""
    files = source.files
    if data_sha256(files) != manifest.get("data", {}).get("sha256"):
        names = ", ".join(str(f) for f in files)
        raise GradspecError(
            f"{names}: not the data this run profiled (its sha256 differs from "
            "the run's manifest); it changed since profiling, or is another "
            "file. Select from the run's own data, or profile this data again"
        )
    return files


def check_output(out: Path, files: list[Path]) -> Path:
    """Refuse to overwrite an input file (or a link to one) or to write into a run
    directory; several input files need an output directory."""
    refuse_unsafe_output(out, files, "--out")
    if len(files) > 1 and out.is_file():
        raise GradspecError(
            f"--out {out}: the data has {len(files)} files, so --out must be "
            "a directory (one output file per input file)"
        )
    return out


def parse_keep(keep: str, n_eligible: int) -> int:
    """How many to keep: an integer count N >= 1 ("1" is one example), or a fraction in
    (0, 1] written with a point ("1.0" is all; rounded half up)."""
    try:
        count = int(keep)
    except ValueError:
        try:
            fraction = float(keep)
        except ValueError:
            fraction = math.nan
        if not 0 < fraction <= 1:
            raise GradspecError(f"--keep {keep}: {KEEP_HELP}") from None
        return min(n_eligible, math.floor(fraction * n_eligible + 0.5))
    if count < 1:
        raise GradspecError(f"--keep {keep}: {KEEP_HELP}")
    return min(count, n_eligible)


def rank_eligible(
    scores: pd.DataFrame, by: str, prefer: str, known: Sequence[str] = SCORES
) -> pd.Series:
    """Scores of the examples that have one, best first (ties by example index)."""
    if by not in known:
        raise GradspecError(f"--by {by}: unknown score; use one of {', '.join(known)}")
    if prefer not in ("low", "high"):
        raise GradspecError(f"--prefer {prefer}: use 'low' or 'high'")
    eligible = scores.loc[scores[by].notna(), ["example_index", by]]
    ordered = eligible.sort_values([by, "example_index"], ascending=[prefer == "low", True])
    return ordered.set_index("example_index")[by]


def strata_of(examples: list[Example], column: str) -> pd.Series:
    """Each example's stratum: its source file ('source') or the value of a record field."""
    if column == "source":
        return pd.Series({ex.index: ex.source for ex in examples}, dtype=object)
    values = {}
    for ex in examples:
        if column not in ex.record:
            raise DataError(
                ex.source,
                ex.line,
                "missing, so --within cannot stratify by it (give a field every record has, "
                "or 'source' for the source file)",
                field=column,
                row=ex.row,
            )
        values[ex.index] = str(ex.record[column])
    return pd.Series(values, dtype=object)


def rank_within(ranked: pd.Series, strata: pd.Series) -> pd.Series:
    """The ranking reordered by each example's place within its stratum, best first.

    An example's place is its position in its stratum's own ranking divided by the
    stratum's number of ranked examples (1/n for a stratum's best, 1 for its worst), so
    the best k of the new order hold about k/N of every stratum; equal places go to the
    lower example index. ``strata`` maps example index to stratum.
    """
    frame = pd.DataFrame(
        {
            "example_index": ranked.index.to_numpy(),
            "stratum": strata.reindex(ranked.index).to_numpy(),
        }
    )
    by_stratum = frame.groupby("stratum", sort=False)["example_index"]
    frame["place"] = (by_stratum.cumcount() + 1) / by_stratum.transform("size")
    return ranked.loc[frame.sort_values(["place", "example_index"])["example_index"]]


# ---------------------------------------------------------------- decisions


def top_decisions(ranked: pd.Series, n_keep: int, by: str, prefer: str) -> dict[int, Decision]:
    """Keep the first ``n_keep`` of the ranking."""
    n = len(ranked)
    decisions = {}
    for rank, index in enumerate(ranked.index, start=1):
        where = f"rank {rank} of {n} by {by} ({prefer}est first)"
        decisions[index] = (
            (True, f"kept: {where}")
            if rank <= n_keep
            else (False, f"dropped: {where}; only the best {n_keep} are kept")
        )
    return decisions


def diverse_decisions(
    spectra: pd.DataFrame, ranked: pd.Series, n_keep: int, pool: float, by: str
) -> dict[int, Decision]:
    """Keep ``n_keep`` of the quality pool chosen by greedy facility location."""
    if pool < 1:
        raise GradspecError(f"--pool {pool}: must be at least 1 (a multiple of the kept count)")
    n = len(ranked)
    size = min(n, max(n_keep, math.ceil(pool * n_keep)))
    members = list(ranked.index[:size])
    features = standardise(gradient_signature(spectra).loc[members].to_numpy())
    similarity = rbf_similarity(features)
    chosen, gains = greedy_facility_location(similarity, n_keep)
    decisions = {}
    for rank, index in enumerate(ranked.index, start=1):
        where = f"rank {rank} of {n} by {by}"
        decisions[index] = (
            False,
            f"dropped: {where}, outside the best {size} considered for coverage",
        )
    for step, (position, gain) in enumerate(zip(chosen, gains, strict=True), start=1):
        rank = position + 1
        decisions[members[position]] = (
            True,
            f"kept: rank {rank} of {n} by {by}, in the best {size}; coverage pick "
            f"{step} (gain {gain:.3g})",
        )
    for position, index in enumerate(members):
        if position in chosen:
            continue
        nearest = chosen[int(np.argmax(similarity[position, chosen]))]
        decisions[index] = (
            False,
            f"dropped: rank {position + 1} of {n} by {by}, in the best {size} but "
            f"covered by kept example {members[nearest]} "
            f"(similarity {similarity[position, nearest]:.2f})",
        )
    return decisions


def standardise(features: np.ndarray) -> np.ndarray:
    """Columns to zero mean and unit variance; constant columns become 0."""
    spread = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(spread > 0, spread, np.inf)


def rbf_similarity(features: np.ndarray) -> np.ndarray:
    """exp(-|a - b|^2 / h), h the median squared distance between distinct points (or 1)."""
    norms = np.sum(features**2, axis=1)
    distances = np.maximum(norms[:, None] + norms[None, :] - 2 * features @ features.T, 0.0)
    np.fill_diagonal(distances, 0.0)
    off_diagonal = distances[~np.eye(len(distances), dtype=bool)]
    bandwidth = float(np.median(off_diagonal)) if off_diagonal.size else 0.0
    return np.exp(-distances / (bandwidth if bandwidth > 0 else 1.0))


def greedy_facility_location(similarity: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """Greedily maximise F(S) = sum_i max_{j in S} sim(i, j); returns picks and their gains.

    F is monotone submodular for non-negative similarities, so the greedy set is within
    (1 - 1/e) of the best set of size k. Ties go to the lower position (the better rank).
    """
    cover = np.zeros(len(similarity))
    chosen: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        gain = np.maximum(similarity - cover[:, None], 0.0).sum(axis=0)
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        gains.append(float(gain[best]))
        cover = np.maximum(cover, similarity[:, best])
    return chosen, gains


# ---------------------------------------------------------------- report and output


def selection_report(
    examples: list[Example],
    scores: pd.DataFrame,
    by: str,
    ranked: pd.Series,
    decisions: dict[int, Decision],
) -> pd.DataFrame:
    """One row per example of the data: kept, rank, score and the reason."""
    status = scores.set_index("example_index")["status"]
    rank_of = {index: rank for rank, index in enumerate(ranked.index, start=1)}
    rows = []
    for example in examples:
        kept, reason = decisions.get(example.index) or (
            False,
            missing_reason(status.get(example.index), by),
        )
        rows.append(
            {
                "example_index": example.index,
                "example_id": example.example_id,
                "source": example.source,
                "source_line": example.source_line,
                "kept": kept,
                "rank": rank_of.get(example.index),
                by: ranked.get(example.index),
                "reason": reason,
            }
        )
    columns = ["example_index", "example_id", "source", "source_line", "kept", "rank", by, "reason"]
    report = pd.DataFrame(rows, columns=columns)
    report["rank"] = report["rank"].astype("Int64")
    report[by] = report[by].astype("float64")
    return report


def missing_reason(status: str | None, by: str) -> str:
    """Why an example has no score to rank by."""
    if status is None:
        return "dropped: not profiled in this run (beyond its --limit, or the run is unfinished)"
    if status != "ok":
        return f"dropped: the profile skipped it ({status.removeprefix('skipped:')})"
    hint = " (profile with --ifd to record it)" if by == "ifd" else ""
    return f"dropped: no {by} score{hint}"


def default_sidecar(out: Path, n_files: int) -> Path:
    """``<out stem>.selection.csv`` beside a file output, ``selection.csv`` in a directory."""
    return out / "selection.csv" if n_files > 1 else out.with_name(f"{out.stem}.selection.csv")


def output_files(files: list[Path], out: Path) -> list[Path]:
    """Where each data file's kept records go (``out``, or one file per input in the
    directory ``out``), none of them an input or a link to one."""
    targets = [out / path.name for path in files] if len(files) > 1 else [out]
    for target in targets:
        refuse_unsafe_output(target, files, "--out")
    return targets


def write_selected(
    examples: list[Example], files: list[Path], kept: set[int], targets: list[Path]
) -> None:
    """Write each data file's kept records, in input order, in that file's own format."""
    for path, target in zip(files, targets, strict=True):
        rows = [ex.row for ex in examples if Path(ex.source) == path and ex.index in kept]
        target.parent.mkdir(parents=True, exist_ok=True)
        format_of(path).write(target, rows, like=path)
