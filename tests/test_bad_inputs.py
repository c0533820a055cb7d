"""Bad inputs and unlucky sequences (issue 24): nothing a user types destroys data, ends in
a traceback or silently gives a wrong result. One test per defect of the issue, then the
guarantees behind them: atomic writes, one writer per run, damaged runs diagnosed."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import GSM8K, read_shared
from typer.testing import CliRunner

import gradspec
from gradspec.cli import app, run
from gradspec.data import load_examples
from gradspec.errors import DataError, GradspecError, GradspecWarning
from gradspec.options import ProfileOptions
from gradspec.report import write_report
from gradspec.selection import parse_keep, select

N_RECORDS, LIMIT, CHUNK = 6, 4, 2


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    """(model, data, run): the first LIMIT of N_RECORDS GSM8K records, in chunks of CHUNK."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_jsonl(root / "d.jsonl", read_shared(GSM8K, N_RECORDS))
    model, run = tiny_model("llama"), root / "run"
    gradspec.profile(model, data, run, device="cpu", limit=LIMIT, chunk_size=CHUNK)
    return model, data, run


@pytest.fixture
def run_copy(made, tmp_path):
    """A copy of the made run, to damage."""
    model, data, run = made
    return model, data, Path(shutil.copytree(run, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def tables_equal(a, b) -> None:
    pd.testing.assert_frame_equal(a.examples, b.examples)
    pd.testing.assert_frame_equal(a.spectra, b.spectra)


def first_part(run: Path, folder: str) -> Path:
    return sorted((run / folder).glob("part-*.parquet"))[0]


def cli(*args: object):
    """Run a command in-process; returns the click result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_refusal(result, match: str = "") -> None:
    """Exit 2, no traceback, exactly one 'error:' line (containing ``match``)."""
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), result.exception
    assert_one_error_line(output, match)


def assert_one_error_line(output: str, match: str) -> None:
    """No traceback and exactly one 'error:' line, containing ``match``."""
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert match in errors[0], output


# ---------------------------------------------------------------- data loss (1-4)


def test_1_a_sidecar_that_is_the_input_is_refused(made, tmp_path):
    _, data, run = made
    before = data.read_bytes()
    with pytest.raises(GradspecError, match=r"--sidecar .* is an input data file"):
        select(run, data, tmp_path / "k.jsonl", "0.5", sidecar=data)
    assert data.read_bytes() == before and not (tmp_path / "k.jsonl").exists()


@pytest.mark.parametrize("link", [os.link, os.symlink])
def test_2_an_output_linked_to_the_input_is_refused(link, made, tmp_path):
    _, data, run = made
    before = data.read_bytes()
    out = tmp_path / "k.jsonl"
    link(data, out)
    with pytest.raises(GradspecError, match=r"--out .* is an input data file"):
        select(run, data, out, "0.5")
    assert data.read_bytes() == before


def test_2_an_output_is_replaced_by_rename_so_its_other_links_keep_the_old_bytes(made, tmp_path):
    _, data, run = made
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("old\n")
    out = tmp_path / "k.jsonl"
    os.link(elsewhere, out)
    select(run, data, out, "0.5")
    assert elsewhere.read_text() == "old\n"
    assert out.read_text() != "old\n" and len(out.read_text().splitlines()) == LIMIT // 2


def test_3_outputs_inside_a_run_directory_are_refused(made, tmp_path):
    model, data, run = made
    before = snapshot(run)
    with pytest.raises(GradspecError, match="inside the run directory"):
        select(run, data, run / "manifest.json", "0.5")
    with pytest.raises(GradspecError, match="inside the run directory"):
        select(run, data, tmp_path / "k.jsonl", "0.5", sidecar=run / "examples" / "why.csv")
    with pytest.raises(GradspecError, match="inside the run directory"):
        write_report([run], run / "report.html", n_boot=10)
    with pytest.raises(GradspecError, match="inside the run directory"):
        gradspec.profile(model, data, run / "nested", device="cpu", limit=1)
    assert_one_line_refusal(cli("score", run, "--out", run / "spectra" / "s.parquet"), "inside")
    assert snapshot(run) == before


def test_4_a_second_writer_is_refused_and_touches_nothing(run_copy):
    """While one process writes a chunk (its spectra part is in place, its examples part not
    yet), a second profile of the same run must not clean that part up as a leftover."""
    model, data, run = run_copy
    in_progress = run / "spectra" / "part-000000004-000000005.parquet"
    shutil.copy(first_part(run, "spectra"), in_progress)
    before = snapshot(run)
    with (run / ".lock").open("a") as held:  # the first writer's lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(GradspecError, match="being written by another gradspec process"):
            gradspec.profile(model, data, run, device="cpu", chunk_size=CHUNK)
        assert snapshot(run) == before
    tables = gradspec.profile(model, data, run, device="cpu", chunk_size=CHUNK)
    assert list(tables.examples["example_index"]) == list(range(N_RECORDS))


# ---------------------------------------------------------------- tracebacks (5-11)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_5_bytes_that_are_not_utf8_name_the_file_and_line(name, tmp_path):
    path = tmp_path / name
    head = "[\n" if name == "d.json" else ""
    good, bad = b'{"instruction": "a", "output": "b"}\n', b'{"instruction": "\xff"}'
    path.write_bytes(head.encode() + good + bad)
    with pytest.raises(DataError, match=rf"{name}:{2 + bool(head)}: not UTF-8 text \(byte 0xff"):
        load_examples(path)


def test_a_refusal_from_inside_profile_draws_no_progress_bar(made, tmp_path):
    """Refused before any example is profiled (here: another writer holds the run), the
    command prints its error line and no empty progress bar ("profiling 0/?")."""
    model, data, _ = made
    run = tmp_path / "run"
    run.mkdir()
    with (run / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = cli("profile", "--model", model, "--data", data, "--out", run, "--device", "cpu")
    assert_one_line_refusal(result, "being written by another gradspec process")
    assert "profiling" not in result.output


@pytest.mark.parametrize("device", ["tpu", "mps", "cuda:x"])
def test_6_a_device_this_machine_lacks_is_a_clear_error(device, made, tmp_path):
    model, data, _ = made
    with pytest.raises(GradspecError, match=f"--device {device}"):
        gradspec.profile(model, data, tmp_path / "run", device=device, limit=1)
    assert not (tmp_path / "run").exists()


def refuse_renames(monkeypatch) -> None:
    """Every rename fails as on a read-only folder (tests run as root, who may write it)."""

    def read_only(source, target, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(os, "replace", read_only)


def test_7_a_read_only_run_or_output_is_a_clear_error(run_copy, tmp_path, monkeypatch):
    model, data, run = run_copy
    before = snapshot(run)
    refuse_renames(monkeypatch)
    read_back = gradspec.profile(model, data, run, device="cpu", limit=LIMIT, chunk_size=CHUNK)
    assert read_back.examples["example_index"].tolist() == list(range(LIMIT))  # nothing written
    with pytest.raises(GradspecError, match=r"cannot write .*manifest.json: Permission denied"):
        gradspec.profile(model, data, run, device="cpu", limit=2, chunk_size=CHUNK)
    with pytest.raises(GradspecError, match=r"cannot write .*k.jsonl: Permission denied"):
        select(run, data, tmp_path / "k.jsonl", "0.5")
    assert_one_line_refusal(cli("score", run), "Permission denied")
    assert snapshot(run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only folders")
def test_7_a_read_only_folder_is_a_clear_error(made, tmp_path):
    model, data, _ = made
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(GradspecError, match="Permission denied"):
        gradspec.profile(model, data, folder / "run", device="cpu", limit=1)


def test_8_an_out_that_is_a_file_is_a_clear_error(made, tmp_path):
    model, data, _ = made
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    with pytest.raises(GradspecError, match="is a file, not a run directory"):
        gradspec.profile(model, data, out, device="cpu", limit=1)
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{garbage", r"manifest.json:1: not JSON"),
        ("", r"manifest.json: empty"),
        ("[1, 2]", r"manifest.json: a JSON list, not an object"),
        ("{}", r"manifest.json: no 'fingerprint'"),
    ],
)
def test_9_a_damaged_manifest_is_named_by_every_command(content, message, run_copy):
    model, data, run = run_copy
    (run / "manifest.json").write_text(content)
    with pytest.raises(GradspecError, match=message):
        gradspec.load_run(run)
    with pytest.raises(GradspecError, match=message):
        gradspec.profile(model, data, run, device="cpu", limit=LIMIT, chunk_size=CHUNK)
    for args in (["score", run], ["flag", run], ["report", run, "--out", run.parent / "r.html"]):
        assert_one_line_refusal(cli(*args), "manifest.json")


@pytest.mark.parametrize("damage", ["delete", "truncate"])
@pytest.mark.parametrize("folder", ["examples", "spectra"])
def test_10_a_lost_part_is_named_and_profile_redoes_its_chunk(damage, folder, made, run_copy):
    model, data, run = run_copy
    part = first_part(run, folder)
    if damage == "delete":
        part.unlink()
    else:
        part.write_bytes(part.read_bytes()[:-20])
    if not (folder == "examples" and damage == "delete"):  # that reads as unfinished
        with pytest.raises(GradspecError, match=r"damaged chunk.*part-000000000-000000001"):
            gradspec.load_run(run)
        assert_one_line_refusal(cli("score", run), "gradspec check")
    redone = gradspec.profile(model, data, run, device="cpu", limit=LIMIT, chunk_size=CHUNK)
    tables_equal(redone, gradspec.load_run(made[2]))
    assert cli("check", run).exit_code == 0


def test_11_a_report_of_runs_without_spectra_is_refused_and_writes_nothing(made, tmp_path):
    model, _, _ = made
    empty = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "Say", "output": " "}])
    gradspec.profile(model, empty, tmp_path / "run", device="cpu")
    out = tmp_path / "report" / "r.html"
    with pytest.raises(GradspecError, match="no profiled examples"):
        write_report([tmp_path / "run"], out, n_boot=10)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_11_runs_without_spectra_are_left_out_of_a_report_with_a_warning(made, tmp_path):
    model, _, run = made
    empty = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "Say", "output": " "}])
    gradspec.profile(model, empty, tmp_path / "empty", device="cpu")
    with pytest.warns(GradspecWarning, match="left out of the report.*empty"):
        write_report([run, tmp_path / "empty"], tmp_path / "r.html", n_boot=10)
    assert (tmp_path / "r.html").is_file()


# ---------------------------------------------------------------- silent wrong results (12-14)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_12_a_unicode_line_separator_inside_a_jsonl_string_is_text(separator, tmp_path):
    records = [
        {"instruction": f"a{separator}b", "output": "c"},
        {"instruction": "d", "output": "e"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    examples = load_examples(path)
    assert [ex.record for ex in examples] == records
    assert [ex.line for ex in examples] == [1, 2]


def test_a_lone_surrogate_is_refused_in_one_line_naming_its_field(tmp_path):
    path = tmp_path / "d.jsonl"
    record = {"instruction": "a", "output": "b", "notes": {"x\ny": "\ud800"}}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'notes.x\\ny': holds a lone") as refused:
        load_examples(path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("option", ["--out", "--sidecar"])
def test_13_a_table_name_other_than_parquet_or_csv_is_refused(option, made, tmp_path):
    _, data, run = made
    if option == "--out":
        assert_one_line_refusal(cli("score", run, "--out", tmp_path / "x.json"), ".parquet or .csv")
        assert_one_line_refusal(cli("flag", run, "--out", tmp_path / "x.txt"), ".parquet or .csv")
    else:
        args = ["select", run, "--data", data, "--keep", "0.5", "--out", tmp_path / "k.jsonl"]
        result = cli(*args, "--sidecar", tmp_path / "x.json")
        assert_one_line_refusal(result, ".parquet or .csv")
    assert not list(tmp_path.glob("x.*"))


def test_14_a_negative_top_is_refused(made):
    assert_one_line_refusal(cli("flag", made[2], "--top", "-1"), "--top -1")


# ---------------------------------------------------------------- unclear (15-19)


def test_15_an_empty_data_file_is_refused_before_a_run_exists(made, tmp_path):
    model, _, _ = made
    empty = tmp_path / "d.json"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"d.json: empty: no records"):
        gradspec.profile(model, empty, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


def test_16_a_pretty_printed_object_is_named_as_such(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}, indent=2))
    with pytest.raises(DataError, match="one JSON object over several lines, not records"):
        load_examples(path)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """One short example and one of several thousand tokens."""
    records = read_shared(GSM8K, 2)
    records[1] = {**records[1], "output": " ".join([records[1]["output"]] * 30)}
    return write_jsonl(tmp_path_factory.mktemp("long") / "long.jsonl", records)


def test_17_an_example_longer_than_the_context_is_truncated_to_it_with_a_warning(
    made, long_data, tmp_path
):
    model = made[0]
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    warning = rf"1 example\(s\) longer than the model's context \({context} tokens\).*long"
    with pytest.warns(GradspecWarning, match=warning):
        tables = gradspec.profile(model, long_data, tmp_path / "run", device="cpu")
    assert tables.examples["truncated"].tolist() == [False, True]
    examples = tables.examples
    assert (examples["n_prompt_tokens"] + examples["n_response_tokens"])[1] == context
    manifest = tables.manifest
    assert manifest["options"]["max_length"] == context
    assert manifest["model"]["context_length"] == context
    # An unset --max-length stays unset in the fingerprint, so runs made before the
    # context became the default resume.
    assert manifest["fingerprint"]["max_length"] is None


def test_17_a_stated_max_length_warns_of_longer_examples_and_of_exceeding_the_context(
    made, long_data, tmp_path
):
    model = made[0]
    with pytest.warns(GradspecWarning, match=r"2 example\(s\) longer than --max-length 64"):
        gradspec.profile(model, long_data, tmp_path / "a", device="cpu", max_length=64)
    with pytest.warns(GradspecWarning, match="--max-length 100000 exceeds the model's context"):
        gradspec.profile(model, long_data, tmp_path / "b", device="cpu", max_length=100000, limit=1)


@pytest.mark.parametrize(
    ("options", "named", "not_named"),
    [
        (dict(token_budget=0), "--token-budget must be at least 1", "top-k"),
        (dict(top_k=-1), "--top-k must be at least 0", "budget"),
    ],
)
def test_18_each_bad_number_is_named_alone(options, named, not_named):
    with pytest.raises(GradspecError, match=named) as refused:
        ProfileOptions(**options)
    assert not_named not in str(refused.value)


def test_19_keep_is_a_count_when_an_integer_and_the_unprofiled_are_counted(made, tmp_path):
    _, data, run = made
    assert parse_keep("1", 10) == 1 and parse_keep("1.0", 10) == 10
    assert "1.0" in cli("select", "--help").output
    result = cli("select", run, "--data", data, "--keep", "1", "--out", tmp_path / "k.jsonl")
    assert result.exit_code == 0, result.output
    unprofiled = N_RECORDS - LIMIT
    assert f"kept 1 of {N_RECORDS} examples ({LIMIT} profiled, {unprofiled} never" in result.output


# ---------------------------------------------------------------- damaged runs: check


def test_check_names_every_problem_and_passes_a_sound_run(run_copy, made):
    _, _, run = run_copy
    assert cli("check", made[2]).exit_code == 0
    (first_part(run, "spectra")).unlink()
    last = sorted((run / "examples").glob("part-*.parquet"))[-1]
    last.write_bytes(b"PAR1 not really")
    result = cli("check", run)
    assert_one_line_refusal(result, "1 of 1 run(s) have problems")
    problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
    assert len(problems) == 3
    assert "part-000000000-000000001.parquet: missing" in problems[0]
    assert "part-000000002-000000003.parquet: truncated or unreadable" in problems[1]
    assert f"examples 0..{LIMIT - 1} have no intact part" in problems[2]


def test_check_names_examples_no_part_covers(run_copy):
    _, _, run = run_copy
    first_part(run, "examples").unlink()
    result = cli("check", run)
    assert_one_line_refusal(result)
    assert "examples 0..1 have no intact part" in result.output


@pytest.mark.parametrize("command", ["score", "flag"])
def test_scoring_a_run_without_example_rows_is_refused(command, run_copy):
    """Every examples part gone: score and flag refuse in one line (they said "0 examples
    scored" and exit 0), and write no table."""
    _, _, run = run_copy
    for part in (run / "examples").glob("part-*.parquet"):
        part.unlink()
    result = cli(command, run)
    assert_one_line_refusal(result, "the run has no example rows to score")
    assert not list(run.glob("*s.parquet"))


def test_a_run_parts_are_written_by_rename_only(run_copy, monkeypatch):
    """A write that fails midway leaves no part and no temporary file behind."""
    model, data, run = run_copy

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", fail)
    with pytest.raises(GradspecError, match="No space left on device"):
        gradspec.profile(model, data, run, device="cpu", chunk_size=CHUNK)
    assert not list(run.rglob("*.tmp"))
    assert len(list((run / "examples").glob("part-*"))) == LIMIT // CHUNK


# ---------------------------------------------------------------- every command, bad inputs


def damaged(run: Path, tmp: Path, how: str) -> Path:
    """A copy of ``run`` damaged as ``how`` says."""
    copy = Path(shutil.copytree(run, tmp / f"damaged-{how.replace(' ', '-')}"))
    manifests = {"garbage": "{garbage", "empty": "", "list": "[]", "object": "{}"}
    if how in manifests:
        (copy / "manifest.json").write_text(manifests[how])
    elif how == "missing part":
        first_part(copy, "spectra").unlink()
    elif how == "truncated part":
        part = first_part(copy, "examples")
        part.write_bytes(part.read_bytes()[:100])
    return copy


def bad_file(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


def hard_link(source: Path, link: Path) -> Path:
    os.link(source, link)
    return link


def no_spectra_run(model: Path, tmp: Path) -> Path:
    data = write_jsonl(tmp / "blank.jsonl", [{"instruction": "Say", "output": " "}])
    gradspec.profile(model, data, tmp / "blank-run", device="cpu")
    return tmp / "blank-run"


PROFILE = "profile --model {model} --data {data} --out {tmp}/new"
SELECT = "select {run} --data {data} --keep 0.5 --out {tmp}/k.jsonl"
# (command line with {model}, {data}, {run}, {tmp} filled in; the error line contains)
CASES: dict[str, tuple[str, str]] = {
    "profile: data not UTF-8": (
        "profile --model {model} --data {latin1} --out {tmp}/new",
        "not UTF-8 text",
    ),
    "profile: empty data": ("profile --model {model} --data {empty} --out {tmp}/new", "empty"),
    "profile: one object": ("profile --model {model} --data {object} --out {tmp}/new", "object"),
    "profile: no data": ("profile --model {model} --data {tmp}/none.json --out {tmp}/n", "no data"),
    "profile: no model": ("profile --model {tmp} --data {data} --out {tmp}/new", "--model"),
    "profile: device tpu": (PROFILE + " --device tpu", "--device tpu"),
    "profile: device mps": (PROFILE + " --device mps", "--device mps"),
    "profile: out a file": ("profile --model {model} --data {data} --out {data}", "is a file"),
    "profile: out in a run": ("profile --model {model} --data {data} --out {run}/x", "inside"),
    "profile: token budget 0": (PROFILE + " --token-budget 0", "--token-budget must"),
    "profile: top-k -1": (PROFILE + " --top-k -1", "--top-k must"),
    "profile: limit 0": (PROFILE + " --limit 0", "--limit must"),
    "profile: other options": (
        "profile --model {model} --data {data} --out {run} --modules mlp",
        "other inputs",
    ),
    "profile: damaged manifest": (
        "profile --model {model} --data {data} --out {garbage}",
        "manifest.json:1: not JSON",
    ),
    "score: garbage manifest": ("score {garbage}", "not JSON"),
    "score: empty manifest": ("score {empty_manifest}", "empty"),
    "score: list manifest": ("score {list_manifest}", "not an object"),
    "score: {} manifest": ("score {object_manifest}", "no 'fingerprint'"),
    "score: missing part": ("score {missing_part}", "missing"),
    "score: truncated part": ("score {truncated_part}", "truncated or unreadable"),
    "score: no run": ("score {tmp}/nowhere", "not a gradspec run directory"),
    "score: out .json": ("score {run} --out {tmp}/x.json", ".parquet or .csv"),
    "score: out in a run": ("score {run} --out {run}/examples/x.parquet", "inside"),
    "flag: top -1": ("flag {run} --top -1", "--top -1"),
    "flag: no labels file": ("flag {run} --labels {tmp}/none.csv", "--labels"),
    "flag: labels without label": ("flag {run} --labels {data}", "--labels"),
    "flag: damaged": ("flag {missing_part}", "damaged chunk"),
    "select: sidecar the input": (SELECT + " --sidecar {data}", "is an input data file"),
    "select: out a hard link": (
        "select {run} --data {data} --keep 0.5 --out {linked}",
        "is an input data file",
    ),
    "select: out the manifest": (
        "select {run} --data {data} --keep 0.5 --out {run}/manifest.json",
        "inside the run directory",
    ),
    "select: sidecar .json": (SELECT + " --sidecar {tmp}/x.json", ".parquet or .csv"),
    "select: keep 0": ("select {run} --data {data} --keep 0 --out {tmp}/k.jsonl", "--keep 0"),
    "select: keep 1.5": ("select {run} --data {data} --keep 1.5 --out {tmp}/k.jsonl", "--keep"),
    "select: keep abc": ("select {run} --data {data} --keep abc --out {tmp}/k.jsonl", "--keep"),
    "select: by unknown": (SELECT + " --by nothing", "--by nothing"),
    "select: other data": (
        "select {run} --data {empty} --keep 0.5 --out {tmp}/k.jsonl",
        "not the data this run profiled",
    ),
    "report: no spectra": ("report {blank_run} --out {tmp}/r.html", "no profiled examples"),
    "report: no run": ("report {tmp}/nowhere --out {tmp}/r.html", "not a gradspec run"),
    "report: out in a run": ("report {run} --out {run}/r.html", "inside"),
    "report: damaged": ("report {truncated_part} --out {tmp}/r.html", "damaged chunk"),
    "report: bad label": ("report {run} --out {tmp}/r.html --label nolabel", "KEY=VALUE"),
    "study: not TOML": ("study {latin1} --out {tmp}/s", ""),
    "study: no file": ("study {tmp}/none.toml --out {tmp}/s", ""),
    "study: out a file": ("study {study} --out {data}", "is a file"),
    "study: damaged record": ("study {study} --out {bad_study}", "study.json"),
    "study: limit 0": ("study {study} --out {tmp}/s --limit 0", "--limit must"),
    "check: no run": ("check {tmp}/nowhere", "problems"),
    "check: damaged": ("check {truncated_part}", "problems"),
    "demo: limit 0": ("demo --limit 0", "--limit must"),
}


@pytest.fixture(scope="module")
def places(made, tmp_path_factory):
    """What the cases' command lines name: the made run, damaged copies, bad files."""
    model, data, run = made
    tmp = tmp_path_factory.mktemp("cases")
    study = bad_file(
        tmp,
        "s.toml",
        f'[[models]]\nlabel = "m"\npath = "{model}"\n'
        f'[[datasets]]\npath = "{data}"\ntask = "gsm8k"\nstyle = "detailed"\n'.encode(),
    )
    bad_study = tmp / "bad-study"
    bad_study.mkdir()
    (bad_study / "study.json").write_text("[")
    return {
        "model": model,
        "data": data,
        "run": run,
        "latin1": bad_file(tmp, "latin1.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n'),
        "empty": bad_file(tmp, "empty.json", b""),
        "object": bad_file(tmp, "object.json", b'{\n  "instruction": "a",\n  "output": "b"\n}\n'),
        "garbage": damaged(run, tmp, "garbage"),
        "empty_manifest": damaged(run, tmp, "empty"),
        "list_manifest": damaged(run, tmp, "list"),
        "object_manifest": damaged(run, tmp, "object"),
        "missing_part": damaged(run, tmp, "missing part"),
        "truncated_part": damaged(run, tmp, "truncated part"),
        "linked": hard_link(data, tmp / "linked.jsonl"),
        "blank_run": no_spectra_run(model, tmp),
        "study": study,
        "bad_study": bad_study,
    }


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_refuses_bad_input_in_one_line_with_exit_2(case, places, tmp_path):
    line, match = CASES[case]
    before = {name: snapshot(path) for name, path in places.items() if Path(path).is_dir()}
    args = line.format(**places, tmp=tmp_path).split()
    assert_one_line_refusal(cli(*args), match)
    after = {name: snapshot(path) for name, path in places.items() if Path(path).is_dir()}
    assert after == before


USAGE_ERRORS = {
    "profile --model m --data d --out o --template markdown": "'--template'",
    "flag RUN --top many": "'--top'",
    "score": "Missing argument",
    "report": "Missing argument",
    "nosuch": "No such command 'nosuch'",
    "profile --no-such-option": "No such option: --no-such-option",
}


@pytest.mark.parametrize("line", USAGE_ERRORS)
def test_values_typer_refuses_are_one_line_and_exit_2(line, capsys):
    """Values Typer itself checks (choices, numbers, missing arguments, unknown commands and
    options) are refused as every other input is: one 'error:' line naming the command."""
    with pytest.raises(SystemExit) as exited:
        run(line.split())
    output = capsys.readouterr()
    assert exited.value.code == 2 and output.out == ""
    assert_one_error_line(output.err, USAGE_ERRORS[line])
    assert "Usage:" not in output.err and "Traceback" not in output.err


@pytest.mark.parametrize("name", ["runs[/old]", "runs[old]", "a[bold]b", "old:x:"])
def test_text_that_looks_like_markup_is_printed_as_typed(name, tmp_path, capsys):
    """A path (or any text in a message) holding square brackets or an emoji code is
    printed as it is, not read as Rich markup (which raised MarkupError, or ate the
    brackets) or as an emoji (":x:" became a cross)."""
    with pytest.raises(SystemExit) as exited:
        run(["score", str(tmp_path / name)])
    assert exited.value.code == 2
    assert_one_error_line(capsys.readouterr().err, str(tmp_path / name))


@pytest.mark.parametrize(("raised", "says"), [(KeyboardInterrupt, ""), (EOFError, "aborted")])
def test_an_interrupted_command_exits_130_without_a_traceback(
    raised, says, monkeypatch, tmp_path, capsys
):
    """Ctrl-C (Typer: exit 130) and end of input (Typer: Abort) end as a shell expects."""

    def interrupted(*args, **kwargs):
        raise raised

    monkeypatch.setattr("gradspec.store.load_run", interrupted)
    with pytest.raises(SystemExit) as exited:
        run(["score", str(tmp_path)])
    err = capsys.readouterr().err
    assert exited.value.code == 130 and "Traceback" not in err
    assert (f"error: {says}" in err) if says else "error:" not in err


def test_the_installed_command_refuses_usage_errors_in_one_line():
    """`python -m gradspec` (as the `gradspec` script) goes through the same entry point;
    help and the version still exit 0."""
    command = [sys.executable, "-m", "gradspec"]
    bad = subprocess.run([*command, "flag", "RUN", "--top", "many"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert_one_error_line(bad.stderr, "gradspec flag: Invalid value for '--top'")
    helped = subprocess.run([*command, "flag", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--top" in helped.stdout
    assert subprocess.run([*command, "--version"], capture_output=True).returncode == 0
    bare = subprocess.run(command, capture_output=True, text=True)  # no command: the help
    assert bare.returncode == 2 and "profile" in bare.stdout + bare.stderr


def test_the_training_monitor_holds_its_run_directory_lock(tmp_path):
    from gradspec.distributed import LOCAL
    from gradspec.files import RunLock
    from gradspec.integrations.sinks import MonitorRun, RunDirectory

    monitor = RunDirectory.open(MonitorRun(tmp_path / "train", [], {}, str(tmp_path), LOCAL))
    with pytest.raises(GradspecError, match="being written by another gradspec process"):
        RunLock(tmp_path / "train").acquire()
    monitor.close()
    other = RunLock(tmp_path / "train")
    other.acquire()
    other.release()


def test_check_of_a_study_folder_checks_each_started_cell(made, tmp_path):
    run = made[2]
    for name in ("a", "b"):
        shutil.copytree(run, tmp_path / "study" / name)
    first_part(tmp_path / "study" / "b", "spectra").unlink()
    cells = [{"name": n, "run": n, "labels": {}} for n in ("a", "b")]
    (tmp_path / "study" / "study.json").write_text(json.dumps({"cells": cells}))
    result = cli("check", tmp_path / "study")
    assert_one_line_refusal(result, "1 of 2 run(s) have problems")
    assert f"ok: {tmp_path / 'study' / 'a'}" in result.output
