"""Benchmark of data-parallel profiling: 1 process against 2 processes (1 thread each).

The same run (``gsm8k_with_cot_gpt4o.json`` of the shared data, a seeded random Llama) is
profiled by ``torchrun --nproc-per-node 1`` and ``--nproc-per-node 2``, each rank with one
thread (OMP_NUM_THREADS=1, as torchrun sets it), interleaved A B A B into fresh run
directories. Throughput is examples per second of the ``gradspec.profile`` call on rank 0
(it returns after every rank finished; model loading included); the whole torchrun
process is timed too. The tables of the two runs are checked equal bit for bit. The load
average is printed before and after: on a shared, loaded machine the ratio is unreliable.
By default each rank is pinned to its own core: one thread per rank is not one core per
rank, since the spectra's solve worker thread overlaps the backward (an unpinned single
process uses about 1.35 cores here), and the question is how N cores scale.

    .venv/bin/python bench/bench_distributed.py --limit 96 --repeats 2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

import gradspec
from gradspec.shared_data import reasoning_file, shared_data_dir

sys.path.insert(0, str(Path(__file__).parent))
from bench_profile import bench_config, bench_model, bench_tokenizer

DATA_FILE = reasoning_file("gsm8k", "with_cot_gpt4o")


def worker(model: str, data: str, out: str, options: str, pin: str) -> None:
    """One rank: profile, and on rank 0 print the call's wall time as JSON.

    With ``pin``, the rank and every thread it starts (the spectra's solve worker
    included) run on core LOCAL_RANK only, so N ranks use exactly N cores.
    """
    if pin == "pin":
        os.sched_setaffinity(0, {int(os.environ.get("LOCAL_RANK", "0")) % os.cpu_count()})
    started = time.perf_counter()
    gradspec.profile(model, data, out, **json.loads(options))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"seconds": time.perf_counter() - started}))


def timed_run(
    ranks: int, model: Path, data: Path, out: Path, options: dict, pin: bool
) -> tuple[float, float]:
    """(seconds of the profile call on rank 0, seconds of the whole torchrun process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(ranks), __file__, "--worker"]
    command += [str(model), str(data), str(out), json.dumps(options), "pin" if pin else "free"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{ranks} ranks failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("{"))
    return json.loads(line)["seconds"], elapsed


def load_line() -> str:
    return "load average (1, 5, 15 min) " + ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main(
    limit: Annotated[int, typer.Option(help="Examples profiled per run.")] = 96,
    chunk_size: Annotated[int, typer.Option(help="Examples per chunk (the unit split).")] = 8,
    width: Annotated[int, typer.Option(help="Hidden size of the random Llama.")] = 512,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    repeats: Annotated[int, typer.Option(help="Runs per world size, interleaved.")] = 2,
    pin: Annotated[
        bool, typer.Option(help="Each rank on its own core (LOCAL_RANK): N ranks use N cores.")
    ] = True,
    worker_args: Annotated[list[str] | None, typer.Argument(hidden=True)] = None,
    as_worker: Annotated[bool, typer.Option("--worker", hidden=True)] = False,
) -> None:
    """Print the 1-process and 2-process throughput and their ratio, measured side by side."""
    if as_worker:
        worker(*(worker_args or []))
        return
    tokenizer = bench_tokenizer()
    model = bench_model(bench_config(width, layers, tokenizer), tokenizer)
    data = shared_data_dir() / DATA_FILE
    options = dict(limit=limit, chunk_size=chunk_size, device="cpu")
    print(f"{os.cpu_count()} cores; before: {load_line()}")
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            for ranks in (1, 2):
                out = Path(scratch, f"r{ranks}-{repeat}")
                times[ranks].append(timed_run(ranks, model, data, out, options, pin))
                print(f"{ranks} rank(s), run {repeat + 1}: {times[ranks][-1][0]:.1f} s")
        one, two = (gradspec.load_run(Path(scratch, f"r{n}-0")) for n in (1, 2))
        pd.testing.assert_frame_equal(one.spectra, two.spectra, check_exact=True)
    print(f"after: {load_line()}")
    print(f"model: Llama width {width}, {layers} layers; {limit} examples, chunks of {chunk_size}")
    print("each rank pinned to its own core" if pin else "ranks not pinned to cores")
    medians = {n: statistics.median(t for t, _ in runs) for n, runs in times.items()}
    walls = {n: statistics.median(w for _, w in runs) for n, runs in times.items()}
    for n in (1, 2):
        print(
            f"{n} process(es): {limit / medians[n]:.2f} examples/s "
            f"(profile call {medians[n]:.1f} s, whole torchrun {walls[n]:.1f} s)"
        )
    print(
        f"ratio 2 vs 1: {medians[1] / medians[2]:.2f}x (whole process {walls[1] / walls[2]:.2f}x); "
        "spectra equal bit for bit"
    )


if __name__ == "__main__":
    typer.run(main)
