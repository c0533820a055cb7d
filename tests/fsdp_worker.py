"""One rank of the FSDP2 check: spectra of a model sharded with ``fully_shard`` (per decoder
layer, then the root) against the same model unsharded, on this rank's own example.

Started by ``torch.distributed.run`` with gloo on CPU; exits 0 when the loss and every
singular value are equal bit for bit, 1 otherwise, so module hooks are shown to see the
rank's full activations under FSDP2.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradspec.adapters import find_targets
from gradspec.batching import collate
from gradspec.capture import SpectraCapture
from gradspec.data import encode_example, load_examples
from gradspec.engine import fast_spectra


def spectra(model: torch.nn.Module, encoded: list) -> tuple[list[float], list]:
    """Losses and per-target singular values of one batch of this rank's examples."""
    with SpectraCapture(find_targets(model, "all"), torch.float32) as capture:
        batch = collate(list(range(len(encoded))), encoded, 0, "right", torch.device("cpu"))
        losses = fast_spectra(model, capture, batch)
        return losses, [result.values for result in capture.batch_results()]


def main(model_dir: str, data: str) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(data)[2 * rank : 2 * rank + 2]  # each rank its own examples
    encoded = [encode_example(tokenizer, ex, "plain", None) for ex in examples]
    models = [AutoModelForCausalLM.from_pretrained(model_dir).eval() for _ in range(2)]
    for model in models:
        model.requires_grad_(False)
    sharded = models[1]
    for module in sharded.modules():
        if type(module).__name__ in sharded._no_split_modules:
            fully_shard(module)
    fully_shard(sharded)
    assert type(next(sharded.parameters())).__name__ == "DTensor"
    (loss_a, values_a), (loss_b, values_b) = (spectra(m, encoded) for m in models)
    same = loss_a == loss_b and all((a == b).all() for a, b in zip(values_a, values_b, strict=True))
    print(f"rank {rank}: losses {loss_a} {loss_b}, spectra equal bit for bit: {same}")
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
