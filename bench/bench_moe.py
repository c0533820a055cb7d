"""Benchmark of mixture-of-experts profiling against the published method on fused gradients.

Two measurements, each a ratio of two things timed in one run:

1. end to end: ``gradspec.profile`` with ``method="reference"`` (per example, the fused
   3-D weight gradients from autograd, then the published full SVD of every expert's
   gate, up and down slice) against the fast method (per-pair inputs and output gradients
   captured in one batched pass, the pairs' small solves batched) on a random Qwen3-MoE,
   checking that both give the same statistics;
2. per matrix at Qwen3-30B-A3B shapes (hidden 2048, expert width 768, 128 experts, 8 per
   token), one example of T tokens routed with a skewed random router: every expert's
   gate, up and down spectra from ``expert_capture.prepare_buckets`` against the published
   method applied to the fused gradient (G_e^T X_e of each expert, full ``torch.linalg.svd``),
   the latter timed on ``--published-experts`` experts and scaled to all of them.

Results print as Rich tables and are written as Markdown (``--markdown``), with the
machine's load, since the machine may be shared.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer
from bench_profile import DATA_FILE, Section, bench_tokenizer, machine_line, ratio, seconds
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import gradspec
from gradspec.expert_capture import buckets_of, prepare_buckets, sort_slots
from gradspec.shared_data import shared_data_dir

STATS = ["nuclear_norm", "spectral_norm", "frobenius_norm"]
KEY = ["example_index", "param", "module", "expert"]


def moe_model(directory: Path, hidden: int, layers: int, experts: int) -> Path:
    """A random Qwen3-MoE (8 of ``experts`` per token, expert width hidden / 2) and the
    benchmark tokenizer."""
    tokenizer = bench_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        num_experts=experts,
        num_experts_per_tok=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def end_to_end_section(limit: int, hidden: int, layers: int, experts: int) -> Section:
    """Reference against fast method on the same examples, with their largest difference."""
    with tempfile.TemporaryDirectory() as scratch:
        model = moe_model(Path(scratch) / "model", hidden, layers, experts)
        data = shared_data_dir() / DATA_FILE
        timings, tables = {}, {}
        for method in ("fast", "reference"):
            started = time.perf_counter()
            out = Path(scratch) / method
            tables[method] = gradspec.profile(
                model, data, out, device="cpu", limit=limit, method=method, max_length=512
            ).spectra
            timings[method] = time.perf_counter() - started
    fast, reference = (tables[m].fillna({"expert": -1}).set_index(KEY) for m in tables)
    expected = reference.loc[fast.index, STATS]
    difference = ((fast[STATS] - expected).abs() / expected.where(expected > 0)).max()
    frame = pd.DataFrame(
        [
            {
                "model": f"Qwen3-MoE {layers} layers, hidden {hidden}, {experts} experts (8/token)",
                "examples": limit,
                "reference s": seconds(timings["reference"]),
                "fast s": seconds(timings["fast"]),
                "speed-up": ratio(timings["reference"], timings["fast"]),
            }
        ]
    )
    notes = [
        f"Rows compared: {len(fast)}; largest relative difference: "
        + ", ".join(f"{stat} {value:.1e}" for stat, value in difference.items())
    ]
    return Section("End to end: reference vs fast", frame, notes)


def skewed_routing(tokens: int, experts: int, top_k: int, seed: int) -> torch.Tensor:
    """top_k distinct experts per token, drawn from a Dirichlet(0.5) popularity."""
    generator = torch.Generator().manual_seed(seed)
    popularity = torch.distributions.Dirichlet(torch.full((experts,), 0.5)).sample()
    noise = torch.rand(tokens, experts, generator=generator)
    return torch.topk(popularity.log() - (-noise.log()).log(), top_k, dim=1).indices


def matrix_section(tokens: int, published_experts: int, seed: int = 0) -> Section:
    """Every expert's gate, up and down spectra of one example at Qwen3-30B-A3B shapes."""
    hidden, width, experts, top_k = 2048, 768, 128, 8
    routing = skewed_routing(tokens, experts, top_k, seed)
    slots = sort_slots(routing, torch.ones(1, tokens, dtype=torch.bool), experts)
    buckets = buckets_of(slots)
    generator = torch.Generator().manual_seed(seed)
    rows = tokens * top_k
    x, activation = torch.randn(rows, hidden, generator=generator), torch.randn(rows, width)
    g_gate_up, g_down = torch.randn(rows, 2 * width), torch.randn(rows, hidden)
    matrices = {
        "gate": (g_gate_up[:, :width], x),
        "up": (g_gate_up[:, width:], x),
        "down": (g_down, activation),
    }
    counts = slots.counts[:, 0]
    starts = counts.cumsum(0) - counts
    measured = counts.argsort(descending=True)[:published_experts]  # the busiest experts
    table = []
    shared: dict = {}
    for name, (g, inputs) in matrices.items():
        started = time.perf_counter()
        solves = prepare_buckets(g, inputs, buckets, shared if name != "down" else {})
        fast_values = [solve() for solve in solves]
        fast = time.perf_counter() - started
        started = time.perf_counter()
        for expert in measured.tolist():
            block = slice(int(starts[expert]), int(starts[expert] + counts[expert]))
            torch.linalg.svd(g[block].T @ inputs[block])
        published = (time.perf_counter() - started) * int((counts > 0).sum()) / len(measured)
        table.append(
            {
                "matrix": f"{name} ({g.shape[1]}x{inputs.shape[1]})",
                "experts with tokens": int((counts > 0).sum()),
                "published s (scaled)": seconds(published),
                "fast s": seconds(fast),
                "speed-up": ratio(published, fast),
                "buckets": len(fast_values),
            }
        )
    notes = [
        f"One example of {tokens} tokens, 8 of 128 experts per token (Dirichlet(0.5) "
        f"popularity): {int(counts.min())}-{int(counts.max())} tokens per expert. The "
        f"published method was timed on the {published_experts} busiest experts and scaled "
        "to all experts with tokens (an overestimate of its per-expert cost: busy experts "
        "have the most tokens, though a full SVD's cost hardly depends on them)."
    ]
    return Section(f"Per matrix at Qwen3-30B-A3B shapes, T = {tokens}", pd.DataFrame(table), notes)


def main(
    limit: Annotated[int, typer.Option(help="Examples profiled end to end.")] = 4,
    hidden: Annotated[int, typer.Option(help="Hidden size of the random Qwen3-MoE.")] = 256,
    layers: Annotated[int, typer.Option(help="Decoder layers of the random Qwen3-MoE.")] = 2,
    experts: Annotated[int, typer.Option(help="Experts of the random Qwen3-MoE.")] = 32,
    tokens: Annotated[int, typer.Option(help="Tokens of the per-matrix example.")] = 512,
    published_experts: Annotated[
        int, typer.Option(help="Experts the published per-matrix method is timed on.")
    ] = 8,
    markdown: Annotated[Path | None, typer.Option(help="Write the results here.")] = None,
) -> None:
    """Run both measurements, print them, and write them as Markdown if asked."""
    torch.manual_seed(0)
    before = machine_line()
    sections = [
        end_to_end_section(limit, hidden, layers, experts),
        matrix_section(tokens, published_experts),
    ]
    for section in sections:
        section.show()
    if markdown is not None:
        header = [f"before: {before}", f"after: {machine_line()}"]
        body = "\n".join(section.markdown() for section in sections)
        lines = "".join(f"- {line}\n" for line in header)
        markdown.write_text(f"## Mixture-of-experts results\n\n{lines}\n{body}")


if __name__ == "__main__":
    typer.run(main)
