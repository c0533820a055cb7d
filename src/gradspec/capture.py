"""Hooks that turn one batched forward/backward into per-example gradient singular values.

As in Opacus and BackPACK, a forward hook keeps each target's input X, and a hook on its
output receives the output gradient G during backward. For all examples of the batch at
once, with padding rows set to zero (zero rows add nothing to G^T X), the singular values
of each example's G^T X are computed right there and X is released, so neither
per-example nor summed weight gradients are ever built (the weights do not require grad).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from .adapters import Target
from .spectra import builds_full_gradient, gradient_singular_values, token_factor


@dataclass
class TargetResult:
    """Singular values (examples x k, zero-padded) of one target, and which were finite."""

    values: np.ndarray
    finite: np.ndarray


class SpectraCapture:
    """Context manager holding the hooks for a list of targets over many batches."""

    def __init__(self, model: nn.Module, targets: list[Target], spectra_dtype: torch.dtype):
        self.model = model
        self.targets = targets
        self.spectra_dtype = spectra_dtype
        self.token_mask = torch.ones(0, 0, dtype=torch.bool)
        self.inputs: dict[int, torch.Tensor] = {}
        self.results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # QR factors of inputs read by several matrices (q/k/v, gate/up), keyed by the
        # input's storage; the input is kept alive alongside so that the key stays unique.
        self.input_factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> SpectraCapture:
        for index, target in enumerate(self.targets):
            hook = partial(self._keep_input, index)
            self.handles.append(target.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.inputs.clear()
        self.input_factors.clear()

    def start_batch(self, token_mask: torch.Tensor) -> None:
        """Remember which positions of each example are real tokens; forget the last batch."""
        self.token_mask = token_mask.bool()
        self.inputs.clear()
        self.input_factors.clear()
        self.results = {}

    def batch_results(self) -> list[TargetResult]:
        """Per target, the batch's singular values on the CPU; all zero if never reached."""
        examples = self.token_mask.shape[0]
        empty = (torch.zeros(examples, 1), torch.ones(examples, dtype=torch.bool))
        self.input_factors.clear()
        return [
            TargetResult(*(t.detach().cpu().numpy() for t in self.results.get(i, empty)))
            for i in range(len(self.targets))
        ]

    def _keep_input(
        self, index: int, module: nn.Module, inputs: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        """Keep X; make the output a point the backward reaches (the first targets' outputs
        become its leaves, so nothing upstream of them is differentiated)."""
        if not torch.is_grad_enabled():  # a forward-only pass, such as the IFD denominator
            return None
        if index in self.inputs:
            raise RuntimeError(
                f"{self.targets[index].param} ran twice in one forward pass; "
                "weight sharing inside a layer is not supported"
            )
        self.inputs[index] = inputs[0].detach()
        if not output.requires_grad:
            output = output.requires_grad_(True)
        output.register_hook(partial(self._on_output_grad, index))
        return output

    def _on_output_grad(self, index: int, grad: torch.Tensor) -> None:
        x = self.inputs.pop(index)
        xs, x_finite = self._real_rows(x)
        gs, g_finite = self._real_rows(grad)
        shared = None
        if not builds_full_gradient(xs.shape[1], gs.shape[2], xs.shape[2]):
            shared = self._input_factor(x, xs)
        self.results[index] = (gradient_singular_values(gs, xs, shared), x_finite & g_finite)

    def _real_rows(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(examples x T x d) in the spectra dtype with padding and non-finite examples zeroed,
        and a per-example flag of finiteness."""
        mask = self.token_mask
        values = tensor.reshape(*mask.shape, tensor.shape[-1]).to(self.spectra_dtype)
        values = torch.where(mask.unsqueeze(-1), values, 0.0)
        finite = torch.isfinite(values).flatten(1).all(dim=1)
        return torch.where(finite[:, None, None], values, 0.0), finite

    def _input_factor(self, x: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        key = x.data_ptr()
        if key not in self.input_factors:
            self.input_factors[key] = (x, token_factor(xs))
        return self.input_factors[key][1]
