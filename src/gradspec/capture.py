"""Hooks that turn one batched forward/backward into per-example gradient singular values.

As in Opacus and BackPACK, a forward hook keeps each target's input X, and a hook on its
output receives the output gradient G during backward. Per example, over its real tokens
only, the singular values of G^T X are computed right there and X is released, so neither
per-example nor summed weight gradients are ever built (the weights do not require grad).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .adapters import Target
from .spectra import builds_full_gradient, gradient_singular_values, token_factor


class SpectraCapture:
    """Context manager holding the hooks for a list of targets over many batches."""

    def __init__(self, model: nn.Module, targets: list[Target], spectra_dtype: torch.dtype):
        self.model = model
        self.targets = targets
        self.spectra_dtype = spectra_dtype
        self.token_rows: list[torch.Tensor] = []
        self.inputs: dict[int, torch.Tensor] = {}
        self.results: dict[tuple[int, int], torch.Tensor | None] = {}
        # QR factors of inputs read by several matrices, keyed by the input's storage; the
        # input itself is kept alive alongside so that the key cannot be reused.
        self.input_factors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> SpectraCapture:
        for index, target in enumerate(self.targets):
            hook = partial(self._keep_input, index)
            self.handles.append(target.module.register_forward_hook(hook))
        embeddings = self.model.get_input_embeddings()
        self.handles.append(embeddings.register_forward_hook(_make_output_require_grad))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.inputs.clear()

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        """Remember which positions of each example are real tokens; forget the last batch."""
        self.token_rows = [row.nonzero().squeeze(1) for row in attention_mask.bool()]
        self.inputs.clear()
        self.input_factors.clear()
        self.results = {}

    def singular_values(self, example: int, target: int) -> torch.Tensor | None:
        """Singular values for (example in batch, target); None if X or G was not finite."""
        empty = torch.zeros(0, dtype=self.spectra_dtype)
        return self.results.get((example, target), empty)

    def _keep_input(self, index: int, module: nn.Module, inputs: tuple, output: torch.Tensor
                    ) -> None:
        if not output.requires_grad:  # a forward-only pass, such as the IFD denominator
            return
        if index in self.inputs:
            raise RuntimeError(f"{self.targets[index].param} ran twice in one forward pass; "
                               "weight sharing inside a layer is not supported")
        self.inputs[index] = inputs[0].detach()
        output.register_hook(partial(self._on_output_grad, index))

    def _on_output_grad(self, index: int, grad: torch.Tensor) -> None:
        x = self.inputs.pop(index)
        batch, length = len(self.token_rows), x.shape[-2] if x.ndim == 3 else -1
        x = x.reshape(batch, length, x.shape[-1])
        grad = grad.reshape(batch, length, grad.shape[-1])
        for example, rows in enumerate(self.token_rows):
            xb = x[example, rows].to(self.spectra_dtype)
            gb = grad[example, rows].to(self.spectra_dtype)
            if not (torch.isfinite(xb).all() and torch.isfinite(gb).all()):
                self.results[(example, index)] = None
                continue
            shared = None
            if not builds_full_gradient(len(rows), gb.shape[1], xb.shape[1]):
                shared = self._input_factor(x, example, xb)
            self.results[(example, index)] = gradient_singular_values(gb, xb, shared)

    def _input_factor(self, x: torch.Tensor, example: int, xb: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), example)
        if key not in self.input_factors:
            self.input_factors[key] = (x, token_factor(xb))
        return self.input_factors[key][1]


def _make_output_require_grad(module: nn.Module, inputs: tuple, output: torch.Tensor
                              ) -> torch.Tensor:
    """With frozen weights, the embeddings' output is where the backward graph starts."""
    return output.detach().requires_grad_(True)
