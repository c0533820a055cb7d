"""Watch training: exact per-example, per-layer gradient spectra from the Trainer's own steps.

On a profiled step the capture hooks (capture.py) read each target's input X and output
gradient G from the step's own forward and backward: no extra pass, and the gradients the
optimizer sees are untouched (the hooks only read). Whatever the Trainer's loss
normalisation (tokens of the whole batch, ``num_items_in_batch``, gradient accumulation,
DDP's world-size factor, a loss scaler), every response token of a batch gets the same
weight w in the loss that is differentiated; w is read back from the logits' gradient
(for cross-entropy, dL/dlogits_t = w (softmax_t - onehot_t)), and each example's G is
rescaled by 1 / (w n_i) so its spectra are those of its own mean response loss, the
quantity ``gradspec profile`` computes.

Use :func:`watch`::

    trainer = SFTTrainer(...)
    watch(trainer, "runs/monitor", id_column="example_id")
    trainer.train()
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from .. import __version__
from ..adapters import Target
from ..capture import SpectraCapture
from ..data import IGNORE_INDEX
from ..errors import GradspecError
from ..families import find_targets
from ..files import RunLock, write_json_atomic, write_parquet_atomic, write_text_atomic
from ..quality import ROBUST_SCALE
from ..statistics import STAT_COLUMNS, STATISTICS
from ..store import TRAINING_RUN, run_schemas

FLAGGED_FILE = "flagged.jsonl"
# How far the per-token weights read from the logits' gradient may spread (relative): a
# loss that does not weight response tokens equally (label smoothing, a custom loss) is
# refused rather than converted wrongly.
WEIGHT_SPREAD = {torch.float64: 1e-6, torch.float32: 1e-3}
HALF_PRECISION_SPREAD = 5e-2
AGGREGATES = {
    "mean": np.mean,
    "p95": partial(np.percentile, q=95),
    "max": np.max,
}


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


def response_token_weights(
    logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: the loss weight w of its response tokens (read from the logits'
    gradient), its mean response-token loss, and its number of response tokens.

    ``logits[b, t]`` predicts ``labels[b, t + 1]``; for cross-entropy with weight w,
    grad_t = w (p_t - onehot_t), so w = <grad_t, r_t> / |r_t|^2 with r_t = p_t - onehot_t.
    """
    targets = labels[:, 1:]
    weights, losses, counts = [], [], []
    rows = zip(logits[:, :-1], grad[:, :-1], targets, strict=True)
    for row_logits, row_grad, row_targets in rows:
        valid = row_targets != IGNORE_INDEX
        z, g, y = row_logits[valid].float(), row_grad[valid].float(), row_targets[valid]
        log_p = z.log_softmax(-1)
        residual = log_p.exp()
        residual[torch.arange(len(y)), y] -= 1.0
        norm = residual.square().sum(-1)
        usable = norm > 1e-12
        token_w = (g * residual).sum(-1)[usable] / norm[usable]
        weights.append(_common_weight(token_w, grad.dtype))
        losses.append(-log_p[torch.arange(len(y)), y].mean())
        counts.append(valid.sum())
    return torch.stack(weights), torch.stack(losses), torch.stack(counts)


def fused_token_weights(
    log_probs: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`response_token_weights` for TRL's fused LM head, whose output is the
    log-probability of each next token: there, w is minus its gradient."""
    valid = labels[:, 1:] != IGNORE_INDEX
    weights, losses = [], []
    for row_lp, row_grad, row_valid in zip(log_probs.float(), grad, valid, strict=True):
        weights.append(_common_weight(-row_grad[row_valid].float(), grad.dtype))
        losses.append(-row_lp[row_valid].mean())
    return torch.stack(weights), torch.stack(losses), valid.sum(1)


def _common_weight(token_w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight shared by an example's response tokens; nan when it has none."""
    if not token_w.numel():
        return token_w.new_tensor(float("nan"))
    w = token_w.mean()
    spread = float((token_w - w).abs().max() / w.abs().clamp_min(1e-30))
    if spread > WEIGHT_SPREAD.get(dtype, HALF_PRECISION_SPREAD):
        raise GradspecError(
            "the training loss does not weight response tokens equally (relative spread "
            f"{spread:.2g}): gradspec converts only token-mean cross-entropy (no label "
            "smoothing or custom compute_loss)"
        )
    return w


# ---------------------------------------------------------------- online flagging


class OnlineFlagger:
    """Robust z-score of each example's log nuclear norms against a running window of
    recent examples (the ``flag`` score of quality.py, made online)."""

    def __init__(self, window: int, min_window: int, threshold: float):
        self.window: deque[np.ndarray] = deque(maxlen=window)
        self.min_window, self.threshold = min_window, threshold

    def score(self, log_nuclear: np.ndarray) -> np.ndarray:
        """Scores (nan until the window holds ``min_window`` examples) of examples x
        matrices, each against the window before them; then the window takes them in."""
        scores = np.full(len(log_nuclear), np.nan)
        for i, values in enumerate(log_nuclear):
            if len(self.window) >= self.min_window:
                scores[i] = _robust_z(np.stack(self.window), values)
            self.window.append(values)
        return scores

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        return np.nan_to_num(scores, nan=-np.inf) > self.threshold


def _robust_z(window: np.ndarray, values: np.ndarray) -> float:
    """Mean over matrices of (value - median) / (1.4826 MAD) against the window."""
    median = np.median(window, axis=0)
    spread = ROBUST_SCALE * np.median(np.abs(window - median), axis=0)
    usable = spread > 0
    if not usable.any():
        return float("nan")
    return float(np.mean((values[usable] - median[usable]) / spread[usable]))


# ---------------------------------------------------------------- one profiled step


@dataclass
class StepRecords:
    """The profiled examples of one step: ids, losses and per-target statistics."""

    rows: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    stats: list[np.ndarray] = field(default_factory=list)  # per example: targets x stats
    # per example: per target the tokens its routed expert received (None: not an expert)
    expert_tokens: list[list[int | None]] = field(default_factory=list)

    def extend(self, other: StepRecords) -> None:
        names = ("rows", "ids", "losses", "response_tokens", "prompt_tokens", "stats")
        for name in (*names, "expert_tokens"):
            getattr(self, name).extend(getattr(other, name))


def target_statistics(values: torch.Tensor) -> torch.Tensor:
    """examples x stats of zero-padded descending singular values (examples x k)."""
    s = values.double()
    return torch.stack([stat.compute(s) for stat in STATISTICS], dim=-1)


def gather_records(records: StepRecords) -> StepRecords:
    """Every rank's records of the step, in rank order (the same on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    parts: list[StepRecords | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    merged = StepRecords()
    for part in parts:
        merged.extend(part)
    return merged


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------- the run directory


class TrainingRun:
    """A run directory as ``gradspec profile`` writes it, one part per profiled step; each
    profiled occurrence of an example is one row (``example_index`` counts occurrences),
    with ``step``, ``epoch`` and the online ``flag_score`` columns and the dataset row in
    ``source_line``."""

    def __init__(self, root: str | os.PathLike, targets: list[Target], manifest: dict[str, Any]):
        self.root = Path(root)
        self.targets = targets
        self.examples_schema, self.spectra_schema = run_schemas(manifest)
        self.written = 0
        for folder in ("examples", "spectra"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.root)  # held until close(): one writer per run directory
        self.lock.acquire()
        write_json_atomic(self.root / "manifest.json", manifest)

    def close(self) -> None:
        """Let another writer in."""
        self.lock.release()

    def write_step(self, step: int, epoch: float, records: StepRecords, scores: np.ndarray) -> None:
        first, n = self.written, len(records.ids)
        if not n:
            return
        index = np.arange(first, first + n)
        name = f"part-{first:09d}-{first + n - 1:09d}.parquet"
        examples = {
            "example_index": index,
            "example_id": records.ids,
            "source": ["train"] * n,
            "source_line": records.rows,
            "loss": records.losses,
            "n_prompt_tokens": records.prompt_tokens,
            "n_response_tokens": records.response_tokens,
            "truncated": [False] * n,
            "status": ["ok"] * n,
            "response_only_loss": [None] * n,
            "ifd": [None] * n,
            "fields": [None] * n,  # the trainer's dataset is tokenized already
            "step": [step] * n,
            "epoch": [epoch] * n,
            "flag_score": scores,
        }
        examples_table = pa.table(examples, schema=self.examples_schema)
        spectra = self._spectra_table(index, step, records)
        write_parquet_atomic(spectra, self.root / "spectra" / name)
        write_parquet_atomic(examples_table, self.root / "examples" / name)
        self.written += n

    def _spectra_table(self, index: np.ndarray, step: int, records: StepRecords) -> pa.Table:
        n_targets = len(self.targets)
        stats = np.stack(records.stats).reshape(-1, len(STAT_COLUMNS))
        columns: dict[str, Any] = {
            "example_index": np.repeat(index, n_targets),
            "example_id": np.repeat(np.array(records.ids, dtype=object), n_targets),
            "param": [t.param for t in self.targets] * len(index),
            "layer": [t.layer for t in self.targets] * len(index),
            "module": [t.module_name for t in self.targets] * len(index),
            "kind": [t.kind for t in self.targets] * len(index),
            "expert": [t.expert for t in self.targets] * len(index),
            "expert_tokens": [n for tokens in records.expert_tokens for n in tokens],
            **{name: stats[:, i] for i, name in enumerate(STAT_COLUMNS)},
            "step": np.full(len(index) * n_targets, step, dtype=np.int64),
        }
        return pa.table(columns, schema=self.spectra_schema)

    def append_flags(self, lines: list[dict[str, Any]]) -> None:
        """Add lines to the flagged file (rewritten whole, atomically: flags are few)."""
        path = self.root / FLAGGED_FILE
        before = path.read_text(encoding="utf-8") if path.exists() else ""
        write_text_atomic(path, before + "".join(json.dumps(line) + "\n" for line in lines))


# ---------------------------------------------------------------- the callback


class GradspecCallback(TrainerCallback):
    """Exact per-example spectra on every ``every_n_steps``-th optimizer step (default:
    the Trainer's ``logging_steps``), aggregates in the Trainer's logs, rows in ``out``,
    and online flags. Attach it with :func:`watch`."""

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
    ):
        self.out, self.examples, self.every_n_steps = out, examples, every_n_steps
        self.modules, self.spectra_dtype = modules, spectra_dtype
        self.flagger = OnlineFlagger(window, min_window, threshold)
        self.flagged_rows: set[int] = set()
        self.capture: TrainingCapture | None = None
        self.run: TrainingRun | None = None
        self.micro: MicroBatch | None = None
        self.step_records = StepRecords()
        self.pending_logs: dict[str, float] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.last_step: dict[str, Any] = {}  # the last profiled step's records, for tests

    # -- Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module, **kw: Any):
        self.every_n_steps = self.every_n_steps or _logging_interval(args, state)
        targets = find_targets(model, self.modules)
        self.capture = TrainingCapture(targets, self.spectra_dtype)
        if self.out is not None and is_main_process():
            self.run = TrainingRun(self.out, targets, _manifest(args, targets, self.settings()))

    def settings(self) -> dict[str, Any]:
        """How often the monitor profiles and how it flags, as the manifest records it."""
        return {
            "every_n_steps": self.every_n_steps,
            "window": self.flagger.window.maxlen,
            "min_window": self.flagger.min_window,
            "threshold": self.flagger.threshold,
        }

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module, **kw: Any):
        self.step_records = StepRecords()
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
        if logs is not None:
            logs.update(self.pending_logs)
        self.pending_logs = {}

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self._detach()
        if self.run is not None:
            self.run.close()

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

    def _watch_output(self, output: torch.Tensor | None, read: Any) -> None:
        """Read the micro-batch's loss weights from ``output``'s gradient (the first
        output of a profiled forward only)."""
        micro = self.micro
        if micro is None or micro.logits is not None or not torch.is_grad_enabled():
            return
        if output is None:
            raise GradspecError("the model's output has neither logits nor log_probs")
        micro.logits = output.detach()
        output.register_hook(partial(self._on_output_grad, micro, read))

    def _on_output_grad(self, micro: MicroBatch, read: Any, grad: torch.Tensor) -> None:
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
            target_statistics(torch.from_numpy(r.values).double() * micro.scale[:, None])
            for r in results
        ]
        stats = torch.stack(per_target, dim=1).numpy()  # examples x targets x stats
        real = micro.token_mask.sum(1)
        responses = (micro.labels[:, 1:] != IGNORE_INDEX).sum(1)
        for i in usable.nonzero().flatten().tolist():
            row, example_id = micro.rows[i]
            self.step_records.rows.append(row)
            self.step_records.ids.append(example_id)
            self.step_records.losses.append(float(micro.losses[i]))
            self.step_records.response_tokens.append(int(responses[i]))
            self.step_records.prompt_tokens.append(int(real[i] - responses[i]))
            self.step_records.stats.append(stats[i])
            self.step_records.expert_tokens.append(
                [None if r.tokens is None else int(r.tokens[i]) for r in results]
            )

    def _finish_step(self, step: int, epoch: float) -> None:
        """Gather the step's examples over ranks, flag them, log aggregates, write rows."""
        records = gather_records(self.step_records)
        self.step_records = StepRecords()
        if not records.ids:
            return
        stats = np.stack(records.stats)  # examples x targets x stats
        nuclear = stats[:, :, STAT_COLUMNS.index("nuclear_norm")]
        scores = self.flagger.score(np.log(np.maximum(nuclear, 1e-300)))
        flagged = self.flagger.flagged(scores)
        self.flagged_rows.update(r for r, f in zip(records.rows, flagged, strict=True) if f)
        self.pending_logs = self._aggregates(stats, scores, flagged)
        self.last_step = {"step": step, "records": records, "scores": scores, "flagged": flagged}
        if self.run is not None:
            self.run.write_step(step, epoch, records, scores)
            self.run.append_flags(_flag_lines(step, epoch, records, scores, flagged))

    def _aggregates(
        self, stats: np.ndarray, scores: np.ndarray, flagged: np.ndarray
    ) -> dict[str, float]:
        """``gradspec/<kind>/<stat>_{mean,p95,max}`` over the step's (example, matrix)
        values of each kind, and the share of scored examples flagged."""
        kinds = np.array([t.kind for t in self.capture.targets])
        logs = {}
        for kind in sorted(set(kinds)):
            values = stats[:, kinds == kind, :].reshape(-1, len(STAT_COLUMNS))
            for i, name in enumerate(STAT_COLUMNS):
                for agg, fn in AGGREGATES.items():
                    logs[f"gradspec/{kind}/{name}_{agg}"] = float(fn(values[:, i]))
        scored = np.isfinite(scores)
        logs["gradspec/flagged_frac"] = float(flagged[scored].mean()) if scored.any() else 0.0
        return logs


def _flag_lines(
    step: int, epoch: float, records: StepRecords, scores: np.ndarray, flagged: np.ndarray
) -> list[dict[str, Any]]:
    return [
        {
            "step": step,
            "epoch": epoch,
            "example_id": records.ids[i],
            "row": records.rows[i],
            "score": float(scores[i]),
            "loss": records.losses[i],
        }
        for i in np.flatnonzero(flagged)
    ]


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


def _manifest(args: Any, targets: list[Target], monitor: dict[str, Any]) -> dict[str, Any]:
    return {
        "gradspec_version": __version__,
        "kind": TRAINING_RUN,
        "monitor": monitor,
        "model": {"path": str(args.output_dir)},
        "data": {},
        "options": {"top_k": 0, "modules": [t.param for t in targets]},
        "versions": {"torch": torch.__version__},
    }


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
