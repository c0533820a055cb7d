"""Data-parallel profiling and studies on 2 CPU processes (gloo) against 1 process.

The ranks are real processes: started by ``torch.distributed.run`` (torchrun), or one by
one with the launcher's environment variables, as a multi-node job sets them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from conftest import GSM8K_DETAILED
from killed_run import STOP_AFTER_CHUNKS, STOP_RANK
from test_study import write_study
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import gradspec
from gradspec.distributed import LOCAL, Ranks, agree, split_by_weight
from gradspec.errors import GradspecError
from gradspec.options import Method, Shard
from gradspec.sharding import check_shard, shard_model
from gradspec.study import load_study, run_study

WORKER = Path(__file__).with_name("distributed_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
LONG = GSM8K_DETAILED
# Six chunks. The route is forced: ranks that measure routes each on their own may choose
# others, whose values agree only to float32 rounding, and these runs are compared exactly.
OPTIONS = dict(limit=12, chunk_size=2, batch_size=2, device="cpu", route="factor")


def test_split_balances_token_counts_greedily_longest_first():
    # 5 -> rank 0, 4 -> 1, 3 -> 1 (4 < 5), 3 -> 0 (5 < 7), 3 -> 1 (7 < 8)
    assert split_by_weight([5, 4, 3, 3, 3], 2) == [[0, 3], [1, 2, 4]]
    assert split_by_weight([1] * 5, 2) == [[0, 2, 4], [1, 3]]  # ties: by index, then rank
    assert split_by_weight([7], 3) == [[0], [], []]
    weights = [(i * 37) % 11 + 1 for i in range(40)]
    shares = split_by_weight(weights, 3)
    assert sorted(i for share in shares for i in share) == list(range(40))
    loads = [sum(weights[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(weights)


def test_agree_on_one_process_raises_the_error_itself():
    with pytest.raises(GradspecError, match="bad"):
        agree(LOCAL, lambda: (_ for _ in ()).throw(GradspecError("bad")))
    assert agree(LOCAL, lambda: 3) == 3


def _env(**extra: str) -> dict[str, str]:
    """One thread per process, as torchrun sets it, so CPU results are bit for bit equal."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(ranks: int, *args: str, env: dict[str, str] | None = None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(ranks), *args]
    return subprocess.run(command, env=env or _env(), capture_output=True, text=True, check=False)


def _profile(
    ranks: int, model: Path, out: Path, own_group: bool = False, options=OPTIONS, **env: str
):
    args = [str(WORKER), str(model), str(LONG), str(out), json.dumps(options)]
    return _torchrun(ranks, *args, *(["--own-group"] if own_group else []), env=_env(**env))


def _parts(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}


def _finished_parts(out: Path) -> dict[Path, int]:
    """The parts of finished chunks: a spectra part whose examples part a killed rank never
    wrote is a leftover, deleted and profiled again on resume."""
    return {p: t for p, t in _parts(out).items() if (out / "examples" / p.name).exists()}


def _assert_same_tables(a: gradspec.RunTables, b: gradspec.RunTables) -> None:
    pd.testing.assert_frame_equal(a.examples, b.examples, check_exact=True)
    pd.testing.assert_frame_equal(a.spectra, b.spectra, check_exact=True)


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> gradspec.RunTables:
    """The run profiled by one process (torchrun with one rank: no process group)."""
    out = tmp_path_factory.mktemp("one") / "run"
    done = _profile(1, tiny_model("llama"), out)
    assert done.returncode == 0, done.stderr
    tables = gradspec.load_run(out)
    assert len(tables.examples) == 12 and tables.manifest["sessions"][-1]["ranks"] == 1
    return tables


@pytest.mark.slow
def test_two_ranks_in_the_callers_group_equal_one_process_bit_for_bit(
    one_process, tiny_model, tmp_path
):
    done = _profile(2, tiny_model("llama"), tmp_path / "run", own_group=True)
    assert done.returncode == 0, done.stderr
    two = gradspec.load_run(tmp_path / "run")
    _assert_same_tables(two, one_process)
    assert two.manifest["sessions"][-1]["ranks"] == 2
    assert len(list((tmp_path / "run" / "examples").iterdir())) == 6


@pytest.mark.slow
@pytest.mark.parametrize("rerun_ranks", [1, 2])
def test_a_killed_rank_leaves_a_run_that_resumes_identically(
    rerun_ranks, one_process, tiny_model, tmp_path
):
    model, out = tiny_model("llama"), tmp_path / "run"
    killed = _profile(2, model, out, **{STOP_AFTER_CHUNKS: "1", STOP_RANK: "1"})
    assert killed.returncode != 0
    finished = _finished_parts(out)
    assert 2 <= len(finished) < 12  # rank 1 wrote one chunk (two parts), then died
    assert gradspec.load_run(out).manifest["sessions"][-1]["ended"] is None

    resumed = _profile(rerun_ranks, model, out)
    assert resumed.returncode == 0, resumed.stderr
    assert {p: t for p, t in _parts(out).items() if p in finished} == finished  # not redone
    tables = gradspec.load_run(out)
    _assert_same_tables(tables, one_process)
    assert [s["ranks"] for s in tables.manifest["sessions"]] == [2, rerun_ranks]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_args(model: Path, out: Path, options=OPTIONS) -> list[str]:
    return [str(WORKER), str(model), str(LONG), str(out), json.dumps(options)]


@pytest.mark.slow
@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate is not installed")
def test_accelerate_launch_on_two_cpu_processes_equals_one_process(
    one_process, tiny_model, tmp_path
):
    """``accelerate launch --multi_gpu`` starts torchrun's agent, on a CPU too (gloo)."""
    launcher = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", "0"]
    out = tmp_path / "run"
    # HF_HOME: no accelerate config of the user's is read.
    env = _env(HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run(
        [*launcher, *_worker_args(tiny_model("llama"), out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    tables = gradspec.load_run(out)
    _assert_same_tables(tables, one_process)
    assert tables.manifest["sessions"][-1]["ranks"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["none", "hsdp"])
def test_two_nodes_of_torchrun_on_localhost_equal_one_process(
    shard, one_process, tiny_model, tmp_path
):
    """Multi-node torchrun as SLURM starts it (one agent per node, static rendezvous at the
    head node), both nodes on this machine; hsdp: a model copy per node (a 2 x 1 mesh)."""
    out, port = tmp_path / "run", str(_free_port())
    model, options = tiny_model("llama"), {**OPTIONS, "shard": shard}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    launcher += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    nodes = [
        subprocess.Popen(
            [*launcher, "--node-rank", str(node), *_worker_args(model, out, options)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr
    tables = gradspec.load_run(out)
    _assert_same_tables(tables, one_process)
    assert tables.manifest["sessions"][-1]["ranks"] == 2
    assert tables.manifest["sessions"][-1]["shard"] == shard


def _cli_ranks(per_rank_args: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """``python -m gradspec ...`` once per rank, started with the launcher's variables."""
    port, size = str(_free_port()), str(len(per_rank_args))
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "gradspec", *args],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=size,
                LOCAL_WORLD_SIZE=size,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, args in enumerate(per_rank_args)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        status = process.returncode
        results.append(subprocess.CompletedProcess(process.args, status, stdout, stderr))
    return results


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_bad_input_on_one_rank_stops_every_rank_with_its_error(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    out = tmp_path / "run"
    common = ["profile", "--model", str(tiny_model("llama")), "--out", str(out), "--limit", "2"]
    ranks = _cli_ranks([[*common, "--data", str(LONG)], [*common, "--data", str(bad)]])
    assert [r.returncode for r in ranks] == [2, 2]
    assert _error_line(ranks[0]) == _error_line(ranks[1])
    assert f"{bad}:2: field 'output'" in _error_line(ranks[0])
    assert not out.exists()

    args = [*common, "--data", str(LONG)]
    other = _cli_ranks([args, [*args, "--top-k", "2"]])
    assert [r.returncode for r in other] == [2, 2]
    assert _error_line(other[0]) == _error_line(other[1])
    assert "rank 1 was given another run than rank 0 (top_k differ)" in _error_line(other[0])
    assert not out.exists()

    good = _cli_ranks([[*common, "--data", str(LONG)]] * 2)
    assert [r.returncode for r in good] == [0, 0], good[1].stderr
    assert "done:" in good[0].stderr and "done:" not in good[1].stderr
    parts = _parts(out)
    changed = _cli_ranks([[*common, "--data", str(LONG), "--modules", "mlp"]] * 2)
    assert [r.returncode for r in changed] == [2, 2]
    assert _error_line(changed[0]) == _error_line(changed[1])
    assert "modules: was 'all', now 'mlp'" in _error_line(changed[0])
    assert _parts(out) == parts


@pytest.mark.slow
def test_study_under_two_ranks_spreads_cells_and_reports_once(tiny_model, tmp_path):
    study_file = write_study(tmp_path / "study.toml", tiny_model("llama"))
    out = tmp_path / "out"
    done = _torchrun(
        2, "-m", "gradspec", "study", str(study_file), "--out", str(out), "--bootstrap", "50"
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("report:") == 1 and (out / "report.html").exists()
    record = json.loads((out / "study.json").read_text())["cells"]
    assert all(cell["inputs"] is not None for cell in record)

    spec = load_study(study_file)
    run_study(spec, tmp_path / "single")
    for cell in spec.cells():
        spread = gradspec.load_run(out / cell.run)
        single = gradspec.load_run(tmp_path / "single" / cell.run)
        pd.testing.assert_frame_equal(spread.spectra, single.spectra)
        pd.testing.assert_frame_equal(spread.examples, single.examples)
        assert spread.manifest["sessions"][-1]["ranks"] == 1  # each cell by one rank alone
    rerun = _torchrun(
        2, "-m", "gradspec", "study", str(study_file), "--out", str(out), "--bootstrap", "50"
    )
    assert rerun.returncode == 0 and "0 cells; 2 already done" in rerun.stderr


def test_shard_fsdp_is_refused_where_it_cannot_work(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(GradspecError, match=r"--shard fsdp splits the model .* one process"):
        gradspec.profile(tiny_model("llama"), LONG, out, shard="fsdp", **OPTIONS)
    with pytest.raises(GradspecError, match="--shard zero: use one of none, fsdp, hsdp"):
        gradspec.profile(tiny_model("llama"), LONG, out, shard="zero", **OPTIONS)
    assert not out.exists()
    with pytest.raises(GradspecError, match="--method fast only"):
        check_shard(Shard.fsdp, Ranks(0, 2), Method.reference)
    check_shard(Shard.fsdp, Ranks(1, 2), Method.fast)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(GradspecError, match="4 ranks do not make nodes of 3"):
        check_shard(Shard.hsdp, Ranks(0, 4), Method.fast)
    check_shard(Shard.hsdp, Ranks(0, 6), Method.fast)


# Chunks of 4, 4 and 2 examples in batches of up to 3, with the IFD forward passes: the two
# ranks have different numbers and kinds of passes, so the sharded run must keep them in step.
UNEVEN = dict(limit=10, chunk_size=4, batch_size=3, ifd=True, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_a_model_sharded_over_two_ranks_gives_the_unsharded_tables_bit_for_bit(
    arch, tiny_model, tmp_path
):
    """FSDP2 all-gathers exact copies of the weights before each layer runs, and each
    rank's batches are the ones a single process forms, so on CPU nothing changes a bit;
    DeepSeek-V3's routed experts (fused weights) and router included."""
    model = tiny_model(arch)
    one = _profile(1, model, tmp_path / "one", options=UNEVEN)
    assert one.returncode == 0, one.stderr
    two = _profile(2, model, tmp_path / "two", options={**UNEVEN, "shard": "fsdp"})
    assert two.returncode == 0, two.stderr
    sharded, unsharded = gradspec.load_run(tmp_path / "two"), gradspec.load_run(tmp_path / "one")
    _assert_same_tables(sharded, unsharded)
    assert sharded.manifest["coverage"] == unsharded.manifest["coverage"]
    assert sharded.examples["ifd"].notna().all()
    assert sharded.manifest["sessions"][-1] | {"started": 0, "ended": 0} == {
        "started": 0,
        "ended": 0,
        "ranks": 2,
        "shard": "fsdp",
        "routes": {"route": "cost", "measured": []},
    }


def test_shard_model_makes_each_decoder_layer_and_the_rest_an_fsdp2_group(tiny_model, tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
        shard_model(model, torch.device("cpu"), Ranks(0, 1), Shard.fsdp)
        groups = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
        assert groups == ["", "model.layers.0", "model.layers.1"]
        assert all(isinstance(p, DTensor) for p in model.parameters())
        with pytest.raises(GradspecError, match="Linear names no decoder layer class"):
            shard_model(torch.nn.Linear(2, 2), torch.device("cpu"), Ranks(0, 1), Shard.fsdp)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("shard", ["none", "fsdp"])
def test_two_gpu_ranks_with_nccl_equal_one_gpu(shard, tiny_model, tmp_path):
    """Where GPUs are lent: `pytest tests/test_distributed.py -k gpu` (one GPU per rank)."""
    options = {**OPTIONS, "device": "cuda"}
    for ranks in (1, 2):
        sharding = {"shard": shard} if ranks == 2 else {}
        out = tmp_path / str(ranks)
        done = _profile(ranks, tiny_model("llama"), out, options={**options, **sharding})
        assert done.returncode == 0, done.stderr
    one, two = (gradspec.load_run(tmp_path / str(ranks)) for ranks in (1, 2))
    assert two.manifest["device"] in ("cuda:0", "cuda:1")
    pd.testing.assert_frame_equal(one.examples, two.examples, rtol=1e-4)
    pd.testing.assert_frame_equal(one.spectra, two.spectra, rtol=1e-4)
