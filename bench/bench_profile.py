"""Benchmark of the profiling engine: the fast method against the published reference algorithm.

Three measurements on ``gsm8k_with_cot_gpt4o.json`` of the shared data, each taken as a ratio
of two things timed side by side in one run (repetitions interleaved A B A B, medians), since
the machine is shared and absolute times drift:

1. end to end: ``gradspec profile --method reference`` against ``--method fast``, whole
   process against whole process, on a random Llama of width 2048, checking that both runs
   give the same statistics;
2. per matrix at Llama-3.1-8B shapes, with the data's real token counts: the full float32
   gradient G^T X and its published full SVD (and, as a stronger baseline, its svdvals)
   against ``gradspec.routes.gradient_singular_values``;
3. overhead: the fast path on one batch, statistics included, against a plain forward and
   backward (with weight gradients) of the same batch.

Results print as Rich tables and are written as Markdown (``--markdown``) for bench/README.md.
Models and the tokenizer are cached under ``<project>/.cache/bench/``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from vocab import train_tokenizer

from gradspec import load_run
from gradspec.batching import (
    Batch,
    collate,
    per_example_losses,
    plan_batches,
    response_logits,
)
from gradspec.capture import PendingSpectra, SpectraCapture, TargetResult
from gradspec.data import Example, encode_example, load_examples
from gradspec.engine import ChunkRunner
from gradspec.families import find_targets
from gradspec.modeling import (
    load_model_and_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_spectra_dtype,
)
from gradspec.options import ProfileOptions
from gradspec.paths import build_atomically, cache_root
from gradspec.routes import (
    builds_full_gradient,
    choose_route,
    gradient_singular_values,
    prepare_spectra,
)
from gradspec.shared_data import (
    REASONING_TASKS,
    STYLE_SUFFIXES,
    WIKI_SETS,
    reasoning_file,
    shared_data_dir,
    wiki_file,
)
from gradspec.spectra import InputGram, InputSpectra, gram_singular_values, output_gram

BENCH = Path(__file__).resolve().parent
DATA_FILE = reasoning_file("gsm8k", "with_cot_gpt4o")
VOCAB_SIZE = 8192  # on this data as fine as Llama-3's tokenizer (see README)
HEAD_DIM = 128
COMPARED = ("nuclear_norm", "spectral_norm", "frobenius_norm")
TOLERANCE = 1e-3  # max relative difference allowed between fast and reference statistics
# (name, d_out, d_in) of the weight gradients of one Llama-3.1-8B decoder layer.
LLAMA_8B_SHAPES = (
    ("q_proj, o_proj", 4096, 4096),
    ("k_proj, v_proj", 1024, 4096),
    ("gate_proj, up_proj", 14336, 4096),
    ("down_proj", 4096, 14336),
)

console = Console(width=160)  # wide tables stay whole in logs


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures; ``--quick`` shrinks every size."""

    width: int = 2048
    layers: int = 2
    limit: int = 8
    e2e_repeats: int = 2
    repeats: int = 3
    batch_sizes: tuple[int, ...] = (1, 4)
    matrix_scale: int = 1  # divides the 8B shapes
    extra_tokens: tuple[int, ...] = (1024,)
    parts: tuple[str, ...] = ("e2e", "matrix", "overhead")
    model: Path | None = None  # a real checkpoint (or, when absent, SmolLM2's config)
    device: str = "cpu"  # for the phases part
    auto_examples: int = 8  # examples of the automatic-batch overhead row

    @property
    def shapes(self) -> list[tuple[str, int, int]]:
        """The per-matrix shapes, (name, d_out, d_in)."""
        s = self.matrix_scale
        return [(name, d_out // s, d_in // s) for name, d_out, d_in in LLAMA_8B_SHAPES]


QUICK = Settings(
    width=256,
    layers=2,
    limit=2,
    e2e_repeats=1,
    repeats=1,
    batch_sizes=(1, 2),
    matrix_scale=8,
    extra_tokens=(),
    auto_examples=4,
)
# SmolLM2-135M-Instruct's shapes, for --model when the checkpoint is absent.
SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


@dataclass
class Section:
    """One results table, shown with Rich and written as Markdown."""

    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def show(self) -> None:
        """Print the table and its notes to the console."""
        table = Table(*self.frame.columns, title=self.title, title_justify="left")
        for row in self.frame.itertuples(index=False):
            table.add_row(*(str(v) for v in row))
        console.print(table)
        for note in self.notes:
            console.print(f"  {note}", style="dim", highlight=False)

    def markdown(self) -> str:
        """The table and its notes as a Markdown subsection."""
        notes = "".join(f"\n{note}\n" for note in self.notes)
        return f"### {self.title}\n\n{self.frame.to_markdown(index=False)}\n{notes}"


def seconds(value: float) -> str:
    """Seconds to three significant digits."""
    return f"{value:.3g}"


def median_seconds(values: list[float]) -> str:
    """The median of timings, as :func:`seconds` prints it."""
    return seconds(statistics.median(values))


def ratio(numerator: float, denominator: float) -> str:
    """A speed ratio such as 4.3x or 146x."""
    value = numerator / denominator
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


# ---------------------------------------------------------------- tokenizer, data, model


def bench_cache() -> Path:
    path = cache_root() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the correct reasoning and Wikipedia files (cached)."""

    def build(staging: Path) -> None:
        data = shared_data_dir()
        files = [reasoning_file(t, s) for t in REASONING_TASKS for s in STYLE_SUFFIXES]
        files += [wiki_file(name) for name in WIKI_SETS]
        examples = [ex for name in files for ex in load_examples(data / name)]
        train_tokenizer(example_texts(examples), VOCAB_SIZE).save_pretrained(staging)

    directory = build_atomically(
        bench_cache() / f"tokenizer-v{VOCAB_SIZE}", has_file("tokenizer.json"), build
    )
    return AutoTokenizer.from_pretrained(directory)


def example_texts(examples: list[Example]) -> Iterator[str]:
    """The text fields of the examples (instruction, input, response), to train a tokenizer."""
    for example in examples:
        yield example.record.get("instruction", "")
        yield example.record.get("input") or ""
        yield example.response


def has_file(name: str) -> Callable[[Path], bool]:
    """Whether a cached folder is complete: it holds ``name``."""
    return lambda directory: (directory / name).is_file()


def bench_config(
    width: int, layers: int, tokenizer: PreTrainedTokenizerFast, intermediate: int | None = None
) -> LlamaConfig:
    """Llama with heads of 128, 4 query heads per KV head, by default TinyLlama's MLP ratio
    (11/4)."""
    heads = max(1, width // HEAD_DIM)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=intermediate or width * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def bench_model(config: LlamaConfig, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Directory of a seeded random Llama with ``config`` and the tokenizer (cached)."""
    name = (
        f"llama-w{config.hidden_size}-i{config.intermediate_size}-L"
        f"{config.num_hidden_layers}-h{config.num_attention_heads}"
        f"-kv{config.num_key_value_heads}-v{config.vocab_size}"
    )

    def build(staging: Path) -> None:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return build_atomically(bench_cache() / name, has_file("config.json"), build)


def subject_model(path: Path, tokenizer: PreTrainedTokenizerFast) -> tuple[Path, str]:
    """The real checkpoint with its chat template, or where it is absent a random Llama
    with SmolLM2-135M's shapes and the bench tokenizer (plain template)."""
    if (path / "config.json").is_file():
        return path, "chat"
    console.print(f"{path} not found: a random model with SmolLM2-135M's config", style="dim")
    config = bench_config(576, 30, tokenizer)
    for key, value in SMOLLM2.items():
        setattr(config, key, value)
    return bench_model(config, tokenizer), "plain"


def token_count_section(lengths: list[int], limit: int) -> Section:
    frame = pd.DataFrame(
        [
            {
                "examples": f"all {len(lengths)}",
                "median": statistics.median(lengths),
                "min": min(lengths),
                "max": max(lengths),
            },
            {
                "examples": f"first {limit} (end to end)",
                "median": statistics.median(lengths[:limit]),
                "min": min(lengths[:limit]),
                "max": max(lengths[:limit]),
            },
        ]
    )
    notes = [
        f"Tokens per example (plain template, BOS and EOS included) of {DATA_FILE} "
        f"under the bench tokenizer (byte-level BPE, {VOCAB_SIZE} tokens, trained on "
        "the 16 correct/ files of the shared data). First "
        f"{limit}: {lengths[:limit]}."
    ]
    return Section("Token counts", frame, notes)


# ---------------------------------------------------------------- end to end


def run_profile_process(
    model_dir: Path, data: Path, out: Path, method: str, limit: int, template: str
) -> float:
    """Wall time of a whole ``python -m gradspec profile`` process."""
    command = [
        sys.executable,
        "-m",
        "gradspec",
        "profile",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--limit",
        str(limit),
        "--method",
        method,
        "--device",
        "cpu",
        "--template",
        template,
    ]
    started = time.perf_counter()
    threads = str(torch.get_num_threads())  # as in this process
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"`{' '.join(command)}` failed:\n{done.stderr[-3000:]}")
    return elapsed


def max_relative_differences(
    reference: pd.DataFrame, fast: pd.DataFrame, keys: list[str], columns: tuple[str, ...]
) -> dict[str, float]:
    """Largest |fast - reference| / |reference| per column over rows matched on ``keys``."""
    merged = reference.merge(fast, on=keys, suffixes=("_ref", "_fast"), validate="one_to_one")
    if not len(merged) == len(reference) == len(fast):
        raise SystemExit(
            f"the runs have different rows: {len(reference)} reference, "
            f"{len(fast)} fast, {len(merged)} matched"
        )
    return {
        c: float(
            ((merged[f"{c}_fast"] - merged[f"{c}_ref"]).abs() / merged[f"{c}_ref"].abs()).max()
        )
        for c in columns
    }


def end_to_end_section(
    model_dir: Path, data: Path, template: str, settings: Settings
) -> tuple[Section, bool]:
    """Reference and fast whole processes, interleaved; and whether their statistics agree."""
    times: dict[str, list[float]] = {"reference": [], "fast": []}
    with tempfile.TemporaryDirectory(prefix="gradspec-bench-") as tmp:
        for repeat in range(settings.e2e_repeats):
            for method in times:
                console.print(f"end to end: {method} run {repeat + 1}", style="dim")
                out = Path(tmp) / f"{method}-{repeat}"
                times[method].append(
                    run_profile_process(model_dir, data, out, method, settings.limit, template)
                )
        runs = {method: load_run(Path(tmp) / f"{method}-0") for method in times}
    spectra = max_relative_differences(
        runs["reference"].spectra,
        runs["fast"].spectra,
        ["example_index", "param"],
        (*COMPARED, "effective_rank"),
    )
    losses = max_relative_differences(
        runs["reference"].examples, runs["fast"].examples, ["example_index"], ("loss",)
    )
    frame = pd.DataFrame(
        [
            {
                "examples": settings.limit,
                "matrices": runs["fast"].spectra["param"].nunique(),
                "reference s": median_seconds(times["reference"]),
                "fast s": median_seconds(times["fast"]),
                "ratio": ratio(
                    statistics.median(times["reference"]), statistics.median(times["fast"])
                ),
                **{
                    f"max rel diff {c.removesuffix('_norm')}": f"{spectra[c]:.1e}" for c in COMPARED
                },
                "max rel diff loss": f"{losses['loss']:.1e}",
            }
        ]
    )
    agree = max(spectra[c] for c in COMPARED) <= TOLERANCE and losses["loss"] <= TOLERANCE
    notes = [
        f"Model {model_dir.name}. Whole `python -m gradspec profile --limit "
        f"{settings.limit} --device cpu --template {template}` "
        "processes (start-up and model load included), fresh run directories, "
        f"median of {settings.e2e_repeats} interleaved run(s) each.",
        f"Statistics {'agree' if agree else 'DISAGREE'} (tolerance {TOLERANCE:g}); "
        f"effective rank, informative only: max rel diff {spectra['effective_rank']:.1e} "
        "(the float32 reference's noise floor adds singular values above s1 * 1e-7).",
    ]
    return Section("End to end: reference vs fast", frame, notes), agree


# ---------------------------------------------------------------- per matrix


def timed(compute: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Seconds taken by ``compute()`` and its result."""
    started = time.perf_counter()
    result = compute()
    return time.perf_counter() - started, result


def published_matrix(g: torch.Tensor, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The published route, as ``--method reference``: float32 G^T X as stored (d_out x d_in),
    then ``torch.linalg.svd`` (U and V included, full matrices)."""
    return timed(lambda: torch.linalg.svd(g.T @ x).S)


def values_only_matrix(g: torch.Tensor, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """A stronger baseline than the published one: G^T X, then ``svdvals`` on whichever of
    it and its transpose is tall (same values; LAPACK is fastest there)."""

    def compute() -> torch.Tensor:
        grad = g.T @ x
        return torch.linalg.svdvals(grad.T if grad.shape[0] < grad.shape[1] else grad)

    return timed(compute)


def fast_matrix(
    g: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, repeats: int
) -> tuple[list[float], torch.Tensor]:
    """Seconds of each repetition and the values of ``gradient_singular_values`` in dtype."""
    g, x = g.to(dtype), x.to(dtype)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        values = gradient_singular_values(g, x)
        times.append(time.perf_counter() - started)
    return times, values


def random_factors(
    tokens: int, d_out: int, d_in: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random output gradients G (T x d_out) and inputs X (T x d_in), float32."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tokens, d_out, generator=generator),
        torch.randn(tokens, d_in, generator=generator),
    )


def matrix_section(
    token_counts: list[int], settings: Settings
) -> tuple[Section, dict[tuple[str, int], float]]:
    """Both full-gradient routes once and fast several times per (shape, T); ratios and
    agreement. Also returns the published route's seconds per (matrix name, T)."""
    published_matrix(*random_factors(64, 256, 128, seed=0))  # load LAPACK before timing
    rows = []
    published: dict[tuple[str, int], float] = {}
    for tokens in token_counts:
        for index, (name, d_out, d_in) in enumerate(settings.shapes):
            console.print(f"per matrix: {name} {d_out}x{d_in}, T={tokens}", style="dim")
            g, x = random_factors(tokens, d_out, d_in, seed=index)
            published_s, published_values = published_matrix(g, x)
            published[name, tokens] = published_s
            values_only_s, _ = values_only_matrix(g, x)
            f64_times, f64_values = fast_matrix(g, x, torch.float64, settings.repeats)
            f32_times, _ = fast_matrix(g, x, torch.float32, settings.repeats)
            fast_f32, fast_f64 = statistics.median(f32_times), statistics.median(f64_times)
            rank = len(f64_values)
            error = (f64_values - published_values[:rank].double()).abs().max() / published_values[
                0
            ]
            route = "full" if builds_full_gradient(tokens, d_out, d_in) else "factor"
            rows.append(
                {
                    "matrix": name,
                    "d_out x d_in": f"{d_out}x{d_in}",
                    "T": tokens,
                    "route": route,
                    "published s": seconds(published_s),
                    "svdvals s": seconds(values_only_s),
                    "fast f32 s": seconds(fast_f32),
                    "fast f64 s": seconds(fast_f64),
                    "f32 vs published": ratio(published_s, fast_f32),
                    "f32 vs svdvals": ratio(values_only_s, fast_f32),
                    "f64 vs published": ratio(published_s, fast_f64),
                    "max abs diff / s1": f"{float(error):.1e}",
                }
            )
    notes = [
        "Published: float32 G^T X as stored, then torch.linalg.svd (U, V, full "
        "matrices), as arXiv:2410.23743's code and `--method reference` do; run once. "
        "svdvals: G^T X, then torch.linalg.svdvals on its tall orientation, a values-only "
        "baseline stronger than the published one; run once. "
        f"Fast: gradient_singular_values(G, X), median of {settings.repeats}; route "
        "'factor' = T x T core from two QRs, 'full' = G^T X built (where that "
        "costs fewer flops). Random Gaussian G and X. Last column: fast float64 vs "
        "published singular values, relative to the largest."
    ]
    return Section("Per matrix at Llama-3.1-8B shapes", pd.DataFrame(rows), notes), published


def layer_section(
    tokenizer: PreTrainedTokenizerFast,
    examples: list[Example],
    lengths: list[int],
    tokens: list[int],
    published: dict[tuple[str, int], float],
    settings: Settings,
) -> Section:
    """One decoder layer of Llama-3.1-8B's shapes through the engine (q/k/v and gate/up
    sharing their input's QR) against the published route's seven per-matrix times."""
    scale = settings.matrix_scale
    config = bench_config(4096 // scale, 1, tokenizer, intermediate=14336 // scale)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    cpu = torch.device("cpu")
    targets = find_targets(model)
    capture = TimedCapture(targets, resolve_spectra_dtype("auto", torch.float32))
    runner = ChunkRunner(model, tokenizer, targets, ProfileOptions(batch_size=1), cpu, capture)
    timer = ForwardTimer(model)
    rows = []
    for count in tokens:
        example = examples[min(range(len(lengths)), key=lambda i: abs(lengths[i] - count))]
        console.print(f"one 8B layer through the engine: T={count}", style="dim")
        fast_step(runner, capture, [example], timer)  # warm-up
        spectra = statistics.median(
            fast_step(runner, capture, [example], timer)["spectra"] for _ in range(settings.repeats)
        )
        reference = sum(
            published[name, count] * len(name.split(", ")) for name, _, _ in settings.shapes
        )
        rows.append(
            {
                "d_model / d_ff": f"{config.hidden_size} / {config.intermediate_size}",
                "T": count,
                "published, 7 matrices s": seconds(reference),
                "fast, in the hooks s": seconds(spectra),
                "ratio": ratio(reference, spectra),
            }
        )
    notes = [
        "A one-layer random Llama with Llama-3.1-8B's layer shapes "
        f"({config.num_attention_heads} heads, {config.num_key_value_heads} KV heads) "
        "profiles one example of the data with T tokens; 'fast' is the "
        "time spent in the engine's backward hooks (all seven matrices, q/k/v and "
        f"gate/up sharing one QR of their input), median of {settings.repeats}. "
        "'published' adds up the per-matrix table's published times of q, k, v, o, "
        "gate, up and down at the same T."
    ]
    return Section("One Llama-3.1-8B decoder layer through the engine", pd.DataFrame(rows), notes)


# ---------------------------------------------------------------- overhead


class TimedCapture(SpectraCapture):
    """SpectraCapture that adds up the time its backward hooks spend on spectra and the time
    spent waiting for the worker's solves when a batch is collected (what the overlap did
    not hide)."""

    seconds = 0.0

    def on_backward(self, index: int, grad: torch.Tensor) -> None:
        started = time.perf_counter()
        super().on_backward(index, grad)
        self.seconds += time.perf_counter() - started

    def collect(self) -> PendingSpectra:
        pending = super().collect()
        collect = pending.results

        def timed() -> list[TargetResult]:
            started = time.perf_counter()
            results = collect()
            self.seconds += time.perf_counter() - started
            return results

        pending.results = timed  # type: ignore[method-assign]
        return pending


class ForwardTimer:
    """Hooks on the whole model that time its last forward pass."""

    def __init__(self, model: nn.Module):
        self.started = self.seconds = 0.0
        self.handles = [
            model.register_forward_pre_hook(self._start),
            model.register_forward_hook(self._stop),
        ]

    def _start(self, module: nn.Module, args: tuple) -> None:
        self.started = time.perf_counter()

    def _stop(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.seconds = time.perf_counter() - self.started


def plain_step(model: nn.Module, batches: list[Batch], timer: ForwardTimer) -> dict[str, float]:
    """Training-style forward and backward with weight gradients (HF loss with labels) of
    each batch, the device's queue drained after each; forward time summed over the
    batches (on a GPU, the time to queue it)."""
    model.requires_grad_(True)
    total = forward = 0.0
    for batch in batches:
        device = batch.input_ids.device

        def step(batch: Batch = batch) -> None:
            loss = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                labels=batch.labels,
                use_cache=False,
            ).loss
            loss.backward()

        total += synchronized(device, step)[0]
        forward += timer.seconds
        model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return {"total": total, "forward": forward}


def fast_step(
    runner: ChunkRunner, capture: TimedCapture, examples: list[Example], timer: ForwardTimer
) -> dict[str, float]:
    """gradspec's fast path on examples: ChunkRunner.run, statistics rows included."""
    capture.seconds = 0.0
    forward = [0.0]

    def add_forward(done: int) -> None:
        forward[0] += timer.seconds

    with capture:
        started = time.perf_counter()
        runner.run(examples, add_forward)
        total = time.perf_counter() - started
    return {
        "total": total,
        "forward": forward[0],
        "spectra": capture.seconds,
        "rest": total - forward[0] - capture.seconds,
    }


def runner_batches(runner: ChunkRunner, examples: list[Example]) -> list[Batch]:
    """The batches ``runner.run`` forms from the examples, for the plain steps."""
    opts = runner.opts
    encoded = [
        encode_example(runner.tokenizer, ex, opts.template, opts.max_length) for ex in examples
    ]
    plan = plan_batches([len(e.input_ids) for e in encoded], opts.batch_size, opts.token_budget)
    return [collate(members, encoded, runner.pad_id, "right", runner.device) for members in plan]


def overhead_section(
    model_dir: Path, examples: list[Example], template: str, settings: Settings
) -> Section:
    """Fast path vs plain forward+backward of the same batches, interleaved, medians."""
    cpu = torch.device("cpu")
    model, tokenizer = load_model_and_tokenizer(model_dir, torch.float32, cpu)
    targets = find_targets(model)
    spectra_dtype = resolve_spectra_dtype("auto", torch.float32)
    capture = TimedCapture(targets, spectra_dtype)
    timer = ForwardTimer(model)
    cases = [(str(size), examples[:size], size) for size in settings.batch_sizes]
    cases.append(("auto", examples[: settings.auto_examples], None))
    rows = []
    for label, chosen, size in cases:
        console.print(f"overhead on {model_dir.name}: batches {label}", style="dim")
        options = ProfileOptions(batch_size=size, template=template)
        runner = ChunkRunner(model, tokenizer, targets, options, cpu, capture)
        batches = runner_batches(runner, chosen)
        plain_step(model, batches, timer)  # warm-up
        fast_step(runner, capture, chosen, timer)
        plain: list[dict[str, float]] = []
        fast: list[dict[str, float]] = []
        for _ in range(settings.repeats):
            plain.append(plain_step(model, batches, timer))
            fast.append(fast_step(runner, capture, chosen, timer))
        plain_total = statistics.median(p["total"] for p in plain)
        fast_total = statistics.median(f["total"] for f in fast)
        rows.append(
            {
                "batch": label,
                "examples": len(chosen),
                "batches": len(batches),
                "padded tokens": sum(b.input_ids.numel() for b in batches),
                "plain fwd+bwd s": seconds(plain_total),
                "plain forward s": median_seconds([p["forward"] for p in plain]),
                "fast s": seconds(fast_total),
                "fast / plain": f"{fast_total / plain_total:.2f}x",
                **{
                    f"fast {part} s": median_seconds([f[part] for f in fast])
                    for part in ("forward", "spectra", "rest")
                },
            }
        )
    notes = [
        f"Model {model_dir.name}, float32, eval mode, template {template}. Plain: all "
        "parameters require grad, HF loss with labels, .backward(), on the same batches. "
        "Fast: frozen weights, SpectraCapture hooks, ChunkRunner.run (tokenizing, "
        f"fast_spectra with the default {str(spectra_dtype).removeprefix('torch.')} "
        "spectra, statistics rows for every (example, matrix)). Fast parts: forward; "
        "spectra = time inside the backward hooks (the routes' GEMMs and QRs; the small "
        "solves run on a worker thread meanwhile) plus the wait for the worker when a "
        "batch's spectra are collected (after the next batch's pass, or at the end); "
        "rest = backward autograd, loss, tokenizing, statistics. Batch "
        "'auto': the engine's automatic "
        f"batches (token budget 4096, padding <= 10%) of the first {settings.auto_examples} "
        f"examples. Median of {settings.repeats} interleaved repetitions after one warm-up."
    ]
    return Section(
        f"Overhead on {model_dir.name}: fast path vs plain forward+backward",
        pd.DataFrame(rows),
        notes,
    )


# ---------------------------------------------------------------- phases (CPU or CUDA)


class GradientCollector(SpectraCapture):
    """SpectraCapture that keeps each target's prepared G and X instead of solving."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.collected: list[tuple[torch.Tensor, InputSpectra]] = []

    def on_backward(self, index: int, grad: torch.Tensor) -> None:
        self.collected.extend(self.prepared_groups(index, grad)[0])


def synchronized(device: torch.device, compute: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of ``compute()`` with the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    result = compute()
    sync()
    return time.perf_counter() - started, result


def batch_phases(
    model: nn.Module, collector: GradientCollector, batch: Batch, device: torch.device
) -> dict[str, float]:
    """Seconds of each phase of the fast path on one batch, every phase synchronised."""
    collector.start_batch(batch.token_mask)
    collector.collected.clear()
    phases = dict.fromkeys(
        ("forward", "backward", "Gram/QR", "eigen/SVD on device", "transfers", "eigen on CPU"),
        0.0,
    )
    with torch.enable_grad():
        phases["forward"], losses = synchronized(
            device, lambda: per_example_losses(*response_logits(model, batch))
        )
        phases["backward"], _ = synchronized(device, lambda: losses.sum().backward())
    for g, x in collector.collected:
        for phase, value in matrix_phases(g, x, collector.spectra_dtype, device).items():
            phases[phase] += value
    return phases


def matrix_phases(
    g: torch.Tensor, x: InputSpectra, dtype: torch.dtype, device: torch.device
) -> dict[str, float]:
    """Seconds of one matrix's GEMMs, solve and transfers (and of its solve on the CPU)."""
    route = choose_route(g.shape[1], g.shape[2], x.rows.shape[2], dtype, device.type)
    phases = {"eigen on CPU": 0.0}
    phases["Gram/QR"], solve = synchronized(device, lambda: prepare_spectra(g, x, route))
    phases["eigen/SVD on device"], values = synchronized(device, solve)
    phases["transfers"], _ = synchronized(device, values.cpu)
    if route == "gram" and device.type != "cpu":
        x_gram = x.gram()
        g_gram = output_gram(g, x_gram)
        copy, on_cpu = synchronized(
            device, lambda: (InputGram(x_gram.gram.cpu(), x_gram.kept.cpu()), g_gram.cpu())
        )
        phases["transfers"] += copy
        phases["eigen on CPU"] = timed(lambda: gram_singular_values(*on_cpu))[0]
    return phases


def phases_section(
    model_dir: Path, examples: list[Example], template: str, settings: Settings
) -> Section:
    """Each phase of the fast path timed on its own, on the chosen device."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype("auto", device, model_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype, device)
    targets = find_targets(model)
    collector = GradientCollector(targets, resolve_spectra_dtype("auto", dtype))
    runner = ChunkRunner(
        model, tokenizer, targets, ProfileOptions(template=template), device, collector
    )
    rows = []
    with collector:
        for batch in runner_batches(runner, examples[: settings.auto_examples]):
            console.print(f"phases: batch {tuple(batch.input_ids.shape)}", style="dim")
            batch_phases(model, collector, batch, device)  # warm-up
            repeats = [batch_phases(model, collector, batch, device) for _ in range(3)]
            rows.append(
                {
                    "batch x T": "x".join(map(str, batch.input_ids.shape)),
                    **{k: median_seconds([r[k] for r in repeats]) for k in repeats[0]},
                }
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    notes = [
        f"Model {model_dir.name} in {str(dtype).removeprefix('torch.')} on {device} "
        f"({name or platform.machine()}); the engine's automatic batches of the first "
        f"{settings.auto_examples} examples; each phase synchronised on its own (no overlap), "
        "median of 3 after a warm-up, seconds summed over all matrices. Gram/QR: the "
        "routes' GEMMs and QRs; eigen/SVD: their small solves on the device; transfers: "
        "values (and, for the Gram route on a GPU, both Grams) to the CPU; eigen on CPU: "
        "the Gram route's solves in one CPU thread instead, to choose where solves run."
    ]
    return Section(f"Phases on {device}", pd.DataFrame(rows), notes)


# ---------------------------------------------------------------- report


def machine_line() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average (1, 5, 15 min) {load}"
    )


def write_markdown(path: Path, sections: list[Section], header: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(section.markdown() for section in sections)
    lines = "".join(f"- {line}\n" for line in header)
    path.write_text(f"## Results\n\n{lines}\n{body}")


def default_results_name(settings: Settings) -> str:
    """results.md for the full default run; a partial or real-model run gets its own file,
    so it never overwrites another run's committed results."""
    if settings.parts == Settings().parts and settings.model is None:
        return "results.md"
    model = f"-{settings.model.name}" if settings.model is not None else ""
    return f"results-{'-'.join(settings.parts)}{model}.md"


def main(
    limit: Annotated[int | None, typer.Option(help="Examples profiled end to end.")] = None,
    layers: Annotated[int | None, typer.Option(help="Decoder layers of the random Llama.")] = None,
    width: Annotated[int | None, typer.Option(help="Hidden size of the random Llama.")] = None,
    quick: Annotated[bool, typer.Option(help="Small sizes; checks the script in < 1 min.")] = False,
    e2e_repeats: Annotated[
        int | None, typer.Option(help="Interleaved end-to-end runs of each method.")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Repetitions of each fast timing and of the overhead pairs.")
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option(
            help="Extra per-matrix token counts besides the data's median and max, e.g. 512,1024."
        ),
    ] = None,
    parts: Annotated[
        str, typer.Option(help="Comma list of e2e, matrix, overhead, phases.")
    ] = "e2e,matrix,overhead",
    model: Annotated[
        Path | None,
        typer.Option(
            help="A real checkpoint (chat template) for e2e, overhead and phases; a path "
            "that does not exist builds a random model with SmolLM2-135M's config."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Device of the phases part: cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch intra-op threads, here and in the profile processes; default torch's."
        ),
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option(
            help="Markdown results file; default bench/results.md for the default parts on "
            "the random model, else bench/results-PARTS[-MODEL].md (quick: .cache/bench/)."
        ),
    ] = None,
) -> None:
    """Benchmark the fast method against the reference algorithm; see bench/README.md."""
    settings = QUICK if quick else Settings()
    overrides = {
        "limit": limit,
        "layers": layers,
        "width": width,
        "e2e_repeats": e2e_repeats,
        "repeats": repeats,
        "extra_tokens": tuple(int(t) for t in tokens.split(",") if t)
        if tokens is not None
        else None,
    }
    settings = replace(
        settings,
        parts=tuple(parts.split(",")),
        model=model,
        device=device,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    markdown = markdown or (
        bench_cache() / "results-quick.md" if quick else BENCH / default_results_name(settings)
    )
    if threads:
        torch.set_num_threads(threads)
    header = [f"machine at start: {machine_line()}"]
    console.print(header[0], highlight=False)

    data = shared_data_dir() / DATA_FILE
    tokenizer = bench_tokenizer()
    examples = load_examples(data)
    lengths = [len(encode_example(tokenizer, ex).input_ids) for ex in examples]
    sections = [token_count_section(lengths, settings.limit)]
    sections[0].show()
    config = bench_config(settings.width, settings.layers, tokenizer)
    model_dir = bench_model(config, tokenizer)
    header.append(
        f"model: random Llama {model_dir.name} (hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, "
        f"vocab {config.vocab_size})"
    )

    subject, template = model_dir, "plain"
    if settings.model is not None:
        subject, template = subject_model(settings.model, tokenizer)
        header.append(f"subject model: {subject.name} (template {template})")
    agree = True
    if "e2e" in settings.parts:
        section, agree = end_to_end_section(subject, data, template, settings)
        sections.append(section)
        section.show()
    if "matrix" in settings.parts:
        median_tokens = round(statistics.median(lengths))
        token_counts = [median_tokens, max(lengths), *settings.extra_tokens]
        section, published = matrix_section(token_counts, settings)
        sections.append(section)
        section.show()
        sections.append(
            layer_section(tokenizer, examples, lengths, token_counts[:2], published, settings)
        )
        sections[-1].show()
    if "overhead" in settings.parts:
        for overhead_model, overhead_template in dict.fromkeys(
            [(model_dir, "plain"), (subject, template)]
        ):
            sections.append(overhead_section(overhead_model, examples, overhead_template, settings))
            sections[-1].show()
    if "phases" in settings.parts:
        sections.append(phases_section(subject, examples, template, settings))
        sections[-1].show()

    header.append(f"machine at end: {machine_line()}")
    console.print(header[-1], highlight=False)
    write_markdown(markdown, sections, header)
    console.print(f"results written to {markdown}")
    if not agree:
        raise typer.Exit(1)


def with_passive_openmp() -> None:
    """Re-run this script with OMP_WAIT_POLICY=PASSIVE unless the caller chose a policy.

    libgomp reads it when torch loads it. On a shared machine the default (spinning)
    policy stalls MKL's LAPACK at every barrier, by up to 100x (see README).
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.execve(
            sys.executable,
            [sys.executable, *sys.argv],
            {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )


if __name__ == "__main__":
    with_passive_openmp()
    typer.run(main)
