"""Hooks that turn one batched forward/backward into per-example gradient singular values.

As in Opacus and BackPACK, a forward hook keeps each target's input X, and a hook on its
output receives the output gradient G during backward. ``CaptureBase`` owns the hooks and
their public lifecycle, as Bergson's ``HookCollectorBase`` and Kronfluence's trackers do:
``setup`` / ``teardown`` (or a with-block), ``start_batch``, ``on_forward`` (a target's X),
``on_backward`` (its G) and ``collect`` (the batch's results). A new kind of capture
subclasses it and implements those three; the hook plumbing stays here.

``SpectraCapture`` is the spectra's capture. For all examples of the batch at once, with
padding rows set to zero (zero rows add nothing to G^T X), each example's singular values
of G^T X are prepared right there (the GEMMs of the route tuning.py measured fastest, or
the forced one; routes.py) and X is released,
so neither per-example nor summed weight gradients are ever built (the weights do not
require grad). In a padded batch each example is solved at its own length (padding rows
would only enlarge the QRs and the T x T solves). The small T x T solves run where their
route says (routes.SolvePlace): by default on a worker thread (LAPACK releases the GIL),
so they overlap with the rest of the backward and, when the caller collects a batch's
``PendingSpectra`` after starting the next batch, with that batch's forward and backward;
``PendingSpectra.results`` collects them in order.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .adapters import Target
from .expert_capture import ExpertsCapture, ExpertSpectra
from .experts import ROUTER
from .routes import StartedSolves
from .spectra import InputSpectra, Solve
from .tuning import RouteChooser


@dataclass
class PreparedInput:
    """An input X as the spectra read it: its real rows (with their shared factors) and
    their finiteness."""

    source: torch.Tensor
    spectra: list[InputSpectra]  # the whole batch, or each example of a padded batch
    finite: torch.Tensor


@dataclass
class TargetResult:
    """Singular values (examples x k, zero-padded) of one target, which were finite, and
    for a routed expert the number of each example's tokens it received."""

    values: np.ndarray
    finite: np.ndarray
    tokens: np.ndarray | None = None


@dataclass
class PendingExperts:
    """One experts module's spectra of a batch, being solved; its targets by index."""

    targets: dict[int, Target]
    values: Future[dict[str, torch.Tensor]]
    spectra: ExpertSpectra

    def results(self) -> dict[int, TargetResult]:
        """Per target index, its expert's values, finiteness and token counts."""
        values, finite = self.values.result(), self.spectra.finite.numpy()
        return {
            index: TargetResult(
                values[target.module_name][target.expert].numpy(),
                finite,
                self.spectra.counts[target.expert].numpy(),
            )
            for index, target in self.targets.items()
        }


@dataclass
class PendingSpectra:
    """A finished batch's spectra, some still being solved on the worker thread."""

    examples: int
    targets: int
    solves: dict[int, tuple[StartedSolves, torch.Tensor]]
    experts: list[PendingExperts] = field(default_factory=list)

    def results(self) -> list[TargetResult]:
        """Per target, the batch's singular values on the CPU; all zero if never reached.

        Waits for the worker's solves; an error raised there is raised here.
        """
        routed = {i: r for pending in self.experts for i, r in pending.results().items()}
        results = []
        for index in range(self.targets):
            if index in routed:
                results.append(routed[index])
                continue
            if index in self.solves:
                started, finite = self.solves[index]
                values = _rows_of(started.values())
            else:
                values = torch.zeros(self.examples, 1)
                finite = torch.ones(self.examples, dtype=torch.bool)
            results.append(TargetResult(values.cpu().numpy(), finite.cpu().numpy()))
        return results


class CaptureBase:
    """Hooks on a list of targets over many batches, with a public lifecycle.

    ``setup`` registers a forward hook on each target's module and ``teardown`` removes
    them (a with-block does both). In a forward pass with grad, the hook hands the target's
    input to ``on_forward``; if that asks for it, the output's gradient reaches
    ``on_backward`` during the backward. ``collect`` returns what the batch gave.
    """

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def setup(self) -> None:
        """Register the forward hooks (a routed expert's matrix has none of its own: its
        experts module is captured as a whole, expert_capture.py)."""
        for index, target in enumerate(self.targets):
            if target.expert is None:
                hook = partial(self._forward_hook, index)
                self.handles.append(target.module.register_forward_hook(hook))

    def teardown(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> CaptureBase:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def start_batch(self, token_mask: torch.Tensor) -> None:
        """A batch starts: which positions of each example are real tokens."""

    def on_forward(self, index: int, x: torch.Tensor) -> bool:
        """Target ``index`` read input ``x`` (detached); whether its output gradient is wanted."""
        raise NotImplementedError

    def on_backward(self, index: int, grad: torch.Tensor) -> None:
        """The gradient of target ``index``'s output, during the backward."""
        raise NotImplementedError

    def collect(self) -> Any:
        """What the batch gave, once its backward has run."""
        raise NotImplementedError

    def _forward_hook(
        self, index: int, module: nn.Module, inputs: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        """Hand X to ``on_forward``; make the output a point the backward reaches (the first
        targets' outputs become its leaves, so nothing upstream of them is differentiated)."""
        if not torch.is_grad_enabled():  # a forward-only pass, such as the IFD denominator
            return None
        if not self.on_forward(index, inputs[0].detach()):
            return None
        if isinstance(output, tuple):  # a router: (logits, routing weights, experts)
            output[0].register_hook(partial(self.on_backward, index))
            return None
        if not output.requires_grad:
            output = output.requires_grad_(True)
        output.register_hook(partial(self.on_backward, index))
        return output


class SpectraCapture(CaptureBase):
    """Per-example singular values of every target's weight gradient, batch by batch."""

    def __init__(
        self,
        targets: list[Target],
        spectra_dtype: torch.dtype,
        chooser: RouteChooser | None = None,
    ):
        """``chooser`` picks each matrix's route; by default the fastest, measured."""
        super().__init__(targets)
        self.spectra_dtype = spectra_dtype
        self.chooser = chooser or RouteChooser()
        self.token_mask = torch.ones(0, 0, dtype=torch.bool)
        self.all_real = True  # whether the batch has no padding: token_mask.all(), once
        self.inputs: dict[int, torch.Tensor] = {}
        self.solves: dict[int, tuple[StartedSolves, torch.Tensor]] = {}
        self.solver: ThreadPoolExecutor | None = None
        # The last input prepared for the spectra, for the matrices that read the same
        # input (q/k/v, gate/up), whose output gradients arrive one after the other.
        self.last_input: PreparedInput | None = None
        # Routed experts: one capture per experts module, for all of its targets.
        self.routed: dict[int, tuple[ExpertsCapture, dict[int, Target]]] = {}
        for index, target in enumerate(targets):
            if target.expert is not None:
                self._routed_capture(target)[1][index] = target

    def _routed_capture(self, target: Target) -> tuple[ExpertsCapture, dict[int, Target]]:
        """The capture of the target's experts module, created for its first target."""
        key = id(target.module)
        if key not in self.routed:
            matrices = sorted({t.module_name for t in self.targets if t.module is target.module})
            self.routed[key] = (ExpertsCapture(target.module, matrices, self.spectra_dtype), {})
        return self.routed[key]

    def setup(self) -> None:
        """The hooks (and the routed experts' captures) and the solver thread."""
        super().setup()
        for target in self.targets:
            if target.module_name == ROUTER:  # its logits feed the routing inside it
                self.handles.append(target.module.register_forward_pre_hook(_input_with_grad))
        for routed, _ in self.routed.values():
            routed.install()
        self.solver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradspec-solve")

    def teardown(self) -> None:
        """Remove the hooks, forget the inputs, stop the solver thread."""
        super().teardown()
        for routed, _ in self.routed.values():
            routed.remove()
        self.inputs.clear()
        self.last_input = None
        if self.solver is not None:
            self.solver.shutdown(wait=True, cancel_futures=True)
            self.solver = None

    def start_batch(self, token_mask: torch.Tensor) -> None:
        """Remember which positions of each example are real tokens; forget the last batch."""
        self.token_mask = token_mask.bool()
        self.all_real = bool(self.token_mask.all())
        self.inputs.clear()
        self.last_input = None
        self.solves = {}
        for routed, _ in self.routed.values():
            routed.start_batch(self.token_mask)

    def collect(self) -> PendingSpectra:
        """The batch's spectra, to read (``results``) now or after starting the next batch."""
        self.last_input = None
        experts = []
        for routed, targets in self.routed.values():
            spectra = routed.finish_batch()
            if self.solver is None:
                raise RuntimeError("SpectraCapture used outside its with-block")
            experts.append(PendingExperts(targets, self.solver.submit(spectra.values), spectra))
        return PendingSpectra(self.token_mask.shape[0], len(self.targets), self.solves, experts)

    def on_forward(self, index: int, x: torch.Tensor) -> bool:
        """Keep X until the target's output gradient arrives."""
        if index in self.inputs:
            raise RuntimeError(
                f"{self.targets[index].param} ran twice in one forward pass; "
                "weight sharing inside a layer is not supported"
            )
        self.inputs[index] = x
        return True

    def on_backward(self, index: int, grad: torch.Tensor) -> None:
        """Prepare the target's spectra from its X and G and start their solves."""
        groups, finite = self.prepared_groups(index, grad)
        with torch.autocast(grad.device.type, enabled=False):
            prepared = [self._prepare(g, x) for g, x in groups]
        if self.solver is None:
            raise RuntimeError("SpectraCapture hooks ran outside its with-block")
        self.solves[index] = (StartedSolves(prepared, self.solver), finite)

    def prepared_groups(
        self, index: int, grad: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, InputSpectra]], torch.Tensor]:
        """Target ``index``'s (G, X) per group of examples of equal length, in the spectra
        dtype even when the backward runs inside an autocast region (which would cast the
        GEMMs down), and which examples were finite. Releases the kept X."""
        with torch.autocast(grad.device.type, enabled=False):
            x = self._prepared_input(self.inputs.pop(index))
            gs, g_finite = self._real_rows(grad)
            groups = list(zip(self._groups(gs), x.spectra, strict=True))
        return groups, x.finite & g_finite

    def _prepare(self, g: torch.Tensor, x: InputSpectra) -> tuple[str, Solve]:
        """The route for one group of examples of equal length (measured, tuning.py, or
        forced), and its solve after its GEMMs."""
        return self.chooser.prepare(g, x, self.spectra_dtype)

    def _prepared_input(self, x: torch.Tensor) -> PreparedInput:
        """The input's real rows, reused while the same input comes back."""
        last = self.last_input
        if last is None or not _same_view(last.source, x):
            rows, finite = self._real_rows(x)
            spectra = [InputSpectra(group) for group in self._groups(rows)]
            self.last_input = last = PreparedInput(x, spectra, finite)
        return last

    def _groups(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The batch as it is, or each example of a padded batch at its own length."""
        if self.all_real:
            return [rows]
        pairs = zip(rows, self.token_mask, strict=True)
        return [example[real].unsqueeze(0) for example, real in pairs]

    def _real_rows(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(examples x T x d) in the spectra dtype with padding and non-finite examples zeroed,
        and a per-example flag of finiteness."""
        mask = self.token_mask
        values = tensor.reshape(*mask.shape, tensor.shape[-1]).to(self.spectra_dtype)
        if not self.all_real:
            values = values.masked_fill(~mask.unsqueeze(-1), 0.0)
        # A sum is non-finite exactly when a term is (float64: no overflow), in one pass.
        finite = torch.isfinite(values.sum(dim=(1, 2), dtype=torch.float64))
        if not finite.all():
            values = values.masked_fill(~finite[:, None, None], 0.0)
        return values, finite


def _input_with_grad(module: nn.Module, inputs: tuple) -> tuple | None:
    """A router's input made a leaf that requires grad when nothing upstream does, so
    that the routing weights it computes depend on its logits in the backward."""
    if not torch.is_grad_enabled() or inputs[0].requires_grad:
        return None
    return (inputs[0].detach().requires_grad_(True), *inputs[1:])


def _rows_of(values: list[torch.Tensor]) -> torch.Tensor:
    """The solves' per-example singular values as rows, zero-padded to one width (on the
    CPU where solves ran on several devices)."""
    rows = [row for group in values for row in group]
    if len({row.device for row in rows}) > 1:
        rows = [row.cpu() for row in rows]
    return pad_sequence(rows, batch_first=True)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two live tensors show the same elements of the same memory."""
    return _view_key(a) == _view_key(b)


def _view_key(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype
