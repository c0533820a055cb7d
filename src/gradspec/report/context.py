"""What a report is about: its title, runs and analysis settings, and the method notes."""

from __future__ import annotations

from collections.abc import Sequence

from ..analysis import segment_slices
from ..runs import Run
from ..statistics import DERIVED_STATISTICS
from ..store import now_iso
from .training import METHOD_NOTE, training_runs


class ReportContext:
    """What the report is about: title, runs and analysis settings."""

    def __init__(
        self, title: str, runs: Sequence[Run], statistic: str, split: str, n_boot: int, seed: int
    ):
        self.title, self.runs, self.statistic = title, list(runs), statistic
        self.split, self.n_boot, self.seed = split, n_boot, seed
        self.created = now_iso()

    @property
    def statistic_name(self) -> str:
        return DERIVED_STATISTICS.get(self.statistic, self.statistic.replace("_", " "))

    def method_notes(self) -> list[str]:
        """Definitions, the layer split for each depth in the report, pairing and CIs."""
        depths = sorted(
            {
                int(run.tables.spectra["layer"].max()) + 1
                for run in self.runs
                if not run.tables.spectra.empty
            }
        )
        splits = "; ".join(
            f"{d} layers: "
            + ", ".join(
                f"{name} {s.start}–{s.stop - 1}"
                for name, s in segment_slices(d, self.split).items()
                if name != "all" and s.stop > s.start
            )
            for d in depths
        )
        return [
            f"Curves: mean over examples of the {self.statistic_name} at each layer; examples "
            "with a non-finite value are dropped and counted (examples table).",
            "MAD: mean over consecutive layers of |v[l+1] − v[l]| of a curve. Early, middle "
            "and late MADs use only the layer pairs inside each part (as the study), so the "
            f"pairs across a boundary count only in 'all'. Split rule '{self.split}': "
            f"{splits or 'no runs'}.",
            "Relative difference (rd) of an irrelevant run from its correct twin: mean over "
            "layers of |a − b| / |a| between their curves (a: correct). The runs are paired "
            "by example_index, i.e. both data files must list the same instructions in the "
            "same order, as the shared study data do.",
            "Uncertainty: 95% basic (reverse-percentile) bootstrap intervals over examples "
            f"({self.n_boot} "
            f"replicates, seed {self.seed}); paired runs are resampled together. p-values: "
            f"paired permutation tests ({self.n_boot} random swaps of the two runs' values "
            "per example) on the module-mean relative difference. Basic intervals correct for "
            "the upward bias of MAD and relative differences on few examples, so when two "
            "runs barely differ the interval can lie below the study's (biased) estimate; "
            "intervals of quantities that cannot be negative are cut at zero.",
            "Findings use the nuclear norm whatever statistic the curves show, on the paper's "
            "matrices q, k, v, o (MLP matrices in rows of their own beside them), with "
            "intervals at a Bonferroni level over all their conditions (see each finding).",
            *([METHOD_NOTE] if training_runs(self.runs) else []),
        ]
