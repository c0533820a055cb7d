"""Data formats: each reads, selects and writes back unchanged; ShareGPT reads as chat; errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import GSM8K, read_shared

import gradspec
from gradspec.data import encode, load_examples, resolve_data_files
from gradspec.errors import DataError, GradspecError
from gradspec.formats import format_of
from gradspec.selection import select

N = 6
KEPT_ROWS = [0, 2, 5]


def chat_record(record: dict) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Answer step by step."},
            {"role": "user", "content": record["instruction"]},
            {"role": "assistant", "content": record["output"]},
        ]
    }


def sharegpt_record(record: dict) -> dict:
    """The ShareGPT twin of ``chat_record``: human/gpt/system speakers under 'from'."""
    return {
        "conversations": [
            {"from": "system", "value": "Answer step by step."},
            {"from": "human", "value": record["instruction"]},
            {"from": "gpt", "value": record["output"]},
        ]
    }


def write_json_array(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=4))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    """Columns inferred from every record (from_pylist would look at the first only)."""
    pq.write_table(pa.Table.from_struct_array(pa.array(records)), path, compression="zstd")
    return path


def write_dataset(path: Path, records: list[dict]) -> Path:
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


WRITERS = {
    "alpaca.json": write_json_array,
    "alpaca.jsonl": write_jsonl,
    "chat.jsonl": write_jsonl,
    "sharegpt.jsonl": write_jsonl,
    "alpaca.parquet": write_parquet,
    "sharegpt.parquet": write_parquet,
    "alpaca_dataset": write_dataset,
    "chat_dataset": write_dataset,
}
EXPECTED_FORMAT = {
    ".json": "json_array",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    "": "hf_datasets",
}


def records_for(name: str, n: int = N) -> list[dict]:
    """The first ``n`` gsm8k records in the schema that ``name`` starts with."""
    alpaca = read_shared(GSM8K, n)
    convert = {"alpaca": dict, "chat": chat_record, "sharegpt": sharegpt_record}
    return [convert[name.split(".")[0].split("_")[0]](r) for r in alpaca]


def make(name: str, root: Path, records: list[dict] | None = None) -> Path:
    return WRITERS[name](root / name, records_for(name) if records is None else records)


def assert_same_table(written: pa.Table, source: pa.Table, rows: list[int]) -> None:
    """Same schema (metadata included) and the source's rows at ``rows``, value for value."""
    assert written.schema.equals(source.schema, check_metadata=True)
    assert written.equals(source.take(rows))


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_format_reads_its_records_and_writes_the_kept_rows_unchanged(
    name, shared_data, tmp_path
):
    source = make(name, tmp_path)
    data_format = format_of(source)
    assert data_format.name == EXPECTED_FORMAT[Path(name).suffix]
    assert [ex.record for ex in load_examples(source)] == records_for(name)
    out = tmp_path / f"out-{name}"
    data_format.write(out, KEPT_ROWS, like=source)
    assert format_of(out) is data_format
    assert [ex.record for ex in load_examples(out)] == [records_for(name)[i] for i in KEPT_ROWS]
    if data_format.name == "parquet":
        assert_same_table(pq.read_table(out), pq.read_table(source), KEPT_ROWS)
        codec = pq.ParquetFile(out).metadata.row_group(0).column(0).compression
        assert codec == "ZSTD"
    elif data_format.name == "hf_datasets":
        written, original = datasets.load_from_disk(out), datasets.load_from_disk(source)
        assert written.features == original.features
        assert_same_table(written.data.table, original.data.table, KEPT_ROWS)
    else:
        expected = json.loads(json.dumps([records_for(name)[i] for i in KEPT_ROWS]))
        if data_format.name == "json_array":
            assert out.read_text() == json.dumps(expected, indent=4)
        else:
            assert out.read_text() == "".join(json.dumps(r) + "\n" for r in expected)


def test_nulls_in_a_table_are_absent_fields(tmp_path):
    """A table gives every row every column; a null stands for a field the JSON row lacks."""
    records = [
        {"instruction": "Add 1 and 2.", "output": "3"},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
    ]
    table = write_parquet(tmp_path / "mixed.parquet", records)
    original = write_jsonl(tmp_path / "mixed.jsonl", records)
    assert [ex.record for ex in load_examples(table)] == records
    ids = [ex.example_id for ex in load_examples(original)]
    assert [ex.example_id for ex in load_examples(table)] == ids


def test_sharegpt_reads_as_the_chat_messages_it_stands_for(tokenizer, tmp_path):
    sharegpt = load_examples(make("sharegpt.jsonl", tmp_path))
    chat = load_examples(make("chat.jsonl", tmp_path))
    assert {ex.kind for ex in sharegpt} == {"sharegpt"} and {ex.kind for ex in chat} == {"chat"}
    for shared, twin in zip(sharegpt, chat, strict=True):
        assert shared.prompt_messages() == twin.prompt_messages()
        assert shared.response == twin.response
        for template in ("chat", "plain"):
            assert encode(tokenizer, shared, template) == encode(tokenizer, twin, template)
    from_parquet = load_examples(make("sharegpt.parquet", tmp_path))
    assert [ex.example_id for ex in from_parquet] == [ex.example_id for ex in sharegpt]


def test_sharegpt_last_gpt_turn_is_the_response(tokenizer):
    record = {
        "conversations": [
            {"from": "human", "value": "Name a prime."},
            {"from": "gpt", "value": "Seven."},
            {"from": "human", "value": "Another?"},
            {"from": "gpt", "value": "Eleven is prime."},
        ]
    }
    ids, labels = encode(tokenizer, record, template="chat")
    assert tokenizer.decode(ids) == (
        "<s><|user|>Name a prime.<|end|>\n<|assistant|>Seven.<|end|>\n"
        "<|user|>Another?<|end|>\n<|assistant|>Eleven is prime.<|end|>\n"
    )
    assert tokenizer.decode([t for t in labels if t != -100]) == "Eleven is prime.<|end|>\n"


BAD_ALPACA = [
    {"instruction": "Add 1 and 2.", "output": "3"},
    {"instruction": "Add 2 and 2."},
]


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("alpaca.json", ":6: "),  # json.dumps(indent=4): the second record opens on line 6
        ("alpaca.jsonl", ":2: "),
        ("alpaca.parquet", ": row 1: "),
        ("alpaca_dataset", ": row 1: "),
    ],
)
def test_a_missing_field_names_file_position_and_field(name, where, tmp_path):
    path = make(name, tmp_path, BAD_ALPACA)
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value).startswith(f"{path}{where}field 'output': missing")
    assert info.value.field == "output"


@pytest.mark.parametrize(
    ("records", "field", "message"),
    [
        ([{"instruction": "a", "output": 3}], "output", "expected a string, found int"),
        (
            [{"conversations": [{"from": "bot", "value": "hi"}]}],
            "conversations",
            "conversations 0: unknown 'from' 'bot' (use system, human, gpt)",
        ),
        (
            [{"conversations": [{"from": "human", "value": "hi"}]}],
            "conversations",
            "no assistant turn to use as the response",
        ),
        (
            [{"messages": [{"role": "user", "content": 5}]}],
            "messages",
            "messages 0 needs string 'role' and 'content'",
        ),
    ],
)
def test_wrong_types_name_row_and_field_in_tables(records, field, message, tmp_path):
    for path in (
        write_parquet(tmp_path / "bad.parquet", [records[0], records[0]]),
        write_dataset(tmp_path / "bad_dataset", [records[0], records[0]]),
    ):
        with pytest.raises(DataError) as info:
            load_examples(path)
        assert str(info.value) == f"{path}: row 0: field '{field}': {message}"
        assert (info.value.row, info.value.line) == (0, None)


def test_unreadable_files_and_folders_are_named(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=f"^{broken}: not a readable Parquet file"):
        load_examples(broken)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(BAD_ALPACA[:1])})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(GradspecError, match="a DatasetDict folder; give one split's folder"):
        load_examples(tmp_path / "splits")
    assert load_examples(tmp_path / "splits" / "train")[0].record == BAD_ALPACA[0]
    with pytest.raises(GradspecError, match="not a data format gradspec reads"):
        load_examples(write_jsonl(tmp_path / "data.txt", BAD_ALPACA[:1]))


def test_a_directory_lists_every_format_in_name_order(shared_data, tmp_path):
    for name in ("alpaca.json", "alpaca.parquet", "chat_dataset", "sharegpt.jsonl"):
        make(name, tmp_path)
    (tmp_path / "notes.txt").write_text("not data")
    assert [p.name for p in resolve_data_files(tmp_path)] == [
        "alpaca.json",
        "alpaca.parquet",
        "chat_dataset",
        "sharegpt.jsonl",
    ]
    examples = load_examples(tmp_path)
    assert [ex.kind for ex in examples[::N]] == ["alpaca", "alpaca", "chat", "sharegpt"]
    assert [ex.source_line for ex in examples[N : N + 2]] == [0, 1]  # Parquet: the row


@pytest.mark.slow
def test_datasets_is_imported_only_for_datasets_folders(shared_data, tmp_path):
    path = make("alpaca.parquet", tmp_path)
    code = (
        "import sys, gradspec.cli, gradspec.selection\n"
        "from gradspec.data import load_examples\n"
        f"load_examples({str(path)!r})\n"
        "print('datasets' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_missing_datasets_package_says_how_to_install_it(shared_data, tmp_path, monkeypatch):
    path = make("alpaca_dataset", tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    with pytest.raises(GradspecError, match=r"pip install 'gradspec\[datasets\]'"):
        load_examples(path)


@pytest.fixture(scope="module")
def profiled(tiny_model, tmp_path_factory):
    """Per tabular or ShareGPT format: (data, run) of the first N gsm8k records, profiled."""
    root = tmp_path_factory.mktemp("formats")
    runs = {}
    for name in ("alpaca.json", "alpaca.parquet", "sharegpt.jsonl", "chat_dataset"):
        data = make(name, root)
        template = "plain" if name.startswith("alpaca") else "chat"
        run = root / f"run-{name}"
        gradspec.profile(tiny_model("llama"), data, run, device="cpu", template=template)
        runs[name] = (data, run)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alpaca.parquet", "sharegpt.jsonl", "chat_dataset"])
def test_select_writes_the_kept_examples_in_the_source_format(name, profiled, tmp_path):
    data, run = profiled[name]
    out = tmp_path / f"kept-{name}"
    selection = select(run, data, out, keep="3", by="loss")
    losses = gradspec.load_run(run).examples.set_index("example_index")["loss"]
    kept = sorted(losses.nsmallest(3).index)
    assert sorted(selection.report.loc[selection.report["kept"], "example_index"]) == kept
    assert [ex.record for ex in load_examples(out)] == [records_for(name)[i] for i in kept]
    if name.endswith(".parquet"):
        assert_same_table(pq.read_table(out), pq.read_table(data), kept)
    elif name.endswith(".jsonl"):
        lines = data.read_text().splitlines(keepends=True)
        assert out.read_text() == "".join(lines[i] for i in kept)
    else:
        written, original = datasets.load_from_disk(out), datasets.load_from_disk(data)
        assert written.features == original.features
        assert_same_table(written.data.table, original.data.table, kept)
    select(run, data, out, keep="2", by="loss")  # a rerun replaces the earlier output
    assert len(load_examples(out)) == 2


@pytest.mark.slow
def test_profile_of_a_parquet_copy_equals_that_of_the_json_original(profiled):
    json_run, (parquet_data, parquet_run) = profiled["alpaca.json"][1], profiled["alpaca.parquet"]
    original, copy = gradspec.load_run(json_run), gradspec.load_run(parquet_run)
    pd.testing.assert_frame_equal(copy.spectra, original.spectra)
    where = ["source", "source_line"]
    pd.testing.assert_frame_equal(
        copy.examples.drop(columns=where), original.examples.drop(columns=where)
    )
    assert set(copy.examples["source"]) == {str(parquet_data)}
    assert list(copy.examples["source_line"]) == list(range(N))
    assert list(original.examples["source_line"]) == [2 + 5 * i for i in range(N)]
    assert original.manifest["data"]["sha256"] != copy.manifest["data"]["sha256"]
