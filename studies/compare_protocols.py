"""Point estimates of the study's findings from two reports' curve tables, side by side.

    python studies/compare_protocols.py OLD/report_tables/curves.csv NEW/report_tables/curves.csv

Prints a Markdown table: for each task, the quantities the findings test (level and MAD of
correct none / detailed runs, relative difference of irrelevant from correct per style,
knowledge rd per length), from the old report's curves on all matrices and on q, k, v, o
alone, and from the new report's curves on q, k, v, o: what the loss tokens and the matrices
each change. Runs are named ``<model>/<task>-<style or length>-<correctness>``.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from gradspec.analysis import mad, relative_difference

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def curves_by_run(path: str) -> dict[str, dict[str, np.ndarray]]:
    """run (without its model) -> module -> mean curve over layers."""
    table = pd.read_csv(path).sort_values(["run", "module", "layer"])
    found: dict[str, dict[str, np.ndarray]] = {}
    for (run, module), rows in table.groupby(["run", "module"]):
        found.setdefault(run.split("/", 1)[-1], {})[module] = rows["mean"].to_numpy(float)
    return found


def quantities(curves: dict[str, dict[str, np.ndarray]], modules: tuple[str, ...] | None) -> dict:
    """(task, quantity) -> value, on ``modules`` (None: every module of the run)."""

    def chosen(run: str) -> list[str]:
        return [m for m in curves[run] if modules is None or m in modules]

    def level(run: str) -> float:
        return float(np.mean([curves[run][m].mean() for m in chosen(run)]))

    def mean_mad(run: str) -> float:
        return float(np.mean([mad(curves[run][m]) for m in chosen(run)]))

    def rd(correct: str, irrelevant: str) -> float:
        return float(
            np.mean(
                [
                    relative_difference(curves[correct][m], curves[irrelevant][m])
                    for m in chosen(correct)
                ]
            )
        )

    values: dict[tuple[str, str], float] = {}
    for run in curves:
        if not run.endswith("-correct") or f"{run[: -len('correct')]}irrelevant" not in curves:
            continue
        stem = run[: -len("-correct")]
        task, dash, variant = stem.rpartition("-")
        if not dash:  # a knowledge set of one length, e.g. wiki_long_tail
            task, variant = stem, "all"
        values[(task, f"rd {variant}")] = rd(run, f"{stem}-irrelevant")
        if variant in ("none", "detailed"):
            values[(task, f"norm {variant}")] = level(run)
            values[(task, f"MAD {variant}")] = mean_mad(run)
    return values


def main(old_path: str, new_path: str) -> None:
    """Print the side-by-side Markdown table."""
    old, new = curves_by_run(old_path), curves_by_run(new_path)
    columns = {
        "old protocol, all matrices": quantities(old, None),
        "old protocol, q k v o": quantities(old, ATTENTION),
        "paper's protocol, q k v o": quantities(new, ATTENTION),
    }
    keys = sorted(set().union(*columns.values()))
    table = pd.DataFrame(
        [
            {"task": t, "quantity": q, **{c: v.get((t, q)) for c, v in columns.items()}}
            for t, q in keys
        ]
    )
    print(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
