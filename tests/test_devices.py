"""Exactness on every device: the routes, the engine and a study cell on the CPU and,
where there is one, on CUDA (skipped with the reason otherwise), against float64 SVDs of
explicitly built gradients; and no memory kept from one chunk to the next. The training
monitor's device test is in test_monitor.py.

bench/gpu_check.sh runs the CUDA half (``-m cuda``) on a GPU machine.
"""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DEVICES, GSM8K, read_shared
from test_engine import assert_statistics_close, explicit_gradient_statistics
from test_spectra import explicit_statistics, ill_conditioned_inputs

import gradspec
from gradspec.routes import ROUTES, SolvePlace, usable_routes
from gradspec.statistics import STAT_COLUMNS, spectrum_statistics
from gradspec.study import load_study, run_study
from gradspec.tuning import run_route

SHAPES = [  # tokens, d_out, d_in: below and above both widths, wide, one token, and past
    (7, 40, 30),  # cuSOLVER's batched size (32) on every side
    (25, 30, 64),
    (200, 30, 64),
    (300, 64, 16),
    (1, 16, 16),
    (96, 256, 192),
]


def assert_statistics_of(values: torch.Tensor, g: torch.Tensor, x: torch.Tensor, where: str):
    """Statistics of per-example singular values against a float64 SVD of each example's
    G^T X built on the CPU, all 0 for a zero gradient (effective rank to 1e-3: float32
    noise adds tiny values)."""
    assert torch.isfinite(values).all(), where
    rows = values.reshape(-1, values.shape[-1]).cpu()
    gs, xs = g.reshape(-1, *g.shape[-2:]).cpu(), x.reshape(-1, *x.shape[-2:]).cpu()
    for row, example_g, example_x in zip(rows, gs, xs, strict=True):
        gradient = (example_g.double().T @ example_x.double()).numpy()
        expected = (
            explicit_statistics(gradient) if gradient.any() else dict.fromkeys(STAT_COLUMNS, 0.0)
        )
        stats = spectrum_statistics(row)
        for name, value in expected.items():
            tolerance = 1e-3 if name == "effective_rank" else 1e-4
            assert stats[name] == pytest.approx(value, rel=tolerance, abs=1e-12), (where, name)


def device_routes() -> list[Any]:
    """(device, route) for every route that serves float32 spectra on the device (its
    solvers and places included), CUDA's skipped as DEVICES skips them."""
    return [
        pytest.param(device.values[0], route, marks=device.marks, id=f"{device.id}-{route}")
        for device in DEVICES
        for route in usable_routes(device.values[0], torch.float32)
    ]


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize(("device", "route"), device_routes())
@pytest.mark.parametrize(("tokens", "d_out", "d_in"), SHAPES)
def test_every_route_equals_float64_svd_on_device(
    device: str, route: str, precision: torch.dtype, tokens: int, d_out: int, d_in: int
):
    """float32 gradients, and bf16 ones (as a bf16 model hands them) in float32 spectra;
    solved where the route solves (the CPU for the -cpu routes)."""
    generator = torch.Generator().manual_seed(tokens * d_out + d_in)
    g = torch.randn(2, tokens, d_out, generator=generator).to(precision)
    x = torch.randn(2, tokens, d_in, generator=generator).to(precision)
    values = run_route(g.to(device, torch.float32), x.to(device, torch.float32), route)
    solved_on = "cpu" if ROUTES[route].place == SolvePlace.CPU else device
    assert values.device.type == solved_on and values.dtype == torch.float32
    assert_statistics_of(values, g, x, f"{route} {tokens}x{d_out}x{d_in}")


def degenerate_cores() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(G, X) pairs whose per-example gradient is rank-deficient or zero."""
    generator = torch.Generator().manual_seed(11)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    last_row_only = randn(40, 48) * (torch.arange(40) == 39)[:, None]
    return {
        **ill_conditioned_inputs(),
        "one-token response": (last_row_only, randn(40, 56)),  # the layer just below the loss
        "all-zero gradient": (torch.zeros(40, 48), randn(40, 56)),
        "all-zero input": (randn(40, 48), torch.zeros(40, 56)),
        "one token, zero": (torch.zeros(1, 48), randn(1, 56)),
        "repeated token": (randn(64, 48), randn(1, 56).expand(64, 56).contiguous()),
    }


@pytest.mark.parametrize("case", list(degenerate_cores()))
@pytest.mark.parametrize(("device", "route"), device_routes())
def test_degenerate_cores_on_device(device: str, route: str, case: str):
    """Repeated tokens, one-token responses and all-zero cores: finite, exact values (a
    singular Gram's Cholesky fails and falls back to eigh, on the GPU too)."""
    g, x = degenerate_cores()[case]
    values = run_route(g.to(device), x.to(device), route)
    assert_statistics_of(values, g, x, f"{route} {case}")


# ---------------------------------------------------------------- end to end


@dataclass
class HardData:
    """Records, their file, and the max_length that cuts the last one to one response token."""

    records: list[dict]
    path: Path
    max_length: int


@pytest.fixture(scope="module")
def hard(shared_data: Path, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> HardData:
    """Three real GSM8K records (their responses cut short), one of a repeated token, and
    one whose response is cut to a single token (its last layer's gradient: rank one)."""
    one_token = {"instruction": "Say yes" + " please" * 30, "input": "", "output": "yes, ok"}
    max_length = len(tokenizer(one_token["instruction"] + "\n")["input_ids"]) + 1

    def prompt_tokens(record: dict) -> int:
        return len(tokenizer(record["instruction"] + "\n")["input_ids"])

    real = [r for r in read_shared(GSM8K, 50) if prompt_tokens(r) < max_length - 8][:3]
    repeated = {"instruction": "a a a a a a a a", "input": "", "output": " a" * 40}
    records = [*real, repeated, one_token]
    path = tmp_path_factory.mktemp("hard") / "hard.json"
    path.write_text(json.dumps(records))
    return HardData(records, path, max_length)


def profile_hard(
    hard: HardData, model_dir: Path, out: Path, device: str, **options: Any
) -> gradspec.RunTables:
    """The hard records profiled on ``device``."""
    return gradspec.profile(
        model_dir, hard.path, out, device=device, max_length=hard.max_length, **options
    )


def test_engine_on_device_equals_float64_svd(
    device: str, tiny_model: Callable[[str], Path], hard: HardData, tmp_path: Path
):
    """A float32 profile on the device, automatic batches (padding) and a truncated
    one-token response included, equals float64 SVDs of autograd's per-example gradients."""
    model = tiny_model("llama")
    tables = profile_hard(hard, model, tmp_path / "run", device, dtype="float32")
    assert tables.manifest["device"].startswith(device)
    assert (tables.examples["status"] == "ok").all()
    assert tables.examples["n_response_tokens"].iloc[-1] == 1
    expected = explicit_gradient_statistics(model, hard.records, hard.max_length)
    assert_statistics_close(tables.spectra, expected, rtol=1e-4, rank_rtol=1e-3)


def test_bf16_model_on_device(
    device: str, tiny_model: Callable[[str], Path], hard: HardData, tmp_path: Path
):
    """A bf16 model's profile (float32 spectra of bf16 gradients) is finite and within bf16
    rounding of the float64 values: norms to 5e-2 relative."""
    model = tiny_model("llama")
    tables = profile_hard(hard, model, tmp_path / "run", device, dtype="bfloat16")
    assert tables.manifest["options"]["dtype"] == "bfloat16"
    assert tables.manifest["options"]["spectra_dtype"] == "float32"
    expected = explicit_gradient_statistics(model, hard.records, hard.max_length)
    merged = expected.merge(tables.spectra, on=["example_index", "param"], suffixes=("_x", ""))
    assert len(merged) == len(expected) == len(tables.spectra)
    for stat in ("nuclear_norm", "spectral_norm", "frobenius_norm"):
        np.testing.assert_allclose(merged[stat], merged[stat + "_x"], rtol=5e-2, err_msg=stat)


def test_study_cell_on_device(
    device: str, tiny_model: Callable[[str], Path], hard: HardData, tmp_path: Path
):
    """A one-cell study run with ``device`` equals the float64 SVDs too."""
    study_file = tmp_path / "study.toml"
    study_file.write_text(f"""
title = "device"
[profile]
dtype = "float32"
max_length = {hard.max_length}
[[models]]
label = "tiny"
path = "{tiny_model("llama")}"
[[datasets]]
path = "{hard.path}"
task = "gsm8k"
style = "detailed"
correctness = "correct"
""")
    [(cell, ran)] = run_study(load_study(study_file), tmp_path / "out", device=device)
    assert ran
    tables = gradspec.load_run(tmp_path / "out" / cell.run)
    assert tables.manifest["device"].startswith(device)
    expected = explicit_gradient_statistics(tiny_model("llama"), hard.records, hard.max_length)
    assert_statistics_close(tables.spectra, expected, rtol=1e-4, rank_rtol=1e-3)


# ---------------------------------------------------------------- memory


def live_storages(device: str) -> dict[int, int]:
    """Bytes of each distinct storage (by pointer) of the live Python tensors on ``device``."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch proxies warns
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == device and obj.numel():
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return storages


def test_memory_released_between_chunks(
    device: str, tiny_model: Callable[[str], Path], hard: HardData, tmp_path: Path
):
    """Chunk after chunk, nothing of a batch (inputs, gradients, factors, solves) stays on
    the device beyond the model; on CUDA the allocator is back at its start at the end."""
    before_cuda = torch.cuda.memory_allocated() if device == "cuda" else 0
    model_storages: set[int] = set()
    at_chunk_end: dict[int, int] = {}

    def sample(done: int, total: int) -> None:
        live = live_storages(device)
        if not model_storages:  # the first report: the model is loaded, no batch has run
            model_storages.update(live)
        else:  # a chunk's last report comes after it is written
            at_chunk_end[done] = sum(n for ptr, n in live.items() if ptr not in model_storages)

    profile_hard(
        hard,
        tiny_model("llama"),
        tmp_path / "run",
        device,
        dtype="float32",
        chunk_size=2,
        batch_size=2,
        progress=sample,
    )
    # Chunks of 2, 2 and 1 examples. One batch's solved singular values (examples x
    # matrices x at most 48 floats) may stay until the next batch starts; one batch's
    # inputs alone would be over 10 times more.
    assert sorted(at_chunk_end) == [2, 4, 5]
    assert max(at_chunk_end.values()) <= 2 * 14 * 48 * 4, at_chunk_end
    if device == "cuda":
        gc.collect()
        assert torch.cuda.memory_allocated() == before_cuda
