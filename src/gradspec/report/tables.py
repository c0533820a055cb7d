"""The report's tables: curves, MAD, relative differences, counts, skipped examples, runs.

Tidy DataFrames computed from labelled runs (analysis.py does the math; training.py adds
the training runs' tables); the renderers only format them. A new table is one function
here and one entry in :func:`build_tables`, which writes it as ``<name>.csv``; a heading
in ``markdown.TABLE_HEADINGS`` and a section in ``html.py`` show it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..analysis import (
    SEGMENTS,
    LayerValues,
    bootstrap,
    largest_difference_layers,
    mad,
    mean_relative_difference,
    paired,
    permutation_test,
    segment_slices,
)
from ..labels import CORRECTNESS
from ..runs import Run, study_order
from ..shared_data import shared_data_path
from .training import training_tables

LABEL_COLUMNS = ("model", "task", "style", "length", "correctness")
RATIO = "spectral_ratio"  # S_max / S_sum, the paper's appendix ratio


def build_tables(
    runs: Sequence[Run], statistic: str, split: str, n_boot: int, seed: int, home: Path
) -> dict[str, pd.DataFrame]:
    """Every table of the report but the findings, as tidy DataFrames; the training-step
    tables only when some run is a training run. ``home`` is the report's folder."""
    return {
        "curves": curve_table(runs, statistic, n_boot, seed),
        "ratio_curves": curve_table(runs, RATIO, n_boot, seed),
        "ratio": ratio_table(runs),
        "mad": mad_table(runs, statistic, split, n_boot, seed),
        "relative_difference": relative_difference_table(runs, statistic, n_boot, seed),
        "examples": count_table(runs, statistic),
        "skipped": skipped_table(runs),
        "runs": manifest_table(runs, home),
        **training_tables(runs, statistic),
        **({"experts": expert_table(runs, statistic)} if any(len(r.experts) for r in runs) else {}),
    }


def expert_table(runs: Sequence[Run], statistic: str) -> pd.DataFrame:
    """Per run, layer, expert matrix and expert: the statistic's mean over the examples
    that routed tokens to the expert, the mean tokens it got per example and the share
    of examples that routed any (runs of mixture-of-experts models only)."""
    frames = []
    for run in runs:
        if run.experts.empty:
            continue
        rows = run.experts.assign(
            value=run.experts[statistic].where(run.experts["expert_tokens"] > 0),
            routed=run.experts["expert_tokens"] > 0,
        )
        grouped = rows.groupby(["layer", "module", "expert"])
        frame = grouped.agg(
            mean=("value", "mean"), tokens=("expert_tokens", "mean"), share=("routed", "mean")
        )
        frames.append(frame.reset_index().assign(run=run.name))
    columns = ["run", "layer", "module", "expert", "mean", "tokens", "share"]
    return pd.concat(frames)[columns] if frames else pd.DataFrame(columns=columns)


def curve_table(runs: Sequence[Run], statistic: str, n_boot: int, seed: int) -> pd.DataFrame:
    """Mean of the statistic at each layer, per run and module, with bootstrap CIs."""
    frames = []
    for run, module, values in profiled_values(runs, statistic):
        # every statistic (norms, effective rank, their ratios) is non-negative
        estimate = bootstrap([[values]], lambda c: c[0], n_boot, seed, floor=0)
        frames.append(
            pd.DataFrame(
                {
                    "run": run.name,
                    "module": module,
                    "layer": values.layers,
                    "mean": estimate.value,
                    "mean_low": estimate.low,
                    "mean_high": estimate.high,
                    "examples": len(values.example_index),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def ratio_table(runs: Sequence[Run]) -> pd.DataFrame:
    """S_max / S_sum per run (rows) and module (columns): the mean over examples and layers."""
    rows = [
        {"run": run.name, "module": module, "ratio": float(values.values.mean())}
        for run, module, values in profiled_values(runs, RATIO)
    ]
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).pivot(index="run", columns="module", values="ratio")
    order = [run.name for run in runs if run.name in table.index]
    return table.loc[order, study_order(table.columns)].reset_index().rename_axis(columns=None)


def mad_table(
    runs: Sequence[Run], statistic: str, split: str, n_boot: int, seed: int
) -> pd.DataFrame:
    """MAD of each run's curves over all layers and the early, middle and late parts."""
    rows = []
    for run, module, values in profiled_values(runs, statistic):
        parts = segment_slices(len(values.layers), split)
        estimate = bootstrap(
            [[values]],
            lambda c, parts=parts: np.stack([mad(c[0][..., parts[s]]) for s in SEGMENTS], axis=-1),
            n_boot,
            seed,
            floor=0,
        )
        for i, segment in enumerate(SEGMENTS):
            layers = values.layers[parts[segment]]
            rows.append(
                {
                    "run": run.name,
                    "module": module,
                    "segment": segment,
                    "layers": f"{layers[0]}-{layers[-1]}" if len(layers) else "",
                    "mad": estimate.value[i],
                    "mad_low": estimate.low[i],
                    "mad_high": estimate.high[i],
                }
            )
    return pd.DataFrame(rows)


def profiled_values(runs: Sequence[Run], statistic: str) -> Iterator[tuple[Run, str, LayerValues]]:
    """(run, module, values) for every module with at least one kept example."""
    for run in runs:
        for module in run.modules():
            values = run.values(module, statistic)
            if len(values.example_index):
                yield run, module, values


def correctness_pairs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(correct, irrelevant) runs whose other labels are all equal."""

    irrelevant = {twin_key(r): r for r in runs if r.labels.get("correctness") == CORRECTNESS[1]}
    return [
        (r, irrelevant[twin_key(r)])
        for r in runs
        if r.labels.get("correctness") == CORRECTNESS[0] and twin_key(r) in irrelevant
    ]


def twin_key(run: Run) -> tuple:
    """A run's labels but name and correctness: equal for a correct run and its twin."""
    if "correctness" not in run.labels:
        return ("name", run.name)
    return tuple(
        sorted((k, str(v)) for k, v in run.labels.items() if k not in ("name", "correctness"))
    )


def relative_difference_table(
    runs: Sequence[Run], statistic: str, n_boot: int, seed: int
) -> pd.DataFrame:
    """Relative difference of each irrelevant run from its correct twin, per module and mean."""
    rows = []
    for correct, irrelevant in correctness_pairs(runs):
        modules = [m for m in correct.modules() if m in irrelevant.modules()]
        values = (
            paired([run.values(m, statistic) for run in (correct, irrelevant) for m in modules])
            if modules
            else []
        )
        if not values or not len(values[0].example_index):
            continue  # nothing profiled in both; the examples table shows why
        k = len(modules)
        for i, module in enumerate([*modules, "mean"]):
            chosen = slice(i, i + 1) if module != "mean" else slice(0, k)
            first, second = values[:k][chosen], values[k:][chosen]
            estimate = bootstrap([first + second], mean_relative_difference, n_boot, seed, floor=0)
            top = (
                largest_difference_layers(first[0].curve(), second[0].curve(), first[0].layers)
                if module != "mean"
                else []
            )
            rows.append(
                {
                    "correct": correct.name,
                    "irrelevant": irrelevant.name,
                    "module": module,
                    "examples": len(first[0].example_index),
                    "rd": estimate.value,
                    "rd_low": estimate.low,
                    "rd_high": estimate.high,
                    "p_value": permutation_test(
                        first, second, mean_relative_difference, n_boot, seed
                    ),
                    "top_layers": " ".join(map(str, top)),
                }
            )
    return pd.DataFrame(rows)


def count_table(runs: Sequence[Run], statistic: str) -> pd.DataFrame:
    """Per run: examples, how many were profiled, skipped, truncated or dropped as NaN."""
    rows = []
    for run in runs:
        examples = run.tables.examples
        ok = examples["status"] == "ok"
        dropped = max((run.values(m, statistic).n_dropped for m in run.modules()), default=0)
        rows.append(
            {
                "run": run.name,
                **{k: run.labels.get(k, "") for k in LABEL_COLUMNS},
                "examples": len(examples),
                "ok": int(ok.sum()),
                "skipped": int((~ok).sum()),
                "truncated": int(examples["truncated"].sum()),
                "dropped_nonfinite": dropped,
                "mean_response_tokens": float(examples.loc[ok, "n_response_tokens"].mean()),
                "mean_loss": float(examples.loc[ok, "loss"].mean()),
            }
        )
    return pd.DataFrame(rows)


def skipped_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Every skipped example with its source position and reason."""
    frames = []
    for run in runs:
        examples = run.tables.examples
        skipped = examples[examples["status"] != "ok"]
        frames.append(
            pd.DataFrame(
                {
                    "run": run.name,
                    "example_index": skipped["example_index"],
                    "source": skipped["source"],
                    "line": skipped["source_line"],
                    "reason": skipped["status"].str.removeprefix("skipped:"),
                }
            )
        )
    columns = ["run", "example_index", "source", "line", "reason"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def manifest_table(runs: Sequence[Run], home: Path) -> pd.DataFrame:
    """The manifest facts of each run: model, data hashes, versions, options.

    Run folders and data files are named relative to the report's folder ``home`` or the
    shared data when they lie there, and the model by its file or folder name, so that a
    report kept with a project names no folder of the machine that wrote it (the run's
    manifest keeps the absolute paths)."""
    bases = (home, shared_data_path())
    rows = []
    for run in runs:
        m = run.tables.manifest
        options = m.get("options", {})
        rows.append(
            {
                "run": run.name,
                "directory": shown_path(run.path, bases),
                "model": model_name(m.get("model", {})),
                "model_sha256": m.get("model", {}).get("config_and_tokenizer_sha256"),
                "data": " ".join(shown_path(p, bases) for p in m.get("data", {}).get("paths", [])),
                "data_sha256": m.get("data", {}).get("sha256"),
                "gradspec": m.get("gradspec_version"),
                **{k: v for k, v in m.get("versions", {}).items()},
                "device": m.get("device"),
                **{
                    k: options.get(k)
                    for k in (
                        "template",
                        "modules",
                        "limit",
                        "method",
                        "dtype",
                        "spectra_dtype",
                        "max_length",
                        "batch_size",
                        "top_k",
                        "ifd",
                    )
                },
                "created": m.get("created"),
                "sessions": len(m.get("sessions", [])),
            }
        )
    return pd.DataFrame(rows)


def shown_path(path: str | Path, bases: Sequence[Path]) -> str:
    """``path`` relative to the first of ``bases`` that holds it, else as recorded."""
    resolved = Path(path).resolve()
    for base in bases:
        if resolved.is_relative_to(base.resolve()):
            return str(resolved.relative_to(base.resolve()))
    return str(path)


def model_name(model: dict[str, Any]) -> str | None:
    """A run's model by name: the GGUF file it was converted from, else its folder."""
    path = model.get("gguf", {}).get("path") or model.get("path")
    return Path(path).name if path else None
