"""Selection: byte-exact output per input format, refusals, reasons, facility location."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import GSM8K, SHARED_DATA, read_shared
from typer.testing import CliRunner

import gradspec
from gradspec.cli import app
from gradspec.data import Example
from gradspec.errors import DataError, GradspecError
from gradspec.formats.json_array import parse_json_array, render_json_array
from gradspec.selection import (
    greedy_facility_location,
    parse_keep,
    rank_eligible,
    rank_within,
    rbf_similarity,
    select,
    strata_of,
)

N = 8


def alpaca_array(path: Path, records: list[dict]) -> Path:
    """Formatted as the shared data: json.dump with indent=4, no final newline."""
    path.write_text(json.dumps(records, indent=4))
    return path


def alpaca_jsonl(path: Path, records: list[dict]) -> Path:
    """Unicode kept as is and unusual spacing, so re-serialising could not reproduce it."""
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False, separators=(" ,", ":  ")) + "\n" for r in records)
    )
    return path


def chat_jsonl(path: Path, records: list[dict]) -> Path:
    """Chat messages, CRLF line ends, no newline after the last line."""
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["output"]},
                ]
            }
        )
        for r in records
    ]
    path.write_bytes("\r\n".join(lines).encode())
    return path


FORMATS = {"alpaca.json": alpaca_array, "alpaca.jsonl": alpaca_jsonl, "chat.jsonl": chat_jsonl}


@pytest.fixture(scope="module")
def profiled(tiny_model, tmp_path_factory):
    """Per format: (data file, run directory) of the first N gsm8k records, all profiled."""
    root = tmp_path_factory.mktemp("select")
    records = read_shared(GSM8K, N)
    runs = {}
    for name, write in FORMATS.items():
        data = write(root / name, records)
        template = "chat" if name.startswith("chat") else "plain"
        run = root / f"run-{name}"
        gradspec.profile(tiny_model("llama"), data, run, device="cpu", template=template)
        runs[name] = (data, run)
    return runs


def expected_output(name: str, data: Path, kept: list[int]) -> bytes:
    """The kept records written independently of the code under test."""
    if name == "alpaca.json":
        return json.dumps([json.loads(data.read_text())[i] for i in kept], indent=4).encode()
    lines = data.read_bytes().splitlines(keepends=True)
    chosen = [lines[i].rstrip(b"\r\n") for i in kept]
    separator = b"\r\n" if b"\r\n" in lines[0] else b"\n"
    final = separator if data.read_bytes().endswith(b"\n") else b""
    return separator.join(chosen) + final if chosen else b""


@pytest.mark.parametrize("name", list(FORMATS))
def test_keeping_everything_reproduces_the_input_bytes(name, profiled, tmp_path):
    data, run = profiled[name]
    out = tmp_path / f"out-{name}"
    selection = select(run, data, out, keep="1.0", by="loss")
    assert out.read_bytes() == data.read_bytes()
    assert selection.report["kept"].all() and len(selection.report) == N


@pytest.mark.parametrize("name", list(FORMATS))
def test_kept_records_are_the_best_by_score_in_input_order(name, profiled, tmp_path):
    data, run = profiled[name]
    out = tmp_path / f"out-{name}"
    select(run, data, out, keep="3", by="loss")
    losses = gradspec.load_run(run).examples["loss"].to_numpy()
    best = sorted(np.argsort(losses)[:3].tolist())
    assert out.read_bytes() == expected_output(name, data, best)
    select(run, data, out, keep="3", by="loss", prefer="high")
    assert out.read_bytes() == expected_output(name, data, sorted(np.argsort(losses)[-3:]))


def test_sidecar_explains_every_example(profiled, tmp_path):
    data, run = profiled["alpaca.json"]
    out = tmp_path / "kept.json"
    selection = select(run, data, out, keep="0.25", by="flag")
    sidecar = pd.read_csv(tmp_path / "kept.selection.csv")
    assert selection.sidecar == tmp_path / "kept.selection.csv"
    assert sidecar["kept"].sum() == 2 and len(sidecar) == N
    flags = sidecar.sort_values("flag")
    assert flags["kept"].tolist() == [True] * 2 + [False] * (N - 2)
    assert flags["rank"].tolist() == list(range(1, N + 1))
    assert flags["reason"].iloc[0] == f"kept: rank 1 of {N} by flag (lowest first)"
    assert flags["reason"].iloc[-1].startswith(f"dropped: rank {N} of {N} by flag")


def test_changed_data_is_refused(profiled, tmp_path):
    data, run = profiled["alpaca.jsonl"]
    changed = tmp_path / data.name
    original = data.read_text()
    assert "Pete" in original
    changed.write_text(original.replace("Pete", "Peter", 1))
    with pytest.raises(GradspecError, match=f"{changed}: not the data this run profiled"):
        select(run, changed, tmp_path / "out.jsonl", keep="2")
    with pytest.raises(GradspecError, match="is an input data file"):
        select(run, data, data, keep="2")


def test_unscored_examples_are_dropped_with_their_reason(tiny_model, tmp_path):
    records = read_shared(GSM8K, 4)
    records[1] = {**records[1], "output": " "}
    data = alpaca_array(tmp_path / "d.json", records)
    run = tmp_path / "run"
    gradspec.profile(tiny_model("llama"), data, run, device="cpu", limit=3)
    report = select(run, data, tmp_path / "out.json", keep="5", by="ifd").report
    assert report["reason"].tolist() == [
        "dropped: no ifd score (profile with --ifd to record it)",
        "dropped: the profile skipped it (empty_response)",
        "dropped: no ifd score (profile with --ifd to record it)",
        "dropped: not profiled in this run (beyond its --limit, or the run is unfinished)",
    ]
    assert (tmp_path / "out.json").read_text() == "[]"
    report = select(run, data, tmp_path / "out.json", keep="5", by="loss").report
    assert report["kept"].tolist() == [True, False, True, False]
    assert json.loads((tmp_path / "out.json").read_text()) == [records[0], records[2]]


def test_a_directory_of_files_is_written_file_by_file(tiny_model, tmp_path):
    records = read_shared(GSM8K, 5)
    folder = tmp_path / "data"
    folder.mkdir()
    first = alpaca_jsonl(folder / "a.jsonl", records[:3])
    second = alpaca_array(folder / "b.json", records[3:])
    gradspec.profile(tiny_model("llama"), folder, tmp_path / "run", device="cpu")
    selection = select(tmp_path / "run", folder, tmp_path / "out", keep="1.0")
    assert selection.outputs == [tmp_path / "out" / "a.jsonl", tmp_path / "out" / "b.json"]
    assert (tmp_path / "out" / "a.jsonl").read_bytes() == first.read_bytes()
    assert (tmp_path / "out" / "b.json").read_bytes() == second.read_bytes()
    assert selection.sidecar == tmp_path / "out" / "selection.csv"


def test_empty_and_one_example_runs(tiny_model, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]\n")
    gradspec.profile(tiny_model("llama"), empty, tmp_path / "run0", device="cpu")
    selection = select(tmp_path / "run0", empty, tmp_path / "out0.json", keep="0.5")
    assert (tmp_path / "out0.json").read_text() == "[]\n" and selection.report.empty
    one = alpaca_jsonl(tmp_path / "one.jsonl", read_shared(GSM8K, 1))
    gradspec.profile(tiny_model("llama"), one, tmp_path / "run1", device="cpu")
    for diverse in (False, True):
        select(tmp_path / "run1", one, tmp_path / "out1.jsonl", keep="1", diverse=diverse)
        assert (tmp_path / "out1.jsonl").read_bytes() == one.read_bytes()


def test_diverse_selection_keeps_n_from_the_quality_pool(profiled, tmp_path):
    data, run = profiled["chat.jsonl"]
    report = select(
        run, data, tmp_path / "out.jsonl", keep="2", by="loss", diverse=True, pool=2.0
    ).report
    kept = report[report["kept"]]
    assert len(kept) == 2 and kept["rank"].max() <= 4
    in_pool = report[(report["rank"] <= 4) & ~report["kept"]]
    assert in_pool["reason"].str.contains("covered by kept example").all()
    assert report.loc[report["rank"] > 4, "reason"].str.contains("outside the best 4").all()


def test_ranking_within_strata_spreads_the_best_over_the_strata_by_size():
    # Stratum "answer" (0-3) has the largest scores, so the pooled ranking puts all of
    # "cot" (4-11) first; within strata each example is placed by its rank / stratum size.
    scores = pd.DataFrame(
        {
            "example_index": range(13),
            "loss": [13.0, 10, 12, 11, 8, 1, 7, 2, 6, 3, 5, 4, np.nan],
        }
    )
    strata = pd.Series(["answer"] * 4 + ["cot"] * 8 + ["answer"])
    ranked = rank_eligible(scores, "loss", "low")
    assert list(ranked.index[:8]) == [5, 7, 9, 11, 10, 8, 6, 4]
    within = rank_within(ranked, strata)
    # Places: 5 1/8; 1 and 7 1/4; 9 3/8; 3 and 11 1/2; 10 5/8; 2 and 8 3/4; 6 7/8; 0 and 4 1.
    assert list(within.index) == [5, 1, 7, 9, 3, 11, 10, 2, 8, 6, 0, 4]
    assert within.to_dict() == ranked.to_dict()  # the scores themselves are unchanged
    assert sum(strata[i] == "answer" for i in within.index[:6]) == 2  # 6 x 4/12
    highest = rank_within(rank_eligible(scores, "loss", "high"), strata)
    assert list(highest.index) == [4, 0, 6, 8, 2, 10, 11, 3, 9, 7, 1, 5]


def test_strata_are_source_files_or_a_record_field():
    def example(index: int, source: str, record: dict) -> Example:
        return Example(index, source, index, index + 2, record, "alpaca")

    examples = [
        example(0, "a.json", {"instruction": "q", "output": "1", "style": "short"}),
        example(1, "b.json", {"instruction": "q", "output": "2", "style": "long"}),
    ]
    assert strata_of(examples, "source").to_dict() == {0: "a.json", 1: "b.json"}
    assert strata_of(examples, "style").to_dict() == {0: "short", 1: "long"}
    examples.append(example(2, "b.json", {"instruction": "q", "output": "3"}))
    with pytest.raises(DataError, match=r"^b\.json:4: field 'style': missing, so --within"):
        strata_of(examples, "style")


def test_select_within_a_field_keeps_the_best_of_each_stratum(tiny_model, tmp_path):
    records = [
        {**record, "style": "cot" if i < 4 else "answer"}
        for i, record in enumerate(read_shared(GSM8K, 6))
    ]
    data = alpaca_array(tmp_path / "d.json", records)
    run = tmp_path / "run"
    gradspec.profile(tiny_model("llama"), data, run, device="cpu")
    losses = gradspec.load_run(run).examples["loss"].to_numpy()
    best = [*sorted(np.argsort(losses[:4])[:2].tolist()), 4 + int(np.argmin(losses[4:]))]
    result = CliRunner().invoke(
        app,
        [
            *("select", str(run), "--data", str(data), "--keep", "3", "--by", "loss"),
            *("--within", "style", "--out", str(tmp_path / "k.json")),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "k.json").read_text()) == [records[i] for i in best]
    sidecar = pd.read_csv(tmp_path / "k.selection.csv")
    assert sidecar["stratum"].tolist() == ["cot"] * 4 + ["answer"] * 2
    assert sidecar.loc[sidecar["kept"], "example_index"].tolist() == best
    assert sidecar.loc[sidecar["rank"] == 1, "reason"].item() == (
        "kept: rank 1 of 6 by loss within style (lowest first)"
    )


@pytest.mark.parametrize(
    ("keep", "n", "expected"),
    [
        ("3", 10, 3),
        ("30", 10, 10),
        ("0.25", 10, 3),
        ("0.2", 10, 2),
        ("1.0", 7, 7),
        ("0.5", 0, 0),
        ("1", 5, 1),
    ],
)
def test_parse_keep(keep, n, expected):
    assert parse_keep(keep, n) == expected


@pytest.mark.parametrize("keep", ["0", "-2", "1.5", "0.0", "half"])
def test_parse_keep_rejects_nonsense(keep):
    with pytest.raises(GradspecError, match="--keep"):
        parse_keep(keep, 10)


def facility_value(similarity: np.ndarray, subset: tuple[int, ...]) -> float:
    return float(similarity[:, list(subset)].max(axis=1).sum()) if subset else 0.0


def test_greedy_facility_location_against_exhaustive_search():
    rng = np.random.default_rng(3)
    for _ in range(10):
        points = rng.normal(size=(6, 3))
        similarity = rbf_similarity(points)
        assert np.allclose(np.diag(similarity), 1) and np.allclose(similarity, similarity.T)
        chosen, gains = greedy_facility_location(similarity, 4)
        values = [facility_value(similarity, tuple(chosen[:k])) for k in range(5)]
        assert np.allclose(np.diff(values), gains) and all(g >= 0 for g in gains)
        assert all(a >= b - 1e-12 for a, b in itertools.pairwise(gains))  # diminishing
        for k in (1, 2, 3):
            best = max(facility_value(similarity, s) for s in itertools.combinations(range(6), k))
            assert values[k] >= (1 - 1 / math.e) * best
            if k == 1:
                assert values[1] == pytest.approx(best)


def test_rbf_bandwidth_is_the_median_squared_distance():
    points = np.array([[0.0], [1.0], [3.0]])
    # Squared distances 1, 9, 4: median 4.
    expected = np.exp(-np.array([[0, 1, 9], [1, 0, 4], [9, 4, 0]]) / 4.0)
    assert np.allclose(rbf_similarity(points), expected)


@pytest.mark.slow
def test_json_array_layout_of_every_shared_file_round_trips():
    """The shared files mix indent 2 and 4, escaped and raw Unicode: each keeps its own."""
    for path in sorted(SHARED_DATA.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        records = json.loads(text)
        layouts = [
            dict(indent=indent, ensure_ascii=ascii_only)
            for indent in (2, 4)
            for ascii_only in (True, False)
            if json.dumps(records, indent=indent, ensure_ascii=ascii_only) == text
        ]
        assert layouts, path
        raws = [record.raw for record in parse_json_array(str(path), text)]
        assert render_json_array(text, raws, raws) == text, path
        picked = [1, 4, len(raws) - 1]
        assert render_json_array(text, raws, [raws[i] for i in picked]) == json.dumps(
            [records[i] for i in picked], **layouts[0]
        ), path


def test_cli_select(profiled, tmp_path):
    data, run = profiled["alpaca.json"]
    result = CliRunner().invoke(
        app,
        [
            "select",
            str(run),
            "--data",
            str(data),
            "--keep",
            "4",
            "--by",
            "nuclear_norm",
            "--out",
            str(tmp_path / "k.json"),
            "--diverse",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "k.json").read_text())) == 4
    assert "kept 4 of 8" in result.output
    result = CliRunner().invoke(
        app,
        [
            "select",
            str(run),
            "--data",
            str(GSM8K),
            "--keep",
            "4",
            "--out",
            str(tmp_path / "k.json"),
        ],
    )
    assert result.exit_code == 2 and "not the data this run profiled" in result.output
