"""Overhead of the training monitor: a profiled optimizer step against a plain one.

One Trainer run per model shape profiles every second step (``every_n_steps=2``), so
profiled and plain steps alternate side by side in the same run; each step is timed from
``on_step_begin`` to ``on_step_end`` and the medians are compared. Amortised overhead at the
default frequency (the Trainer's default ``logging_steps``, 500) is
(profiled / plain - 1) / 500. The plain steps carry no hook (the monitor attaches its
hooks for profiled steps only); a run without the monitor is timed too, a check that the
unprofiled steps cost the same (two runs, so only as good as the load on the machine
stays constant between them).

A diagnostic third run profiles with the LAPACK kernels of the spectra (the QRs of
``token_factor`` and the SVDs of ``tall_singular_values``) replaced by stand-ins of
negligible cost (wrong values, discarded): its profiled / plain ratio is the floor that
the rest of the monitor (hooks, routes' GEMMs, Grams, bookkeeping) sets, and the gap to
the real ratio is what the kernels themselves cost.

Shapes: SmolLM2-135M (the real checkpoint: MODEL_DIR, a folder or a .gguf file, by default
the demo's SmolLM2-135M-Instruct GGUF, converted once) and a random Llama of width 2048
(SmolLM2-1.7B's layer shapes, 2 layers), batches of 4 real examples of the shared data
(GSM8K with CoT), float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradspec
import gradspec.spectra
from gradspec.demo import demo_model_path
from gradspec.integrations.transformers import watch
from gradspec.modeling import resolve_checkpoint
from gradspec.shared_data import reasoning_file, shared_data_dir

DATA = shared_data_dir() / reasoning_file("gsm8k", "with_cot")
DEFAULT_LOGGING_STEPS = 500
STEPS = 8


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, spectra, optimizer)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._synchronize()
        self.times.append(time.perf_counter() - self.start)

    @staticmethod
    def _synchronize() -> None:
        """Drain the GPU's queue, so a step's time is its own (nothing on the CPU)."""
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()


def dataset(tokenizer: Any, n: int, path: Path | None = None, max_length: int = 192) -> Dataset:
    """The first n records of ``path`` (GSM8K with CoT by default), tokenized."""
    records = json.loads((path or DATA).read_text())[:n]
    rows = []
    for i, record in enumerate(records):
        input_ids, labels = gradspec.encode(tokenizer, record, max_length=max_length)
        rows.append({"input_ids": input_ids, "labels": labels, "example_id": str(i)})
    return Dataset.from_list(rows)


def timed_run(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Dataset,
    monitor: bool,
    steps: int = STEPS,
    **arguments: Any,
) -> list[float]:
    """Step times of one run; with the monitor, even steps (2, 4, ...) are profiled.
    ``arguments`` override the TrainingArguments (by default on the CPU)."""
    settings = dict(
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=DEFAULT_LOGGING_STEPS,
    )
    settings.update(arguments)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model,
            TrainingArguments(output_dir=out, **settings),
            train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        )
        if monitor:
            watch(trainer, Path(out) / "run", id_column="example_id", every_n_steps=2)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    return timer.times


@contextlib.contextmanager
def kernels_skipped() -> Iterator[None]:
    """The spectra's QRs and SVDs replaced by stand-ins of negligible cost (a slice of the
    input, its diagonal): the routes, hooks and bookkeeping still run."""
    saved = gradspec.spectra.token_factor, gradspec.spectra.tall_singular_values
    gradspec.spectra.token_factor = lambda a: a.mT[..., : a.shape[-2], :]
    gradspec.spectra.tall_singular_values = lambda m: m.diagonal(dim1=-2, dim2=-1).abs()
    try:
        yield
    finally:
        gradspec.spectra.token_factor, gradspec.spectra.tall_singular_values = saved


def profiled_and_plain(times: list[float]) -> tuple[float, float]:
    """Median step times of a run profiling every second step: steps 2, 4, ... (the first
    dropped, warm-up) and steps 3, 5, ..."""
    return statistics.median(times[1::2][1:]), statistics.median(times[2::2])


def measure(name: str, make_model: Any, tokenizer: Any, data: Dataset) -> dict[str, float]:
    without = timed_run(make_model(), tokenizer, data, monitor=False)[2:]
    profiled, plain = profiled_and_plain(timed_run(make_model(), tokenizer, data, monitor=True))
    with kernels_skipped():
        skipped = profiled_and_plain(timed_run(make_model(), tokenizer, data, monitor=True))
    baseline = statistics.median(without)
    return {
        "shape": name,
        "step without monitor (s)": baseline,
        "plain step (s)": plain,
        "profiled step (s)": profiled,
        "profiled / plain": profiled / plain,
        "profiled / plain, QR and SVD kernels skipped": skipped[0] / skipped[1],
        "amortised profiling at every 500 steps": (profiled / plain - 1) / DEFAULT_LOGGING_STEPS,
        "plain / without monitor - 1": plain / baseline - 1,
    }


def main() -> None:
    torch.manual_seed(0)
    model = sys.argv[1] if len(sys.argv) > 1 else demo_model_path()
    model_dir = resolve_checkpoint(model).directory
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = dataset(tokenizer, 4 * STEPS)
    rows = [
        measure(
            "SmolLM2-135M",
            lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            tokenizer,
            data,
        )
    ]
    wide = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    rows.append(measure("width 2048 (2 layers)", lambda: LlamaForCausalLM(wide), tokenizer, data))
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row[h] if isinstance(row[h], str) else f"{row[h]:.3g}" for h in header]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
