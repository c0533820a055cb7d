"""The profiling engine: the chunked, resumable run loop (batches and losses: batching.py).

``profile`` encodes every example, processes it in fixed chunks (so a rerun profiles exactly
the examples no finished chunk covers), and within a chunk groups examples of similar length into
batches. The fast method takes spectra from hooks (see capture.py); the reference method is
the published algorithm: one example at a time, full weight gradients, full SVD.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import Target
from .batching import Batch, collate, per_example_losses, plan_batches, response_logits
from .capture import PendingSpectra, SpectraCapture
from .data import (
    IGNORE_INDEX,
    DataSource,
    Encoded,
    Example,
    encode_response_only,
    encode_with_options,
    load_examples,
    resolve_data,
)
from .distributed import (
    LOCAL,
    Lockstep,
    Ranks,
    agree,
    all_gather,
    barrier,
    from_main,
    process_group,
    rank_device,
    split_by_weight,
)
from .errors import GradspecError, GradspecWarning
from .families import coverage
from .files import enclosing_run
from .formats.fields import parse_fields
from .modeling import (
    Checkpoint,
    checkpoint_targets,
    context_length,
    load_checkpoint,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
    resolve_spectra_dtype,
)
from .options import Method, ProfileOptions, Shard, parse_choice
from .sharding import check_shard, shard_model
from .statistics import spectrum_statistics
from .store import (
    RunStore,
    RunTables,
    example_row,
    load_run,
    profiled_rows,
    run_fingerprint,
    run_manifest,
    run_schemas,
)
from .tuning import RouteChooser, check_route

# (member of the chunk, loss, per target its singular values or None where not finite,
# and per target the tokens its expert received, None for a matrix that sees them all)
ProfiledExample = tuple[int, float, list[np.ndarray | None], list[int | None]]
# The kinds of model pass the ranks of a sharded model keep in step (distributed.Lockstep).
SPECTRA_PASS, FORWARD_PASS = "spectra", "forward"


# ---------------------------------------------------------------- public entry point


def profile(
    model: str | os.PathLike | Checkpoint,
    data: str | os.PathLike | DataSource,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    shard: str = "none",
    progress: Callable[[int, int], None] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    split: str | None = None,
    data_config: str | None = None,
    **options: Any,
) -> RunTables | None:
    """Profile every example of ``data`` on ``model`` into ``out``.

    ``model`` is a checkpoint folder, a GGUF file, a PEFT adapter folder or a Hub model id;
    ``data`` a data file, folder or glob, or a Hub data set id. ``revision`` (of a Hub
    model; ``org/name@revision`` also works), ``trust_remote_code`` (run the code of the
    model's repository), ``split`` (default train) and ``data_config`` (of a Hub data set)
    say how to take Hub ids. Options are those of :class:`ProfileOptions`. Finished chunks
    already in ``out`` are kept, so an interrupted call can simply be repeated.
    ``progress(done, total)`` is called after each chunk and each batch. Returns the run's
    tables. ``model`` and ``data`` may be given resolved (a ``Checkpoint``, a
    ``DataSource``): they are then not looked up, converted or hashed again.

    Under ``torchrun`` (or inside a process group the caller set up) every rank calls this
    with the same arguments: the missing chunks are split across the ranks, rank 0
    returns the whole run's tables (the other ranks None: they do not read the run), and
    ``progress`` counts this rank's share. ``shard="fsdp"`` splits the model itself over
    the ranks (FSDP2) for a model that does not fit one device.
    """
    with process_group(device) as ranks:
        profile_on(
            ranks,
            model,
            data,
            out,
            device=device,
            shard=shard,
            progress=progress,
            hub=HubOptions(revision, trust_remote_code, split, data_config),
            **options,
        )
        return load_run(out) if ranks.is_main else None


@dataclass(frozen=True)
class HubOptions:
    """How to take Hub ids: the model's ``revision`` (and whether its repository's code may
    run), and the data set's ``split`` and ``config``. Ignored for local paths."""

    revision: str | None = None
    trust_remote_code: bool = False
    split: str | None = None
    data_config: str | None = None


@dataclass
class _Plan:
    """What every rank resolved before anything is written."""

    opts: ProfileOptions
    checkpoint: Checkpoint
    examples: list[Example]
    store: RunStore
    manifest: dict[str, Any]
    dtype: torch.dtype
    spectra_dtype: torch.dtype
    device: torch.device
    shard: Shard


def profile_on(
    ranks: Ranks,
    model: str | os.PathLike | Checkpoint,
    data: str | os.PathLike | DataSource,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    shard: str = "none",
    progress: Callable[[int, int], None] | None = None,
    hub: HubOptions | None = None,
    **options: Any,
) -> None:
    """:func:`profile` on the given ranks (``LOCAL``: this process alone), reading nothing
    back."""
    plan = agree(
        ranks,
        lambda: _plan(
            ranks, model, data, out, rank_device(device), shard, hub or HubOptions(), options
        ),
    )
    _refuse_different_runs(ranks, plan, out)
    try:
        _profile_planned(ranks, plan, progress)
    finally:
        plan.store.lock.release()


def _finished_as_recorded(store: RunStore, plan: _Plan) -> bool:
    """Whether the run already holds every planned example and its manifest says so."""
    old = store.check()
    recorded = old is not None and old.get("data", {}).get("n_examples") == len(plan.examples)
    return recorded and not _missing(store, plan)


def _missing(store: RunStore, plan: _Plan) -> list[tuple[int, int]]:
    """The chunks of the plan's examples that no intact finished part covers."""
    return store.missing_chunks(len(plan.examples), plan.opts.chunk_size)


def _profile_planned(
    ranks: Ranks, plan: _Plan, progress: Callable[[int, int], None] | None
) -> None:
    """Profile the chunks the run directory still lacks; rank 0 holds the run's lock from
    before it decides which chunks those are until the session is recorded."""
    opts, examples, store = plan.opts, plan.examples, plan.store
    if from_main(ranks, _finished_as_recorded(store, plan)):
        return  # a read-back: nothing to lock, write or record (a read-only run works)
    agree(ranks, lambda: store.lock_if_exists() if ranks.is_main else None)
    # Rank 0's view of the finished parts is everyone's, so all split the same chunks.
    missing = from_main(ranks, _missing(store, plan))
    done = len(examples) - sum(last - first + 1 for first, last in missing)
    # Everything that can fail is resolved on every rank before the first write: a failed
    # start leaves no trace, and an existing run stays as it was.
    mine = _my_chunks(ranks, missing, examples)
    if missing:
        net, tokenizer, targets = agree(
            ranks, lambda: _load_checked_model(ranks, plan, examples[0])
        )
        plan.manifest["coverage"] = coverage(net, targets).as_dict()
        if ranks.is_main:
            pending = [ex for first, last in missing for ex in examples[first : last + 1]]
            stated = store.fingerprint["max_length"] is not None
            warn_overlong(pending, tokenizer, opts, stated)
    # Rank 0 alone writes the manifest; the others start writing parts once it exists.
    agree(
        ranks,
        lambda: store.open(plan.manifest, ranks.size, plan.shard.value) if ranks.is_main else None,
    )

    total = done + sum(last - first + 1 for first, last in mine)
    report = progress or (lambda done, total: None)
    report(done, total)
    if missing:  # a sharded model's ranks all run passes, even those with no chunk of their own
        fast = opts.method == Method.fast
        chooser = RouteChooser(opts.route)
        capture = SpectraCapture(targets, plan.spectra_dtype, chooser) if fast else None
        in_step = ranks if plan.shard != Shard.none else LOCAL
        runner = ChunkRunner(net, tokenizer, targets, opts, plan.device, capture, in_step)
        with capture or nullcontext():
            for first, last in mine:
                chunk = examples[first : last + 1]
                spectra_rows, example_rows = runner.run(
                    chunk, functools.partial(_report_within_chunk, report, done, total)
                )
                store.write_chunk(first, last, spectra_rows, example_rows)
                done += len(chunk)
                report(done, total)
            runner.passes.finish()
    barrier(ranks)  # every rank's parts are written
    routes = capture.chooser.record() if missing and capture is not None else {}
    agree(ranks, lambda: store.close(routes=routes) if ranks.is_main else None)


def _plan(
    ranks: Ranks,
    model: str | os.PathLike | Checkpoint,
    data: str | os.PathLike | DataSource,
    out: str | os.PathLike,
    device: str,
    shard: str,
    hub: HubOptions,
    options: dict[str, Any],
) -> _Plan:
    """Check the options, model, data and run directory, without writing anything; the
    model and data are resolved here once (a GGUF file converted, the data files found
    and hashed) unless the caller resolved them."""
    opts = ProfileOptions(**options)
    sharding = parse_choice(Shard, "shard", shard)
    check_shard(sharding, ranks, opts.method)
    checkpoint = resolve_checkpoint(model, hub.revision, hub.trust_remote_code)
    data_source = resolve_data(data, hub.split, hub.data_config)
    examples = load_examples(data_source, parse_fields(opts.fields) if opts.fields else None)[
        : opts.limit
    ]
    torch_device = resolve_device(device)
    dtype = resolve_dtype(
        opts.dtype, torch_device, checkpoint.directory, checkpoint.trust_remote_code
    )
    spectra_dtype = resolve_spectra_dtype(opts.spectra_dtype, dtype)
    check_route(opts.route, torch_device, spectra_dtype)
    resolved = {
        **asdict(opts),
        "dtype": str(dtype).removeprefix("torch."),
        "spectra_dtype": str(spectra_dtype).removeprefix("torch."),
    }
    # The fingerprint keeps --max-length as given: unset means the model's context, which
    # the model's signature fixes, so runs made before that default still resume.
    signature = checkpoint.signature
    fingerprint = run_fingerprint(
        resolved, signature, data_source.sha256, adapter=checkpoint.adapter is not None
    )
    _refuse_out_inside_a_run(Path(out))
    context = context_length(checkpoint.directory, checkpoint.trust_remote_code)
    opts = replace(opts, max_length=truncation_length(opts.max_length, context))
    manifest = run_manifest(
        checkpoint,
        {**signature, "context_length": context},
        data_source,
        len(examples),
        {**resolved, "max_length": opts.max_length},
        str(torch_device),
    )
    store = RunStore(out, fingerprint, run_schemas(manifest))
    store.check()
    return _Plan(
        opts, checkpoint, examples, store, manifest, dtype, spectra_dtype, torch_device, sharding
    )


def _refuse_out_inside_a_run(out: Path) -> None:
    """A run directory may not be made inside another one, whose files gradspec owns."""
    run = enclosing_run(out.parent)
    if run is not None:
        raise GradspecError(f"--out {out} is inside the run directory {run}; choose another")


def truncation_length(max_length: int | None, context: int | None) -> int | None:
    """``--max-length``, by default the model's context; warns if it exceeds the context."""
    if max_length is not None and context is not None and max_length > context:
        warnings.warn(
            f"--max-length {max_length} exceeds the model's context of {context} tokens "
            "(config max_position_embeddings); longer examples run past what it was made for",
            GradspecWarning,
            stacklevel=2,
        )
    return max_length or context


def warn_overlong(
    examples: list[Example], tokenizer: Any, opts: ProfileOptions, stated: bool
) -> None:
    """Warn when examples are longer than ``opts.max_length`` (``stated`` by --max-length,
    else the model's context), naming the longest: they are truncated to it, and the
    examples table's truncated column says which."""
    if opts.max_length is None:
        return
    whole = replace(opts, max_length=None)
    lengths = [(len(encode_with_options(tokenizer, ex, whole).input_ids), ex) for ex in examples]
    over = [(n, ex) for n, ex in lengths if n > opts.max_length]
    if over:
        n, longest = max(over, key=lambda item: item[0])
        limit = f"--max-length {opts.max_length}" if stated else "the model's context"
        warnings.warn(
            f"{len(over)} example(s) longer than {limit} ({opts.max_length} tokens) are "
            f"truncated to it; the longest is example {longest.index} "
            f"({longest.source}:{longest.source_line}, {n} tokens)",
            GradspecWarning,
            stacklevel=2,
        )


def _refuse_different_runs(ranks: Ranks, plan: _Plan, out: str | os.PathLike) -> None:
    """Refuse, on every rank, ranks given different runs (another --out, model, data or
    option): they would share out one run's chunks among different runs."""
    if not ranks.distributed:
        return
    run = {"out": str(out), "n_examples": len(plan.examples), **plan.store.fingerprint}
    views = all_gather(ranks, run)
    for rank, view in enumerate(views):
        differ = sorted(k for k in set(view) | set(views[0]) if view.get(k) != views[0].get(k))
        if differ:
            raise GradspecError(
                f"rank {rank} was given another run than rank 0 ({', '.join(differ)} differ): "
                "start every rank with the same arguments"
            )


def _my_chunks(
    ranks: Ranks, todo: list[tuple[int, int]], examples: list[Example]
) -> list[tuple[int, int]]:
    """This rank's chunks: the split of ``todo`` balanced by the length of the chunks'
    records, which every rank measures alike without a tokenizer, so that each example
    is tokenized once in the whole run, by the rank that profiles it."""
    if not ranks.distributed:
        return todo
    weights = [
        sum(len(json.dumps(ex.record)) for ex in examples[first : last + 1]) for first, last in todo
    ]
    return [todo[i] for i in split_by_weight(weights, ranks.size)[ranks.rank]]


def _load_checked_model(
    ranks: Ranks, plan: _Plan, first_example: Example
) -> tuple[torch.nn.Module, Any, list[Target]]:
    """The model (sharded over the ranks if asked), its tokenizer and the targets
    ``--modules`` selects, after checking that the template encodes the first example (so a
    bad option fails before anything is written)."""
    opts, sharded = plan.opts, plan.shard != Shard.none
    net, tokenizer = load_checkpoint(
        plan.checkpoint,
        plan.dtype,
        torch.device("cpu") if sharded else plan.device,  # fully_shard moves each shard
        opts.adapter_matrices,
        eager_attention=opts.padding_side == "left",
    )
    targets = checkpoint_targets(net, plan.checkpoint, opts.modules, opts.adapter_matrices)
    if sharded:
        shard_model(net, plan.device, ranks, plan.shard)
    encode_with_options(tokenizer, first_example, opts)
    return net, tokenizer, targets


def _report_within_chunk(
    report: Callable[[int, int], None], done_before: int, total: int, done_in_chunk: int
) -> None:
    report(done_before + done_in_chunk, total)


# ---------------------------------------------------------------- one chunk


class ChunkRunner:
    """Turns a chunk of examples into spectra rows and example rows."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        targets: list[Target],
        opts: ProfileOptions,
        device: torch.device,
        capture: SpectraCapture | None,
        in_step: Ranks = LOCAL,
    ):
        """``capture`` holds the hooks of the fast method; None for the reference method.
        The model's passes run in step over ``in_step`` (all ranks of a sharded model)."""
        self.model, self.tokenizer, self.targets = model, tokenizer, targets
        self.opts, self.device, self.capture = opts, device, capture
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        # What a rank with no pass of the agreed kind runs: two pad tokens, one predicted.
        idle = Encoded([self.pad_id] * 2, [IGNORE_INDEX, self.pad_id], 1, False)
        self.passes = Lockstep(
            in_step,
            {SPECTRA_PASS: self._spectra_pass, FORWARD_PASS: self._forward_pass},
            collate([0], [idle], self.pad_id, opts.padding_side, device),
        )

    def run(
        self, chunk: list[Example], on_progress: Callable[[int], None]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        encoded = [encode_with_options(self.tokenizer, ex, self.opts) for ex in chunk]
        example_rows = [
            example_row(ex, enc, self.opts.fields) for ex, enc in zip(chunk, encoded, strict=True)
        ]
        spectra: dict[int, list[dict[str, Any]]] = {}
        todo = [i for i, enc in enumerate(encoded) if enc.skip_reason is None]
        finished = len(chunk) - len(todo)
        previous: Callable[[], list[ProfiledExample]] | None = None
        batches = plan_batches(
            [len(encoded[i].input_ids) for i in todo], self.opts.batch_size, self.opts.token_budget
        )
        # Each batch's spectra are collected after the next batch's pass, so the worker's
        # solves of one batch overlap with the model's passes of the next.
        passes = (self._profile([todo[m] for m in b], encoded) for b in batches)
        for collect in itertools.chain(passes, [None]):
            if previous is not None:
                done = previous()
                for member, loss, values, tokens in done:
                    statistics = self._statistics(loss, values)
                    spectra[member] = profiled_rows(
                        example_rows[member], self.targets, loss, statistics, tokens
                    )
                finished += len(done)
                on_progress(finished)
            previous = collect
        if self.opts.ifd:
            self._record_ifd(chunk, example_rows)
        rows = [row for i in sorted(spectra) for row in spectra[i]]
        return rows, example_rows

    def _profile(
        self, members: list[int], encoded: list[Encoded]
    ) -> Callable[[], list[ProfiledExample]]:
        """Run the batch's passes; return what collects (member, loss, singular values per
        target, None where not finite) for each member."""
        if self.capture is None:  # the reference method
            done = [
                (m, *reference_spectra(self.model, self.targets, encoded[m], self.device))
                for m in members
            ]
            return lambda: done
        batch = collate(members, encoded, self.pad_id, self.opts.padding_side, self.device)
        losses, pending = self.passes.run(SPECTRA_PASS, batch)

        def collect() -> list[ProfiledExample]:
            results = pending.results()
            return [
                (
                    member,
                    losses[i],
                    [r.values[i] if r.finite[i] else None for r in results],
                    [None if r.tokens is None else int(r.tokens[i]) for r in results],
                )
                for i, member in enumerate(members)
            ]

        return collect

    def _statistics(
        self, loss: float, values: list[np.ndarray | None]
    ) -> list[dict[str, Any]] | None:
        """Per target, the statistics of its singular values; None where the loss or a
        gradient was not finite."""
        if not np.isfinite(loss) or any(v is None for v in values):
            return None
        return [spectrum_statistics(torch.from_numpy(v), self.opts.top_k) for v in values]

    def _record_ifd(self, chunk: list[Example], example_rows: list[dict[str, Any]]) -> None:
        """Loss of the response alone, and IFD = conditioned loss / response-only loss."""
        alone = [
            encode_response_only(self.tokenizer, ex, self.opts.max_length, self.opts.loss_tokens)
            for ex in chunk
        ]
        todo = [
            i
            for i, row in enumerate(example_rows)
            if row["status"] == "ok" and alone[i].skip_reason is None
        ]
        for members in plan_batches(
            [len(alone[i].input_ids) for i in todo], self.opts.batch_size, self.opts.token_budget
        ):
            batch = collate(
                [todo[m] for m in members], alone, self.pad_id, self.opts.padding_side, self.device
            )
            losses = self.passes.run(FORWARD_PASS, batch)
            for member, loss in zip(batch.members, losses, strict=True):
                row = example_rows[member]
                row["response_only_loss"] = loss
                row["ifd"] = row["loss"] / loss if loss > 0 else None

    def _spectra_pass(self, batch: Batch) -> tuple[list[float], PendingSpectra]:
        """Per-example losses and the batch's spectra, still being solved (the fast method)."""
        if self.capture is None:
            raise RuntimeError("the reference method has no batched spectra pass")
        return fast_spectra(self.model, self.capture, batch), self.capture.collect()

    def _forward_pass(self, batch: Batch) -> list[float]:
        """Per-example losses from a forward pass alone."""
        with torch.no_grad():
            return per_example_losses(*response_logits(self.model, batch)).tolist()


def fast_spectra(model: torch.nn.Module, capture: SpectraCapture, batch: Batch) -> list[float]:
    """One forward and backward of the summed per-example losses; spectra land in ``capture``.

    The gradient of the sum with respect to one example's activations is that example's own
    gradient, since examples do not interact in a causal LM.
    """
    capture.start_batch(batch.token_mask)
    with torch.enable_grad():
        losses = per_example_losses(*response_logits(model, batch))
        losses.sum().backward()
    return losses.detach().cpu().tolist()


def reference_spectra(
    model: torch.nn.Module, targets: list[Target], encoded: Encoded, device: torch.device
) -> tuple[float, list[np.ndarray | None], list[int | None]]:
    """The published algorithm: per example, full weight gradients and their full SVD.

    As in arXiv:2410.23743's code, ``torch.linalg.svd`` of each gradient as stored (U and V
    included, full matrices); a values-only SVD costs up to 7x less (bench/README.md). A
    routed expert's matrix is its slice of the fused weight's gradient (its token count is
    not known to this method: None).
    """
    weights = {id(w): w for w in (t.weight() for t in targets)}.values()
    for weight in weights:
        weight.requires_grad_(True)
        weight.grad = None
    try:
        with torch.enable_grad():
            ids = torch.tensor([encoded.input_ids], device=device)
            labels = torch.tensor([encoded.labels], device=device)
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            loss.backward()
        values: list[np.ndarray | None] = []
        for target in targets:
            weight = target.weight()
            grad = target.matrix(weight.grad.to(torch.promote_types(weight.dtype, torch.float32)))
            finite = bool(torch.isfinite(grad).all())
            values.append(torch.linalg.svd(grad).S.cpu().numpy() if finite else None)
        return float(loss.detach()), values, [None] * len(targets)
    finally:
        for weight in weights:
            weight.requires_grad_(False)
            weight.grad = None
