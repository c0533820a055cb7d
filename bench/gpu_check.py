"""The prepared GPU check (issue 22): exactness and speed on one GPU, unattended, in one run.

Run it through ``bench/gpu_check.sh``, which finds a Python, the shared data and the
carried wheels. Stages, each a subprocess of its own with a time limit (a hang or a crash
costs that stage only, and each starts with the GPU empty), in this order:

1. ``environment``: the device, library versions, and two ceilings to read the other
   numbers against (a device-to-device copy, a bf16 matrix product);
2. ``tests``: the CUDA tests (``pytest -m cuda``: tests/test_devices.py and the monitor's);
3. ``matrix``: per-matrix times at Llama-3.1-8B shapes for T = 1024, 741, 407 and 4096:
   the published method (float32 G^T X, ``torch.linalg.svd``) against each exact route and
   each solver of its small core;
4. ``e2e``: a random-weight model of Llama-3.1-8B's shapes (32 layers, bf16) through the
   engine on detailed-CoT GSM8K: examples/s at batch 1 and in automatic batches, against a
   plain training step of the same batches and the published method on 4 examples, and
   peak GPU memory;
5. ``monitor``: the training monitor's profiled step against a plain one, same model.

All results go to ONE Markdown file, rewritten after every stage (and every row of a
stage), so a run stopped at any point leaves what it measured. ``--cpu-dry-run`` runs
every stage on tiny shapes on the CPU (tests/test_gpu_check.py), so the script is known
to work before any GPU time is spent.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from bench_profile import Section, ratio, seconds, synchronized

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_NAME = "gpu-check.md"
DETAILED_GSM8K = ("gsm8k", "with_cot_gpt4o")  # the data of the end-to-end stages
# Llama-3.1-8B's shapes (config.json of meta-llama/Llama-3.1-8B).
LLAMA_31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=448,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    vocab_size=0,  # the tokenizer's
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Scale:
    """The sizes of one check: a GPU's, or tiny ones for the CPU dry run."""

    name: str
    device: str
    matrix_divisor: int  # divides the 8B matrix shapes
    tokens: tuple[int, ...]  # per-matrix token counts, in the order they are measured
    model: dict[str, Any]
    batch1_examples: int
    auto_examples: int
    max_length: int
    published_examples: int
    published_in_full: bool  # run the published method on every layer, not one
    monitor_steps: int
    repeats: int
    # Seconds per stage: the stage stops starting new measurements past it, and is
    # killed at its limit + STAGE_GRACE.
    budgets: dict[str, float] = field(default_factory=dict)
    test_args: tuple[str, ...] = ()  # pytest's selection


GPU = Scale(
    name="gpu",
    device="cuda",
    matrix_divisor=1,
    tokens=(1024, 741, 407, 4096),
    model=LLAMA_31_8B,
    batch1_examples=8,
    auto_examples=48,
    max_length=1024,
    published_examples=4,
    published_in_full=False,
    monitor_steps=8,
    repeats=3,
    # At most 380 s of stages + 5 x STAGE_GRACE = 455 s, under the 8 minutes planned.
    budgets={"environment": 20, "tests": 90, "matrix": 110, "e2e": 100, "monitor": 60},
    test_args=("-m", "cuda", "tests/test_devices.py", "tests/test_monitor.py"),
)
DRY = Scale(
    name="cpu-dry-run",
    device="cpu",
    matrix_divisor=32,
    tokens=(32, 23, 13, 128),
    model=TINY_LLAMA,
    batch1_examples=2,
    auto_examples=4,
    max_length=128,
    published_examples=2,
    published_in_full=True,
    monitor_steps=4,
    repeats=1,
    budgets={"environment": 60, "tests": 120, "matrix": 60, "e2e": 90, "monitor": 90},
    # The math on the CPU only: the device tests' CPU half runs in the test suite itself.
    test_args=("-m", "not cuda", "-k", "every_route and 7-40-30", "tests/test_devices.py"),
)
SCALES = {scale.name: scale for scale in (GPU, DRY)}
STAGE_GRACE = 15.0  # seconds a stage may run past its budget before it is killed


# ---------------------------------------------------------------- results


class StageReport:
    """A stage's sections (bench_profile.Section), its file rewritten whenever a row or a
    note is added, so a stage stopped at its limit leaves what it measured."""

    def __init__(self, path: Path):
        self.path = path
        self.sections: list[Section] = []

    def section(self, title: str, notes: list[str] | None = None) -> Section:
        self.sections.append(Section(title, pd.DataFrame(), list(notes or [])))
        self.write()
        return self.sections[-1]

    def add(self, section: Section, row: dict[str, Any]) -> None:
        section.frame = pd.concat([section.frame, pd.DataFrame([row])], ignore_index=True)
        self.write()
        print(f"{section.title}: {row}", flush=True)

    def note(self, section: Section, text: str) -> None:
        section.notes.append(text)
        self.write()

    def write(self) -> None:
        self.path.write_text("\n".join(section.markdown() for section in self.sections))


class Budget:
    """The seconds a stage has left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ---------------------------------------------------------------- the orchestrator


STAGES = ("environment", "tests", "matrix", "e2e", "monitor")


def run_stage(name: str, scale: Scale, work: Path) -> tuple[str, str]:
    """Run one stage in its own process group under its time limit; its Markdown (what it
    wrote, even if stopped) and a status line with the tail of its output on failure."""
    section_file = work / f"{name}.md"
    log_file = work / f"{name}.log"
    budget = scale.budgets[name]
    command = [sys.executable, str(Path(__file__)), "stage", name, "--scale", scale.name]
    command += ["--section", str(section_file), "--budget", str(budget)]
    started = time.monotonic()
    with log_file.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        try:
            code = process.wait(timeout=budget + STAGE_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    elapsed = time.monotonic() - started
    body = section_file.read_text() if section_file.is_file() else ""
    if code == 0:
        return body, f"finished in {elapsed:.0f} s (budget {budget:.0f} s)"
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
    status = (
        f"**killed at its time limit** after {elapsed:.0f} s"
        if code is None
        else f"**failed** (exit code {code}) after {elapsed:.0f} s"
    )
    return body, f"{status}; last lines of its output:\n\n```\n{tail}\n```"


def write_results(
    path: Path, scale: Scale, parts: list[tuple[str, str, str]], total: float
) -> None:
    """The one results file: a header, then each stage's status and sections."""
    lines = [
        f"# gradspec GPU check ({scale.name})",
        "",
        f"- command: `bash bench/gpu_check.sh{' --cpu-dry-run' if scale is DRY else ''}`",
        f"- started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(time.time() - total))},"
        f" {total:.0f} s so far",
        "",
    ]
    for name, status, body in parts:
        lines += [f"## {name}", "", status, "", body, ""]
    path.write_text("\n".join(lines))


def orchestrate(scale: Scale, out: Path) -> int:
    """Every stage in turn; the results file after each. Exit code 1 if any stage failed."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_NAME
    work = Path(tempfile.mkdtemp(prefix="gradspec-gpu-check-"))
    started = time.monotonic()
    parts: list[tuple[str, str, str]] = []
    failed = False
    for name in STAGES:
        print(f"== stage {name} (budget {scale.budgets[name]:.0f} s)", flush=True)
        body, status = run_stage(name, scale, work)
        failed |= not status.startswith("finished")
        parts.append((name, status, body))
        write_results(results, scale, parts, time.monotonic() - started)
        print(f"== {name}: {status.splitlines()[0]}", flush=True)
    print(f"results: {results} ({time.monotonic() - started:.0f} s)")
    return 1 if failed else 0


# ---------------------------------------------------------------- helpers for the stages


def median_time(
    device: Any, compute: Callable[[], Any], repeats: int, long: float = 0.5
) -> tuple[float, Any]:
    """Median seconds of ``repeats`` runs after a warm-up; one run when the warm-up took
    over ``long`` seconds (kernels loaded by an earlier call)."""
    first, result = synchronized(device, compute)
    if first > long:
        return first, result
    times = [synchronized(device, compute)[0] for _ in range(repeats)]
    return statistics.median(times), result


def peak_memory_gb(device: Any) -> str:
    """Peak GPU memory allocated since the last reset, in GB ('-' on the CPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f}"


def reset_peak_memory(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def random_llama(scale: Scale, tokenizer: Any, device: Any, dtype: Any) -> Any:
    """A seeded random-weight Llama of the scale's shapes, built on the device."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    settings = dict(scale.model)
    vocab = max(settings.pop("vocab_size"), len(tokenizer))
    config = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def model_line(model: Any) -> str:
    """The model's shape and size, for the notes."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return (
        f"random Llama: hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
        f"{config.num_key_value_heads} KV heads, vocab {config.vocab_size}; "
        f"{params / 1e9:.2f} B parameters, {size / 1e9:.1f} GB in "
        f"{str(model.dtype).removeprefix('torch.')}"
    )


# ---------------------------------------------------------------- stage: environment


def environment_stage(scale: Scale, report: StageReport, budget: Budget) -> None:
    """The machine, the libraries, and the copy and bf16 matrix-product ceilings."""
    import torch

    import gradspec

    device = torch.device(scale.device)
    on_gpu = device.type == "cuda"
    facts = report.section("Machine and libraries")
    name = torch.cuda.get_device_name(device) if on_gpu else platform.processor()
    memory = (
        f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
        if on_gpu
        else "-"
    )
    for key, value in [
        ("device", f"{device}: {name or platform.machine()}, {memory}"),
        ("CPU cores", str(os.cpu_count())),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("gradspec", gradspec.__version__),
        ("nvidia-smi", nvidia_smi() if on_gpu else "-"),
        *((name, installed_version(name)) for name in LIBRARIES),
    ]:
        report.add(facts, {"what": key, "value": value})
    ceilings = report.section(
        "Ceilings measured here",
        ["Median of 5 after a warm-up, random data. Copy: bytes read plus written."],
    )
    n = 8192 if on_gpu else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_s, _ = median_time(device, lambda: a @ b, 5)
    report.add(
        ceilings,
        {"what": f"bf16 {n}^3 product", "value": f"{2 * n**3 / matmul_s / 1e12:.3g} TFLOP/s"},
    )
    big = torch.randn(2**28 if on_gpu else 2**22, device=device)
    copy_s, _ = median_time(device, big.clone, 5)
    report.add(
        ceilings,
        {
            "what": f"copy of {big.nbytes / 1e9:.2f} GB",
            "value": f"{2 * big.nbytes / copy_s / 1e12:.3g} TB/s",
        },
    )


LIBRARIES = (
    "transformers",
    "tokenizers",
    "numpy",
    "pandas",
    "pyarrow",
    "datasets",
    "huggingface-hub",
)


def installed_version(name: str) -> str:
    """A distribution's version, or 'missing'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def nvidia_smi() -> str:
    """Driver, clocks and memory as nvidia-smi reads them (the card's state, unchanged)."""
    query = "driver_version,clocks.sm,clocks.mem,memory.used,temperature.gpu"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not available ({exc})"
    return f"{query}: {done.stdout.strip() or done.stderr.strip()}"


# ---------------------------------------------------------------- stage: tests


def tests_stage(scale: Scale, report: StageReport, budget: Budget) -> None:
    """The device tests through pytest; a table of outcomes. Fails when a test fails."""
    junit = report.path.with_suffix(".xml")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *scale.test_args,
        f"--junitxml={junit}",
    ]
    summary = report.section("Tests", [f"`{' '.join(command[1:])}`"])
    try:
        subprocess.run(command, cwd=REPO, timeout=max(budget.left(), 1), check=False)
    except subprocess.TimeoutExpired:
        summary.notes.append("**pytest was stopped at the stage's budget**")
    if not junit.is_file():
        report.add(summary, {"outcome": "no junit report", "tests": 0})
        raise SystemExit(1)
    cases = junit_cases(junit)
    counts = pd.Series([case["outcome"] for case in cases]).value_counts()
    for outcome, count in counts.items():
        report.add(summary, {"outcome": outcome, "tests": int(count)})
    listing = report.section("Each test")
    for case in cases:
        report.add(listing, case)
    if {"failed", "error"} & set(counts.index) or not len(cases):
        raise SystemExit(1)


def junit_cases(path: Path) -> list[dict[str, Any]]:
    """(test, outcome, seconds, message) of each test case of a pytest junit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (
                    (child.get("message") or "").splitlines()[0][:160]
                    if child.get("message")
                    else ""
                )
        test = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        cases.append(
            {
                "test": test,
                "outcome": outcome,
                "s": seconds(float(case.get("time", 0))),
                "message": message,
            }
        )
    return cases


# ---------------------------------------------------------------- stage: per matrix


LLAMA_8B_MATRICES = (  # (name, d_out, d_in) of one Llama-3.1-8B decoder layer's matrices
    ("q_proj, o_proj", 4096, 4096),
    ("k_proj, v_proj", 1024, 4096),
    ("gate_proj, up_proj", 14336, 4096),
    ("down_proj", 4096, 14336),
)
EXACT = 1e-4  # max |values - published| / s1 of an exact float32 route


@dataclass
class MatrixBench:
    """The per-matrix stage's state: its two tables and the timings shared across rows."""

    scale: Scale
    report: StageReport
    budget: Budget
    summary: Section
    detail: Section
    solve_seconds: dict[tuple[Any, ...], float] = field(default_factory=dict)  # by core
    published_seconds: dict[str, float] = field(default_factory=dict)  # by matrix, last


def matrix_stage(scale: Scale, report: StageReport, budget: Budget) -> None:
    """Per matrix at Llama-3.1-8B shapes, T in priority order: the published method once,
    then every route a run would time; solve timings are shared by equal cores."""
    import torch

    device = torch.device(scale.device)
    summary = report.section(
        "Per matrix at Llama-3.1-8B shapes: the measured route against the published method",
        [
            "Published: float32 G^T X as stored (d_out x d_in), then torch.linalg.svd (U, V, "
            "full matrices), as arXiv:2410.23743's code and `--method reference` do; run once. "
            "Routes: those of gradspec.routes a run would time at the shape (tuning.py), each "
            "timed as its GEMMs/QRs (prepare) and its small solve (for -cpu routes: the copy "
            f"to the CPU and the solve there), median of {scale.repeats} after a warm-up (one "
            "run when over 0.5 s); random Gaussian G (T x d_out) and X (T x d_in) in float32 on "
            "the device. Measured choice: the fastest exact one (what `--route auto` takes); "
            "cost model: the route routes.choose_route estimates cheapest. Exact: max "
            f"|values - published| / s1 <= {EXACT:g}.",
        ],
    )
    bench = MatrixBench(
        scale, report, budget, summary, report.section("Per matrix: every route timed")
    )
    warm_g, warm_x = random_factors(8, 64, 48, device, seed=0)
    torch.linalg.svd(warm_g.T @ warm_x)  # load the solver libraries before timing
    divisor = scale.matrix_divisor
    for tokens in scale.tokens:
        for index, (name, d_out, d_in) in enumerate(LLAMA_8B_MATRICES):
            if budget.left() < 2 * bench.published_seconds.get(name, 0.0) + 5:
                report.note(summary, f"{name} at T = {tokens}: not measured (stage budget spent).")
                continue
            g, x = random_factors(tokens, d_out // divisor, d_in // divisor, device, seed=index)
            measure_matrix(bench, name, g, x)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def measure_matrix(bench: MatrixBench, name: str, g: Any, x: Any) -> None:
    """The published method and every route a run would time on one (G, X): a summary row
    and a row per route."""
    import torch

    from gradspec.routes import SolvePlace, choose_route
    from gradspec.spectra import InputSpectra

    device, tokens, d_out, d_in = g.device, g.shape[0], g.shape[1], x.shape[1]
    published_s, published = synchronized(device, lambda: torch.linalg.svd(g.T @ x).S.cpu())
    bench.published_seconds[name] = published_s
    results: dict[str, tuple[float, float]] = {}  # seconds and error of each route
    for route_name, route in bench_routes(tokens, d_out, d_in, device).items():
        if bench.budget.left() < 5:
            break
        prepare_s, solve = median_time(
            device, lambda r=route: r.prepare(g, InputSpectra(x)), bench.scale.repeats
        )
        if route.place == SolvePlace.CPU:
            solve = solve.to("cpu")  # the copy is timed as part of the solve, below
        cores = [op for op in solve.operands if isinstance(op, torch.Tensor)]
        key = (solve.function, route.place, *(tuple(core.shape) for core in cores))
        if key not in bench.solve_seconds:
            bench.solve_seconds[key] = median_time(device, solve, bench.scale.repeats)[0]
        error = relative_difference(solve().cpu(), published)
        total = prepare_s + bench.solve_seconds[key]
        results[route_name] = (total, error)
        bench.report.add(
            bench.detail,
            {
                "matrix": name,
                "T": tokens,
                "route": route_name,
                "core": "x".join(map(str, cores[-1].shape)),
                "prepare s": seconds(prepare_s),
                "solve s": seconds(bench.solve_seconds[key]),
                "total s": seconds(total),
                "vs published": ratio(published_s, total),
                "max diff / s1": f"{error:.1e}",
            },
        )
    exact = {n: r for n, r in results.items() if r[1] <= EXACT and n not in BENCH_ONLY}
    best = min(exact, key=lambda n: exact[n][0]) if exact else None
    model_route = choose_route(tokens, d_out, d_in, torch.float32, device.type)
    model_s = results.get(model_route, (float("nan"), 0.0))[0]
    bench.report.add(
        bench.summary,
        {
            "matrix": name,
            "d_out x d_in": f"{d_out}x{d_in}",
            "T": tokens,
            "published s": seconds(published_s),
            "measured choice": best or "-",
            "its s": seconds(exact[best][0]) if best else "-",
            "vs published": ratio(published_s, exact[best][0]) if best else "-",
            "cost model": model_route,
            "cost model vs published": ratio(published_s, model_s),
        },
    )


BENCH_ONLY = ("factor-gesvda",)  # measured here, never chosen by a run (approximate)


def bench_routes(tokens: int, d_out: int, d_in: int, device: Any) -> dict[str, Any]:
    """The routes a run would time at this shape on this device (tuning.worth_timing) and,
    on CUDA, the factor core through cuSOLVER's gesvda beside them: approximate for
    ill-conditioned cores, so measured here only."""
    import dataclasses

    import torch

    from gradspec import routes, tuning
    from gradspec.spectra import driver_singular_values, prepare_factor

    usable = routes.usable_routes(device.type, torch.float32)
    names = tuning.worth_timing(tokens, d_out, d_in, device.type, usable)
    found = {name: routes.ROUTES[name] for name in names}
    if device.type == "cuda":
        gesvda = partial(driver_singular_values, driver="gesvda")
        found[BENCH_ONLY[0]] = dataclasses.replace(
            routes.ROUTES["factor"],
            name=BENCH_ONLY[0],
            prepare=routes.with_core_solver(prepare_factor, gesvda),
        )
    return found


def relative_difference(values: Any, published: Any) -> float:
    """max |values - published| / s1, the longer one's extra values (zeros, for an exact
    route of rank T) against zero."""
    import torch.nn.functional as F

    width = max(len(values), len(published))
    a, b = (F.pad(v.double(), (0, width - len(v))) for v in (values, published))
    return float((a - b).abs().max() / b[0])


def random_factors(tokens: int, d_out: int, d_in: int, device: Any, seed: int) -> tuple[Any, Any]:
    """Random float32 output gradients G (T x d_out) and inputs X (T x d_in) on the device."""
    import torch

    generator = torch.Generator(device).manual_seed(seed)
    g = torch.randn(tokens, d_out, generator=generator, device=device)
    return g, torch.randn(tokens, d_in, generator=generator, device=device)


# ---------------------------------------------------------------- stage: end to end


def e2e_stage(scale: Scale, report: StageReport, budget: Budget) -> None:
    """The engine on a random model of Llama-3.1-8B's shapes: batch 1, automatic batches,
    plain training steps of the same batches, the published method, peak memory."""
    import torch
    from bench_profile import (
        ForwardTimer,
        TimedCapture,
        bench_tokenizer,
        fast_step,
        plain_step,
        runner_batches,
    )

    from gradspec.data import load_examples
    from gradspec.engine import ChunkRunner
    from gradspec.families import find_targets
    from gradspec.options import ProfileOptions
    from gradspec.shared_data import reasoning_file, shared_data_dir

    device = torch.device(scale.device)
    tokenizer = bench_tokenizer()
    data_file = reasoning_file(*DETAILED_GSM8K)
    examples = load_examples(shared_data_dir() / data_file)
    model = random_llama(scale, tokenizer, device, torch.bfloat16)
    targets = find_targets(model)
    capture = TimedCapture(targets, torch.float32)
    timer = ForwardTimer(model)
    notes = [
        f"{model_line(model)}; {len(targets)} matrices; float32 spectra; {data_file} "
        f"(plain template, at most {scale.max_length} tokens), bench tokenizer. Fast: "
        "ChunkRunner.run as `gradspec profile` runs a chunk (statistics rows included, "
        "model load and parquet writing not), after one warm-up example. Plain: forward "
        "and backward with weight gradients (HF loss) of the same batches, no optimizer. "
        "Peak: torch.cuda.max_memory_allocated during the fast run."
    ]
    section = report.section("End to end on Llama-3.1-8B's shapes", notes)

    def runner(batch_size: int | None) -> ChunkRunner:
        options = ProfileOptions(batch_size=batch_size, max_length=scale.max_length)
        return ChunkRunner(model, tokenizer, targets, options, device, capture)

    batch1 = runner(1)
    fast_step(batch1, capture, examples[:1], timer)  # warm-up: kernels, handles, allocator
    plain_step(model, runner_batches(batch1, examples[:1]), timer)
    for label, batch_size, count in (
        ("1", 1, scale.batch1_examples),
        ("auto", None, scale.auto_examples),
    ):
        if budget.left() < 20:
            report.note(section, f"batch {label}: not measured (stage budget spent).")
            continue
        chosen = examples[1 : 1 + count]
        chunk_runner = runner(batch_size)
        batches = runner_batches(chunk_runner, chosen)
        plain = plain_step(model, batches, timer)["total"]
        reset_peak_memory(device)
        fast = fast_step(chunk_runner, capture, chosen, timer)["total"]
        report.add(
            section,
            {
                "batch": label,
                "examples": len(chosen),
                "batches": len(batches),
                "padded tokens": sum(b.input_ids.numel() for b in batches),
                "fast s": seconds(fast),
                "examples/s": f"{len(chosen) / fast:.3g}",
                "plain fwd+bwd s": seconds(plain),
                "fast / plain": f"{fast / plain:.2f}x",
                "peak GB": peak_memory_gb(device),
            },
        )
    if budget.left() > 30:
        published_rows(scale, report, model, tokenizer, targets, examples, batch1, capture, timer)
    else:
        report.note(section, "published method: not measured (stage budget spent).")


def published_rows(
    scale: Scale,
    report: StageReport,
    model: Any,
    tokenizer: Any,
    targets: list[Any],
    examples: list[Any],
    batch1: Any,
    capture: Any,
    timer: Any,
) -> None:
    """The published method on the first examples against the fast one on the same. On a
    GPU its SVDs are timed on one layer and scaled to all (an 8B model's 224 full SVDs
    per example take far longer than the check may); the dry run also runs it whole."""
    from bench_profile import fast_step, plain_step, runner_batches

    from gradspec.data import encode_example
    from gradspec.engine import reference_spectra

    device = batch1.device
    chosen = examples[1 : 1 + scale.published_examples]
    layers = model.config.num_hidden_layers
    plain = plain_step(model, runner_batches(batch1, chosen), timer)["total"]
    first_layer = [t for t in targets if t.layer == 0]
    svd_s = layer_svd_seconds(model, first_layer, runner_batches(batch1, chosen[:1])[0])
    estimate = plain + len(chosen) * layers * svd_s
    fast = fast_step(batch1, capture, chosen, timer)["total"]
    section = report.section(
        f"Published method on {len(chosen)} examples",
        [
            "Published: per example, forward and backward with weight gradients, then "
            "torch.linalg.svd of every weight gradient (engine.reference_spectra). Estimate: "
            f"forward and backward of the {len(chosen)} examples (measured, "
            f"{seconds(plain)} s) + examples x {layers} layers x the published SVDs of one "
            f"layer's {len(first_layer)} matrices (measured on layer 0's gradients of the "
            f"first example: {seconds(svd_s)} s)."
        ],
    )
    rows = [("published, estimated", estimate)]
    if scale.published_in_full:
        total = 0.0
        for example in chosen:
            one = encode_example(tokenizer, example, "plain", scale.max_length)
            total += synchronized(
                device, lambda one=one: reference_spectra(model, targets, one, device)
            )[0]
        rows.append(("published, measured", total))
    rows.append(("fast, batch 1", fast))
    for method, value in rows:
        report.add(
            section,
            {
                "method": method,
                "examples": len(chosen),
                "s": seconds(value),
                "examples/s": f"{len(chosen) / value:.3g}",
                "published estimate / this": ratio(estimate, value),
            },
        )


def layer_svd_seconds(model: Any, layer_targets: list[Any], batch: Any) -> float:
    """Seconds of the published SVDs of one layer's matrices on one batch's gradients:
    ``torch.linalg.svd`` of each float32 weight gradient, as engine.reference_spectra."""
    import torch

    torch.linalg.svd(torch.ones(4, 3, device=batch.input_ids.device))  # load the solver
    model.requires_grad_(True)
    try:
        model(
            input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids
        ).loss.backward()
        total = 0.0
        for target in layer_targets:
            grad = target.module.weight.grad.float()
            total += synchronized(grad.device, lambda g=grad: torch.linalg.svd(g).S.cpu())[0]
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
    return total


# ---------------------------------------------------------------- stage: monitor


def monitor_stage(scale: Scale, report: StageReport, budget: Budget) -> None:
    """The training monitor in a Trainer run on the same model: profiled against plain steps."""
    import torch
    from bench_monitor import DEFAULT_LOGGING_STEPS, dataset, profiled_and_plain, timed_run
    from bench_profile import bench_tokenizer

    from gradspec.shared_data import reasoning_file, shared_data_dir

    device = torch.device(scale.device)
    tokenizer = bench_tokenizer()
    model = random_llama(scale, tokenizer, device, torch.bfloat16).train().requires_grad_(True)
    data_file = reasoning_file(*DETAILED_GSM8K)
    data = dataset(
        tokenizer, 4 * scale.monitor_steps, shared_data_dir() / data_file, scale.max_length
    )
    section = report.section(
        "Training monitor on Llama-3.1-8B's shapes",
        [
            f"{model_line(model)}. Trainer (AdamW, batches of 4 of {data_file}, at most "
            f"{scale.max_length} tokens), {scale.monitor_steps} steps, the monitor profiling "
            "every second one (watch(every_n_steps=2)); each step timed from on_step_begin to "
            "on_step_end with the GPU's queue drained; medians, the first profiled step left "
            "out (warm-up)."
        ],
    )
    reset_peak_memory(device)
    times = timed_run(
        model, tokenizer, data, True, scale.monitor_steps, use_cpu=device.type == "cpu"
    )
    profiled, plain = profiled_and_plain(times)
    amortised = (profiled / plain - 1) / DEFAULT_LOGGING_STEPS
    report.add(
        section,
        {
            "profiled step s": seconds(profiled),
            "plain step s": seconds(plain),
            "profiled / plain": f"{profiled / plain:.2f}x",
            f"amortised at every {DEFAULT_LOGGING_STEPS} steps": f"{amortised:.2%}",
            "peak GB": peak_memory_gb(device),
            "step times s": " ".join(seconds(t) for t in times),
        },
    )


# ---------------------------------------------------------------- command line

STAGE_FUNCTIONS: dict[str, Callable[[Scale, StageReport, Budget], None]] = {
    "environment": environment_stage,
    "tests": tests_stage,
    "matrix": matrix_stage,
    "e2e": e2e_stage,
    "monitor": monitor_stage,
}
app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def run(
    cpu_dry_run: Annotated[
        bool, typer.Option(help="Every stage on tiny shapes on the CPU.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Folder of the results file (default $OUT).")
    ] = None,
) -> None:
    """Every stage in turn; one Markdown results file in OUT."""
    folder = out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if folder is None:
        raise typer.BadParameter("give --out or set $OUT", param_hint="--out")
    raise typer.Exit(orchestrate(DRY if cpu_dry_run else GPU, folder))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=", ".join(STAGES))],
    scale: Annotated[str, typer.Option(help="gpu or cpu-dry-run")],
    section: Annotated[Path, typer.Option(help="Markdown file the stage writes.")],
    budget: Annotated[float, typer.Option(help="Seconds the stage may take.")],
) -> None:
    """One stage (run by ``run`` in a process of its own)."""
    STAGE_FUNCTIONS[name](SCALES[scale], StageReport(section), Budget(budget))


if __name__ == "__main__":
    app()
