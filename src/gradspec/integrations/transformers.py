"""Watch training: exact per-example, per-layer gradient spectra from the Trainer's own steps.

On a profiled step the capture hooks (capture.py) read each target's input X and output
gradient G from the step's own forward and backward: no extra pass, and the gradients the
optimizer sees are untouched (the hooks only read). Each example's G is rescaled by the
loss weight of its response tokens, read back from the logits' gradient
(loss_weights.py), so its spectra are those of its own mean response loss, the quantity
``gradspec profile`` computes.

This module holds what is about the Trainer: its events, which dataset row a batch row
is, and the hooks of a profiled step. The rest is the engine's: the targets
(families.py), statistics (statistics.py), online flagging (quality.OnlineFlagger), rank
gathering (distributed.py) and the outputs, each a sink (sinks.py), the run directory
written by the store.

Use :func:`watch`::

    trainer = SFTTrainer(...)
    watch(trainer, "runs/monitor", id_column="example_id")
    trainer.train()
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from ..adapters import coverage_lines
from ..capture import SpectraCapture
from ..data import IGNORE_INDEX
from ..distributed import all_gather, current_ranks
from ..errors import GradspecError, GradspecWarning
from ..families import coverage, find_targets
from ..quality import OnlineFlagger
from ..statistics import STAT_COLUMNS, batch_statistics
from ..store import Occurrence
from .loss_weights import fused_token_weights, response_token_weights
from .sinks import SINKS, MonitorRun, MonitorSink, ProfiledStep

WeightReader = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


# ---------------------------------------------------------------- targets and examples


class TrainingExamples:
    """Which dataset row, and which example id, a batch row holds, found by its tokens
    (samplers, shuffling and DDP sharding need no cooperation). Rows with identical
    tokens share the first one's row and id."""

    def __init__(self, keys: dict[bytes, tuple[int, str]]):
        self.keys = keys

    @classmethod
    def from_dataset(cls, dataset: Any, id_column: str | None = None) -> TrainingExamples:
        """Index a tokenized dataset (an ``input_ids`` column); ids from ``id_column``, or
        the row number as text."""
        ids = dataset[id_column] if id_column else None
        keys: dict[bytes, tuple[int, str]] = {}
        for row, tokens in enumerate(dataset["input_ids"]):
            key = np.asarray(tokens, dtype=np.int64).tobytes()
            keys.setdefault(key, (row, str(ids[row]) if ids is not None else str(row)))
        return cls(keys)

    def lookup(self, tokens: torch.Tensor) -> tuple[int, str]:
        """(dataset row, example id) of one batch row's real tokens."""
        found = self.keys.get(tokens.cpu().numpy().astype(np.int64).tobytes())
        if found is None:
            raise GradspecError(
                "a training batch row matches no row of the training dataset's input_ids "
                "(does the collator truncate or change tokens?)"
            )
        return found


# ---------------------------------------------------------------- the capture


class TrainingCapture(SpectraCapture):
    """The capture's hooks, entered for profiled steps only; a layer recomputed by gradient
    checkpointing hands in its X again (the same values), which replaces the kept one."""

    def on_forward(self, index: int, x: torch.Tensor) -> bool:
        if index in self.inputs:  # recomputation: its output gradient hook already waits
            self.inputs[index] = x
            return False
        return super().on_forward(index, x)


@dataclass
class MicroBatch:
    """What a profiled micro-batch's rows are, and what its logits' gradient told."""

    rows: list[tuple[int, str]]
    labels: torch.Tensor
    token_mask: torch.Tensor
    logits: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # per example: 1 / (token weight * response tokens)
    losses: torch.Tensor | None = None  # per example: mean response-token loss


# ---------------------------------------------------------------- the callback


class GradspecCallback(TrainerCallback):
    """Exact per-example spectra on every ``every_n_steps``-th optimizer step (default:
    the Trainer's ``logging_steps``), flagged online, handed to each sink of ``sinks``
    (default: rows in the run directory ``out``, its flags file, aggregates in the
    Trainer's logs). Attach it with :func:`watch`."""

    def __init__(
        self,
        out: str | os.PathLike | None = None,
        *,
        examples: TrainingExamples,
        every_n_steps: int | None = None,
        modules: str = "all",
        spectra_dtype: torch.dtype = torch.float32,
        window: int = 256,
        min_window: int = 32,
        threshold: float = 3.0,
        sinks: tuple[type[MonitorSink], ...] = SINKS,
    ):
        self.out, self.examples, self.every_n_steps = out, examples, every_n_steps
        self.modules, self.spectra_dtype = modules, spectra_dtype
        self.flagger = OnlineFlagger(window, min_window, threshold)
        self.flagged_rows: set[int] = set()
        self.capture: TrainingCapture | None = None
        self.sink_types, self.sinks = sinks, list[MonitorSink]()
        self.micro: MicroBatch | None = None
        self.occurrences: list[Occurrence] = []  # this rank's, of the step being profiled
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.last_step: ProfiledStep | None = None  # the last profiled step, for tests

    # -- Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module, **kw: Any):
        self.every_n_steps = self.every_n_steps or _logging_interval(args, state)
        targets = find_targets(model, self.modules)
        self.capture = TrainingCapture(targets, self.spectra_dtype)
        out = None if self.out is None else Path(self.out)
        ranks, stated = current_ranks(), coverage(model, targets).as_dict()
        if ranks.is_main:
            warn_left_out(stated)
        run = MonitorRun(out, targets, self.settings(), str(args.output_dir), ranks, stated)
        opened = (sink.open(run) for sink in self.sink_types)
        self.sinks = [sink for sink in opened if sink is not None]

    def settings(self) -> dict[str, Any]:
        """How often the monitor profiles and how it flags, as the manifest records it."""
        return {
            "every_n_steps": self.every_n_steps,
            "window": self.flagger.window.maxlen,
            "min_window": self.flagger.min_window,
            "threshold": self.flagger.threshold,
        }

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module, **kw: Any):
        self.occurrences = []
        if (state.global_step + 1) % self.every_n_steps == 0:
            self._attach(model)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any):
        self._finish_micro_batch()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if not self.handles:
            return
        self._detach()
        self._finish_step(state.global_step, float(state.epoch or 0.0))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        for sink in self.sinks:
            sink.add_logs({} if logs is None else logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self._detach()
        for sink in self.sinks:
            sink.close()

    def _attach(self, model: nn.Module) -> None:
        """Hooks for one profiled step; other steps run with none (no idle cost)."""
        if self.capture is None:
            raise RuntimeError("the monitor's on_train_begin has not run")
        self.capture.setup()
        head = model.get_output_embeddings()
        self.handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            *([head.register_forward_hook(self._after_lm_head)] if head is not None else []),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def _detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.capture is not None:
            self.capture.teardown()

    # -- hooks on the model

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A forward without grad inside a profiled step has no backward to profile.
        if self.capture is None or not torch.is_grad_enabled():
            return
        self._finish_micro_batch()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if input_ids is None or labels is None:
            raise GradspecError(
                "gradspec's training monitor needs input_ids and labels in the model's inputs"
            )
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        _refuse_packed_rows(kwargs, mask)
        rows = [self.examples.lookup(ids[m]) for ids, m in zip(input_ids, mask, strict=True)]
        self.capture.start_batch(mask)
        self.micro = MicroBatch(rows, labels, mask)

    def _after_lm_head(self, module: nn.Module, inputs: tuple, logits: torch.Tensor) -> None:
        """Watch the LM head's own output: the logits the loss is computed from, also under
        mixed precision, where the model's output holds a float32 copy the loss never used."""
        self._watch_output(logits, response_token_weights)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Without an LM head call (TRL's fused head), watch the model's output."""
        log_probs = getattr(output, "log_probs", None)
        if log_probs is not None:  # TRL's fused LM head: log-probabilities of the next tokens
            self._watch_output(log_probs, fused_token_weights)
        else:
            self._watch_output(getattr(output, "logits", None), response_token_weights)

    def _watch_output(self, output: torch.Tensor | None, read: WeightReader) -> None:
        """Read the micro-batch's loss weights from ``output``'s gradient (the first
        output of a profiled forward only)."""
        micro = self.micro
        if micro is None or micro.logits is not None or not torch.is_grad_enabled():
            return
        if output is None:
            raise GradspecError("the model's output has neither logits nor log_probs")
        micro.logits = output.detach()
        output.register_hook(partial(self._on_output_grad, micro, read))

    def _on_output_grad(self, micro: MicroBatch, read: WeightReader, grad: torch.Tensor) -> None:
        weights, micro.losses, counts = read(micro.logits, grad, micro.labels)
        micro.scale = 1.0 / (weights.double() * counts)
        micro.logits = None

    # -- results

    def _finish_micro_batch(self) -> None:
        """Turn the last micro-batch's singular values into per-example statistics."""
        micro, self.micro = self.micro, None
        if micro is None:
            return
        if micro.scale is None:
            raise GradspecError(
                "a profiled step's backward never reached the logits the monitor watched: "
                "the loss must be computed from the LM head's output (or TRL's log_probs)"
            )
        results = self.capture.collect().results()
        usable = torch.isfinite(micro.scale) & (micro.scale > 0)
        for r in results:
            usable &= torch.from_numpy(r.finite)
        per_target = [
            batch_statistics(torch.from_numpy(r.values).double() * micro.scale[:, None])
            for r in results
        ]
        stats = torch.stack(per_target, dim=1).numpy()  # examples x targets x stats
        real = micro.token_mask.sum(1)
        responses = (micro.labels[:, 1:] != IGNORE_INDEX).sum(1)
        for i in usable.nonzero().flatten().tolist():
            row, example_id = micro.rows[i]
            prompt = int(real[i] - responses[i])
            tokens = [None if r.tokens is None else int(r.tokens[i]) for r in results]
            occurrence = Occurrence(
                row, example_id, float(micro.losses[i]), prompt, int(responses[i]), stats[i], tokens
            )
            self.occurrences.append(occurrence)

    def _finish_step(self, step: int, epoch: float) -> None:
        """Gather the step's examples over ranks (in rank order), flag them, hand the step
        to the sinks."""
        ranks = current_ranks()
        occurrences = [o for part in all_gather(ranks, self.occurrences) for o in part]
        self.occurrences = []
        if not occurrences:
            return
        nuclear = np.stack(
            [o.statistics[:, STAT_COLUMNS.index("nuclear_norm")] for o in occurrences]
        )
        scores = self.flagger.score(np.log(np.maximum(nuclear, 1e-300)))
        flagged = self.flagger.flagged(scores)
        self.flagged_rows.update(o.row for o, f in zip(occurrences, flagged, strict=True) if f)
        self.last_step = ProfiledStep(step, epoch, occurrences, scores, flagged)
        for sink in self.sinks:
            sink.write(self.last_step)


def warn_left_out(stated: dict[str, Any]) -> None:
    """Warn, naming them, when the monitored matrices leave decoder-layer weights out (as
    ``gradspec profile`` says on its console), so that nothing is skipped silently."""
    if stated["left_out"]:
        lines = "; ".join(coverage_lines(stated))
        warnings.warn(f"the monitor's coverage: {lines}", GradspecWarning, stacklevel=3)


def _logging_interval(args: Any, state: Any) -> int:
    """The Trainer's logging_steps as a number of steps (a float below 1 is a share)."""
    steps = args.logging_steps
    if steps < 1:
        steps = math.ceil(state.max_steps * steps)
    return max(1, int(steps))


def _refuse_packed_rows(kwargs: dict, mask: torch.Tensor) -> None:
    """One example per row: packed rows (position ids that restart) are refused."""
    positions = kwargs.get("position_ids")
    packed = any(key in kwargs for key in ("cu_seq_lens_q", "cu_seqlens", "seq_lengths"))
    if positions is not None and not packed:
        steps = positions[:, 1:] - positions[:, :-1]
        packed = bool(((steps != 1) & mask[:, 1:] & mask[:, :-1]).any())
    if packed:
        raise GradspecError(
            "gradspec's training monitor needs one example per row, but the batch packs "
            "several (position ids restart inside a row): turn packing / padding_free off"
        )


# ---------------------------------------------------------------- attaching


class SkipFlaggedSampler(torch.utils.data.Sampler):
    """The Trainer's sampler without the rows flagged so far (checked as each epoch runs)."""

    def __init__(self, sampler: torch.utils.data.Sampler, flagged: set[int]):
        self.sampler, self.flagged = sampler, flagged

    def __iter__(self) -> Iterator[int]:
        return (i for i in self.sampler if i not in self.flagged)

    def __len__(self) -> int:
        return len(self.sampler)


def watch(
    trainer: Any,
    out: str | os.PathLike | None = None,
    *,
    id_column: str | None = None,
    skip_flagged: bool = False,
    **options: Any,
) -> GradspecCallback:
    """Attach a :class:`GradspecCallback` to ``trainer`` (before ``train()``).

    Examples are recognised by their tokens in ``trainer.train_dataset`` (ids from
    ``id_column``, else the row number). The callback goes first, so the aggregates it
    adds to the logs reach every ``report_to`` integration. With ``skip_flagged``, flagged
    rows are left out of later epochs. ``options`` go to :class:`GradspecCallback`.
    """
    examples = TrainingExamples.from_dataset(trainer.train_dataset, id_column)
    callback = GradspecCallback(out, examples=examples, **options)
    trainer.callback_handler.callbacks.insert(0, callback)
    if skip_flagged:
        original = trainer._get_train_sampler

        def sampler(*args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
            return SkipFlaggedSampler(original(*args, **kwargs), callback.flagged_rows)

        trainer._get_train_sampler = sampler
    return callback
