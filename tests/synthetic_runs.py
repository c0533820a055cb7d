"""Run tables with chosen values, in memory or as run directories, for analysis and reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gradspec.runs import Run
from gradspec.store import RunStore, RunTables, spectra_schema

KINDS = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def rows(
    values: dict[str, np.ndarray], losses: np.ndarray | None = None, skipped: tuple[int, ...] = ()
) -> tuple[list[dict], list[dict]]:
    """Spectra and example rows; ``values[module]`` is (examples, layers) of nuclear norms.

    The other statistics are fixed multiples (spectral = nuclear / 4, Frobenius = nuclear /
    2), so derived statistics have known values. Skipped examples get no spectra rows.
    """
    n_examples = next(iter(values.values())).shape[0]
    losses = np.ones(n_examples) if losses is None else losses
    spectra, examples = [], []
    for i in range(n_examples):
        ok = i not in skipped
        examples.append(
            {
                "example_index": i,
                "example_id": f"id{i}",
                "source": "synthetic.json",
                "source_line": i + 1,
                "loss": float(losses[i]) if ok else None,
                "n_prompt_tokens": 4,
                "n_response_tokens": 6,
                "truncated": False,
                "status": "ok" if ok else "skipped:empty_response",
                "response_only_loss": None,
                "ifd": None,
            }
        )
        if not ok:
            continue
        for layer in range(next(iter(values.values())).shape[1]):
            for module, matrix in values.items():
                v = float(matrix[i, layer])
                spectra.append(
                    {
                        "example_index": i,
                        "example_id": f"id{i}",
                        "param": f"model.layers.{layer}.{module}.weight",
                        "layer": layer,
                        "module": module,
                        "kind": KINDS.get(module, "other"),
                        "nuclear_norm": v,
                        "spectral_norm": v / 4,
                        "frobenius_norm": v / 2,
                        "effective_rank": 3.0,
                    }
                )
    return spectra, examples


def run_tables(values: dict[str, np.ndarray], **kwargs) -> RunTables:
    spectra, examples = rows(values, **kwargs)
    return RunTables(
        {}, pd.DataFrame(examples), pd.DataFrame(spectra, columns=spectra_schema(0).names)
    )


def make_run(name: str, labels: dict, values: dict[str, np.ndarray], **kwargs) -> Run:
    return Run(name, Path(name), labels, run_tables(values, **kwargs))


def write_run_dir(root: Path, values: dict[str, np.ndarray], **kwargs) -> Path:
    """A run directory holding these values, written through the engine's own store."""
    spectra, examples = rows(values, **kwargs)
    store = RunStore(root, {"synthetic": str(root)})
    store.open(
        {
            "model": {"path": "synthetic-model", "config_and_tokenizer_sha256": "ab" * 32},
            "data": {"paths": ["synthetic.json"], "sha256": "cd" * 32},
            "options": {"template": "plain", "modules": "all"},
            "versions": {"python": "3", "torch": "2"},
            "gradspec_version": "test",
        }
    )
    store.write_chunk(0, len(examples) - 1, spectra, examples)
    store.close()
    return root


def study_like_values(
    rng: np.random.Generator,
    n: int,
    layers: int,
    scale: float,
    wiggle: float,
    shift: float = 0.0,
    modules=tuple(KINDS),
) -> dict[str, np.ndarray]:
    """Per-module curves scale * (1 + wiggle * sin + shift * depth) with 5% example noise."""
    depth = np.arange(layers)
    base = scale * (1 + wiggle * np.sin(2.0 * depth) + shift * depth / layers)
    return {
        m: base * (1 + 0.1 * j) * np.exp(rng.normal(0, 0.05, size=(n, layers)))
        for j, m in enumerate(modules)
    }
