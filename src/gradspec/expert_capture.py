"""Per-example spectra of every routed expert (the math: experts.py), captured in one pass.

While captured, an experts module runs :func:`routed_forward`: the computation of
transformers' eager experts forward, with the (token, choice) slots sorted by (expert,
example) so that each (expert, example) pair is one contiguous block of rows. Its inputs
and activations are kept, and hooks on the two projections' outputs receive the output
gradients. Each pair with n tokens is a small gradient G^T X; pairs are padded to the next
power of two of n (zero rows change nothing) and each length is prepared as one batch by
the routes of spectra.py, whose small solves run later on the capture's worker. A pair
without tokens has a zero gradient: it keeps its token count of 0 and is not solved.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .experts import first_projection, output_columns
from .routes import choose_route, prepare_spectra
from .spectra import InputSpectra, Solve


@dataclass
class RoutedSlots:
    """One batch's (token, choice) slots sorted by (expert, example): ``order`` lists the
    slots, ``counts`` (experts x examples) how many of each pair are real tokens, and
    ``per_expert`` each expert's slots, padding tokens included.

    The sort key is expert * (examples + 1) + example, padding tokens taking the example
    index ``examples``, so each pair and each expert's padding are contiguous blocks."""

    order: torch.Tensor
    counts: torch.Tensor
    per_expert: list[int]

    def example_of_rows(self) -> torch.Tensor:
        """The example of each sorted row (the number of examples for padding tokens)."""
        experts, examples = self.counts.shape
        padding = torch.tensor(self.per_expert) - self.counts.sum(1)
        per_pair = torch.cat([self.counts, padding.unsqueeze(1)], dim=1).reshape(-1)
        labels = torch.arange(examples + 1).repeat(experts)
        return torch.repeat_interleave(labels, per_pair)


def sort_slots(top_k_index: torch.Tensor, token_mask: torch.Tensor, experts: int) -> RoutedSlots:
    """Sort the slots of ``top_k_index`` (tokens x k) by expert and example."""
    tokens = top_k_index.shape[0]
    examples, length = token_mask.shape
    if tokens != examples * length:
        raise RuntimeError(f"the experts got {tokens} tokens for a batch of {examples}x{length}")
    example = torch.arange(tokens, device=top_k_index.device) // length
    example = example.masked_fill(~token_mask.reshape(-1).to(example.device), examples)
    key = (top_k_index * (examples + 1) + example.unsqueeze(1)).reshape(-1)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=experts * (examples + 1)).reshape(experts, -1).cpu()
    return RoutedSlots(order, counts[:, :examples], counts.sum(1).tolist())


def _project(
    experts: nn.Module, name: str, rows: torch.Tensor, per_expert: list[int]
) -> torch.Tensor:
    """Each expert's block of ``rows`` through its slice of the fused parameter ``name``."""
    weight = getattr(experts, name)
    bias = getattr(experts, f"{name}_bias") if experts.has_bias else None
    outputs, start = [], 0
    for expert, count in enumerate(per_expert):
        if not count:
            continue
        block = rows[start : start + count]
        if experts.is_transposed:
            out = block @ weight[expert]
        else:
            out = nn.functional.linear(block, weight[expert])
        outputs.append(out if bias is None else out + bias[expert])
        start += count
    return torch.cat(outputs)


def routed_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    capture: ExpertsCapture,
) -> torch.Tensor:
    """transformers' eager experts forward with the slots sorted by (expert, example);
    under autograd it keeps each slot's input and activation and hooks the gradients."""
    tokens, top_k = top_k_index.shape
    recording = torch.is_grad_enabled()
    # A forward-only pass (the IFD denominator) is no batch of the capture: one group.
    mask = capture.token_mask if recording else torch.ones(1, tokens, dtype=torch.bool)
    slots = sort_slots(top_k_index, mask, experts.down_proj.shape[0])
    token = slots.order // top_k
    x = hidden_states[token]
    if recording and not x.requires_grad:  # the first target of the pass: a leaf
        x = x.detach().requires_grad_(True)
    projected = _project(experts, first_projection(experts), x, slots.per_expert)
    gate = experts._apply_gate if experts.has_gate else experts.act_fn
    activation = gate(projected)
    out = _project(experts, "down_proj", activation, slots.per_expert)
    if recording:
        capture.keep(slots, x.detach(), activation.detach())
        projected.register_hook(capture.on_first_grad)
        out.register_hook(capture.on_down_grad)
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)
    weighted = out * top_k_weights.reshape(-1)[slots.order].unsqueeze(-1)
    result = torch.zeros_like(hidden_states)
    return result.index_add_(0, token, weighted.to(hidden_states.dtype))


@dataclass
class Bucket:
    """Pairs padded to one length: their (expert, example) and their rows' indices
    (pairs x length) into the sorted rows, one past the last row where a pair is shorter."""

    pairs: torch.Tensor
    index: torch.Tensor


def buckets_of(slots: RoutedSlots) -> list[Bucket]:
    """The pairs with tokens grouped by the next power of two of their token count."""
    padding = torch.tensor(slots.per_expert) - slots.counts.sum(1)
    per_pair = torch.cat([slots.counts, padding.unsqueeze(1)], dim=1)
    starts = (per_pair.reshape(-1).cumsum(0) - per_pair.reshape(-1)).reshape(per_pair.shape)
    pairs = slots.counts.nonzero()
    counts = slots.counts[pairs[:, 0], pairs[:, 1]]
    lengths = 2 ** torch.ceil(torch.log2(counts.double())).long()
    past_end = int(per_pair.sum())
    buckets = []
    for length in lengths.unique().tolist():
        chosen = lengths == length
        offsets = torch.arange(length)
        index = starts[pairs[chosen, 0], pairs[chosen, 1]].unsqueeze(1) + offsets
        short = offsets >= counts[chosen].unsqueeze(1)
        buckets.append(Bucket(pairs[chosen], index.masked_fill(short, past_end)))
    return buckets


def padded_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows[index] (pairs x length x d), a zero row where the index is past the end."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])[index.to(rows.device)]


@dataclass
class ExpertSpectra:
    """One batch's spectra of one experts module: per matrix, the solves of its buckets."""

    counts: torch.Tensor  # tokens per (expert, example)
    buckets: list[Bucket]
    solves: dict[str, list[Solve]]
    finite: torch.Tensor  # per example

    def values(self) -> dict[str, torch.Tensor]:
        """Per matrix, the singular values (experts x examples x k), zero for pairs without
        tokens (and for a matrix the backward never reached)."""
        return {matrix: self._matrix_values(solves) for matrix, solves in self.solves.items()}

    def _matrix_values(self, solves: list[Solve]) -> torch.Tensor:
        results = [solve() for solve in solves]
        width = max((r.shape[-1] for r in results), default=1)
        out = torch.zeros(*self.counts.shape, width, dtype=torch.float64)
        for bucket, result in zip(self.buckets, results, strict=False):
            out[bucket.pairs[:, 0], bucket.pairs[:, 1], : result.shape[-1]] = result.cpu().double()
        return out


class ExpertsCapture:
    """One experts module's per-pair inputs and output gradients, batch by batch, turned
    into the GEMMs of their spectra as the backward passes."""

    def __init__(self, experts: nn.Module, matrices: list[str], spectra_dtype: torch.dtype):
        self.experts, self.matrices, self.spectra_dtype = experts, matrices, spectra_dtype
        self.token_mask = torch.ones(0, 0, dtype=torch.bool)
        self.start_batch(self.token_mask)

    def install(self) -> None:
        """Run the experts through :func:`routed_forward` until ``remove``."""
        self.experts.forward = partial(routed_forward, self.experts, capture=self)

    def remove(self) -> None:
        """Back to the module's own forward (a second call changes nothing)."""
        self.experts.__dict__.pop("forward", None)
        self.start_batch(self.token_mask)

    def start_batch(self, token_mask: torch.Tensor) -> None:
        """Remember the batch's real tokens; forget the last batch."""
        self.token_mask = token_mask.bool()
        self.slots: RoutedSlots | None = None
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buckets: list[Bucket] = []
        self.solves: dict[str, list[Solve]] = {matrix: [] for matrix in self.matrices}
        self.finite = torch.ones(token_mask.shape[0], dtype=torch.bool)

    def keep(self, slots: RoutedSlots, x: torch.Tensor, activation: torch.Tensor) -> None:
        """Keep the sorted inputs and activations of the pass."""
        if self.slots is not None:
            raise RuntimeError("an experts module ran twice in one forward pass")
        self.slots, self.kept, self.buckets = slots, (x, activation), buckets_of(slots)

    def on_down_grad(self, grad: torch.Tensor) -> None:
        """The down matrices' GEMMs from the activations and their output gradients."""
        if "down_proj" in self.matrices:
            x, g = self._rows(self._kept()[1]), self._rows(grad)
            self.solves["down_proj"] = self._prepare(g, x, {})

    def on_first_grad(self, grad: torch.Tensor) -> None:
        """gate's and up's GEMMs (one input, its factors shared); the inputs are released."""
        x, shared = self._rows(self._kept()[0]), {}
        for matrix in (m for m in self.matrices if m != "down_proj"):
            g = self._rows(grad[:, output_columns(self.experts, matrix)])
            self.solves[matrix] = self._prepare(g, x, shared)
        self.kept = None

    def finish_batch(self) -> ExpertSpectra:
        """The batch's spectra, still to be solved."""
        counts = self.slots.counts if self.slots is not None else None
        if counts is None:  # no token went through the experts
            counts = torch.zeros(
                self.experts.down_proj.shape[0], len(self.finite), dtype=torch.long
            )
        return ExpertSpectra(counts, self.buckets, self.solves, self.finite)

    def _kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kept is None:
            raise RuntimeError("an experts module's gradient arrived without its forward")
        return self.kept

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Sorted rows in the spectra dtype; an example with a non-finite row is zeroed and
        flagged."""
        assert self.slots is not None
        values = rows.detach().to(self.spectra_dtype)
        bad_rows = ~torch.isfinite(values.sum(dim=1, dtype=torch.float64))
        if bad_rows.any():
            example = self.slots.example_of_rows().to(values.device)
            bad = example[bad_rows].unique()
            self.finite[bad[bad < len(self.finite)].cpu()] = False
            values = values.masked_fill(torch.isin(example, bad).unsqueeze(1), 0.0)
        return values

    def _prepare(
        self, g: torch.Tensor, x: torch.Tensor, shared: dict[int, InputSpectra]
    ) -> list[Solve]:
        with torch.autocast(g.device.type, enabled=False):
            return prepare_buckets(g, x, self.buckets, shared)


def prepare_buckets(
    g: torch.Tensor, x: torch.Tensor, buckets: list[Bucket], shared: dict[int, InputSpectra]
) -> list[Solve]:
    """The routes' GEMMs for each bucket of pairs of the sorted rows g (S x d_out) and
    x (S x d_in); each solve gives its bucket's singular values (pairs x k). ``shared``
    keeps x's factors per bucket for the next matrix reading the same x (gate, then up)."""
    solves = []
    for position, bucket in enumerate(buckets):
        length = bucket.index.shape[1]
        route = choose_route(length, g.shape[1], x.shape[1], g.dtype, g.device.type)
        xs = shared.setdefault(position, InputSpectra(padded_rows(x, bucket.index)))
        solves.append(prepare_spectra(padded_rows(g, bucket.index), xs, route))
    return solves
