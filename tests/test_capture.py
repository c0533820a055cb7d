"""The spectra solves on the worker thread: same results in the same order, errors surface."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import pandas as pd
import pytest
import torch
from conftest import GSM8K_DETAILED
from transformers import AutoModelForCausalLM

import gradspec
from gradspec import capture, tuning
from gradspec.families import find_targets

DATA = GSM8K_DETAILED
OPTIONS = dict(limit=6, chunk_size=3, batch_size=2)


class InlineExecutor:
    """An executor that runs each task at once in the calling thread."""

    def __init__(self, **_: object):
        pass

    def submit(self, task: Callable[[], torch.Tensor]) -> Future:
        future: Future = Future()
        future.set_result(task())
        return future

    def shutdown(self, **_: object) -> None:
        pass


def recording_prepare(threads: set[str]) -> Callable[..., Callable[[], torch.Tensor]]:
    """tuning.prepare_spectra whose solves note the thread they run on."""
    prepare = tuning.prepare_spectra

    def wrapped(*args: object) -> Callable[[], torch.Tensor]:
        solve = prepare(*args)

        def noted() -> torch.Tensor:
            threads.add(threading.current_thread().name)
            return solve()

        return noted

    return wrapped


def test_worker_solves_give_the_inline_results_in_order(tiny_model, tmp_path, monkeypatch):
    model_dir = tiny_model("llama")
    threads: set[str] = set()
    options = {**OPTIONS, "route": "factor"}  # forced: no solve of a measurement, inline
    with monkeypatch.context() as patch:
        patch.setattr(tuning, "prepare_spectra", recording_prepare(threads))
        worker = gradspec.profile(model_dir, DATA, tmp_path / "worker", device="cpu", **options)
    with monkeypatch.context() as patch:
        patch.setattr(capture, "ThreadPoolExecutor", InlineExecutor)
        inline = gradspec.profile(model_dir, DATA, tmp_path / "inline", device="cpu", **options)
    assert {name.split("_")[0] for name in threads} == {"gradspec-solve"}
    pd.testing.assert_frame_equal(worker.spectra, inline.spectra)
    assert list(worker.spectra["example_index"].unique()) == list(range(6))


def test_a_batch_is_collected_after_the_next_batch_ran(tiny_model, tmp_path, monkeypatch):
    """Each batch's solves overlap with the next batch's forward and backward: its results
    are collected only once the next batch has run (within a chunk; a chunk's last batch
    at its end). That the results are unchanged is the test above."""
    events: list[str] = []
    start, results = capture.SpectraCapture.start_batch, capture.PendingSpectra.results

    def logged_start(self, token_mask: torch.Tensor) -> None:
        events.append("run")
        start(self, token_mask)

    def logged_results(self) -> list[capture.TargetResult]:
        events.append("collect")
        return results(self)

    with monkeypatch.context() as patch:
        patch.setattr(capture.SpectraCapture, "start_batch", logged_start)
        patch.setattr(capture.PendingSpectra, "results", logged_results)
        gradspec.profile(tiny_model("llama"), DATA, tmp_path / "run", device="cpu", **OPTIONS)
    # limit 6, chunks of 3, batches of at most 2: two chunks of two batches each
    assert events == ["run", "run", "collect", "collect"] * 2


def test_worker_failure_surfaces_and_the_run_resumes(tiny_model, tmp_path, monkeypatch):
    model_dir, out = tiny_model("llama"), tmp_path / "run"
    calls = [0]
    prepare = tuning.prepare_spectra
    options = {**OPTIONS, "route": "factor"}  # forced: each prepare is one matrix's
    # (example, matrix) pairs of the first chunk: batches, or examples of a padded batch
    per_chunk = OPTIONS["chunk_size"] * len(
        find_targets(AutoModelForCausalLM.from_pretrained(model_dir))
    )

    def failing(g: torch.Tensor, *args: object) -> Callable[[], torch.Tensor]:
        calls[0] += g.shape[0]
        if calls[0] <= per_chunk:
            return prepare(g, *args)

        def broken() -> torch.Tensor:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

        return broken

    with monkeypatch.context() as patch:
        patch.setattr(tuning, "prepare_spectra", failing)
        with pytest.raises(torch.linalg.LinAlgError, match="failed to converge"):
            gradspec.profile(model_dir, DATA, out, device="cpu", **options)
    assert len(list((out / "spectra").glob("part-*.parquet"))) == 1
    assert not any(t.name.startswith("gradspec-solve") for t in threading.enumerate())

    resumed = gradspec.profile(model_dir, DATA, out, device="cpu", **options)
    straight = gradspec.profile(model_dir, DATA, tmp_path / "straight", device="cpu", **options)
    pd.testing.assert_frame_equal(resumed.spectra, straight.spectra)
    assert len(resumed.manifest["sessions"]) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gram_route_in_the_engine_gives_the_cpu_results(tiny_model, tmp_path, monkeypatch, dtype):
    """Every matrix through the Gram route (a GPU's choice at real shapes), run on the CPU
    with padded batches, against the CPU's own routes."""
    model_dir = tiny_model("llama")
    options = {**OPTIONS, "dtype": dtype}
    cpu = gradspec.profile(
        model_dir, DATA, tmp_path / "cpu", device="cpu", route="factor", **options
    )
    gpu = gradspec.profile(
        model_dir, DATA, tmp_path / "gram", device="cpu", route="gram", **options
    )
    assert gpu.manifest["sessions"][-1]["routes"]["route"] == "gram"
    columns = ["nuclear_norm", "spectral_norm", "frobenius_norm"]
    pd.testing.assert_frame_equal(gpu.spectra[columns], cpu.spectra[columns], rtol=1e-4)
    pd.testing.assert_series_equal(
        gpu.spectra["effective_rank"], cpu.spectra["effective_rank"], rtol=1e-3
    )


def test_each_example_of_a_padded_batch_is_solved_at_its_own_length(
    tiny_model, tmp_path, monkeypatch
):
    lengths: list[int] = []
    prepare = tuning.prepare_spectra

    def recording(g: torch.Tensor, *args: object) -> Callable[[], torch.Tensor]:
        lengths.extend([g.shape[1]] * g.shape[0])
        return prepare(g, *args)

    model_dir = tiny_model("llama")
    options = dict(limit=4, batch_size=4, route="factor")  # forced: nothing timed
    with monkeypatch.context() as patch:
        patch.setattr(tuning, "prepare_spectra", recording)
        tables = gradspec.profile(model_dir, DATA, tmp_path / "run", device="cpu", **options)
    real = tables.examples["n_prompt_tokens"] + tables.examples["n_response_tokens"]
    assert real.nunique() == 4  # one batch padded to the longest
    targets = len(find_targets(AutoModelForCausalLM.from_pretrained(model_dir)))
    assert sorted(lengths) == sorted(real.tolist() * targets)


class GradientSums(capture.CaptureBase):
    """A capture of its own through the public lifecycle: per target, sum over the batch
    of G^T X (the weight's gradient), from the X and G the hooks hand in."""

    def start_batch(self, token_mask: torch.Tensor) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.sums: dict[int, torch.Tensor] = {}

    def on_forward(self, index: int, x: torch.Tensor) -> bool:
        self.inputs[index] = x
        return True

    def on_backward(self, index: int, grad: torch.Tensor) -> None:
        x = self.inputs.pop(index)
        self.sums[index] = grad.flatten(0, -2).T.double() @ x.flatten(0, -2).double()

    def collect(self) -> dict[int, torch.Tensor]:
        return self.sums


def test_a_capture_subclass_gets_each_targets_input_and_output_gradient(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), torch_dtype=torch.float64)
    targets = find_targets(model)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
    )
    sums = GradientSums(targets)
    with sums:
        sums.start_batch(torch.ones_like(ids, dtype=torch.bool))
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(not t.module._forward_hooks for t in targets)  # teardown removed the hooks
    assert sorted(sums.collect()) == list(range(len(targets)))
    for index, target in enumerate(targets):  # the weights' own gradients, from autograd
        torch.testing.assert_close(sums.collect()[index], target.module.weight.grad)
