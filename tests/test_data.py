"""Loading, templating and bad input: formats, exact tokens, errors that name file/line/field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import GSM8K, read_shared
from safetensors.torch import load_file, save_file

import gradspec
from gradspec.data import load_examples
from gradspec.errors import DataError, GradspecError

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "2+3 = 5."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "Seven."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Eleven is prime."},
        ]
    },
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plain_template_tokens_and_labels(tokenizer):
    record = read_shared(GSM8K, 1)[0]
    ids, labels = gradspec.encode(tokenizer, record)
    prompt = record["instruction"] + "\n"
    assert ids == tokenizer(prompt + record["output"])["input_ids"] + [tokenizer.eos_token_id]
    response_ids = [t for t in labels if t != -100]
    assert tokenizer.decode(response_ids) == record["output"] + "</s>"
    n_prompt = labels.index(response_ids[0])
    assert tokenizer.decode(ids[:n_prompt]) == "<s>" + prompt


def test_plain_template_with_input_field(tokenizer):
    record = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    ids, labels = gradspec.encode(tokenizer, record)
    assert tokenizer.decode(ids) == "<s>Translate.\nBonjour\nHello</s>"
    assert tokenizer.decode([t for t in labels if t != -100]) == "Hello</s>"


def test_chat_template_uses_last_assistant_turn(tokenizer):
    ids, labels = gradspec.encode(tokenizer, CHAT[1], template="chat")
    text = tokenizer.decode(ids)
    assert text == (
        "<s><|user|>Name a prime.<|end|>\n<|assistant|>Seven.<|end|>\n"
        "<|user|>Another?<|end|>\n<|assistant|>Eleven is prime.<|end|>\n"
    )
    assert tokenizer.decode([t for t in labels if t != -100]) == "Eleven is prime.<|end|>\n"


def test_alpaca_record_under_chat_template(tokenizer):
    record = {"instruction": "Add.", "input": "1 and 2", "output": "3"}
    ids, _labels = gradspec.encode(tokenizer, record, template="chat")
    assert tokenizer.decode(ids) == "<s><|user|>Add.\n1 and 2<|end|>\n<|assistant|>3<|end|>\n"


def test_max_length_truncates_from_the_right(tokenizer):
    record = read_shared(GSM8K, 1)[0]
    full_ids, _ = gradspec.encode(tokenizer, record)
    ids, labels = gradspec.encode(tokenizer, record, max_length=len(full_ids) - 5)
    assert ids == full_ids[:-5] and len(labels) == len(ids)


@pytest.mark.usefixtures("shared_data")
def test_formats_directory_and_glob(tmp_path):
    records = read_shared(GSM8K, 3)
    (tmp_path / "a.json").write_text(json.dumps(records[:2], indent=4))
    write_jsonl(tmp_path / "b.jsonl", records[2:] + CHAT)
    by_dir = load_examples(tmp_path)
    assert [e.kind for e in by_dir] == ["alpaca", "alpaca", "alpaca", "chat", "chat"]
    assert [e.index for e in by_dir] == list(range(5))
    assert [(Path(e.source).name, e.line) for e in by_dir] == [
        ("a.json", 2),
        ("a.json", 7),
        ("b.jsonl", 1),
        ("b.jsonl", 2),
        ("b.jsonl", 3),
    ]
    assert by_dir[1].record == records[1]
    assert [e.example_id for e in load_examples(tmp_path / "*.json*")] == [
        e.example_id for e in by_dir
    ]
    assert by_dir[3].response == "2+3 = 5."


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]',
            3,
            "malformed JSON",
        ),
        (
            '[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c", "output": "d"}\n]',
            3,
            "expected ','",
        ),
        (
            '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]',
            3,
            "field 'output'",
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": 5, "output": "d"}\n',
            2,
            "field 'instruction'",
        ),
        (
            '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n',
            3,
            "malformed JSON",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "no assistant turn"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, text, line, message):
    path = tmp_path / ("data.json" if text.startswith("[") else "data.jsonl")
    path.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        load_examples(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert info.value.line == line


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(GradspecError, match="no data files found"):
        load_examples(tmp_path / "nope.json")


def test_empty_and_truncated_responses_are_recorded_as_skipped(tiny_model, tmp_path):
    records = read_shared(GSM8K, 3)
    records[1] = {**records[1], "output": "  "}
    data = write_jsonl(tmp_path / "d.jsonl", records)
    tables = gradspec.profile(tiny_model("llama"), data, tmp_path / "run", device="cpu")
    assert list(tables.examples["status"]) == ["ok", "skipped:empty_response", "ok"]
    assert sorted(set(tables.spectra["example_index"])) == [0, 2]
    n_prompt = int(tables.examples["n_prompt_tokens"].min())
    cut = gradspec.profile(
        tiny_model("llama"), data, tmp_path / "cut", device="cpu", max_length=n_prompt
    )
    assert set(cut.examples["status"]) == {
        "skipped:response_truncated_away",
        "skipped:empty_response",
    }
    assert cut.examples["truncated"].sum() >= 1 and cut.spectra.empty


def test_nonfinite_gradients_are_flagged_not_written(tiny_model, tmp_path):
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    for item in tiny_model("llama").iterdir():
        (model_dir / item.name).write_bytes(item.read_bytes())
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = torch.inf
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    tables = gradspec.profile(model_dir, GSM8K, tmp_path / "run", device="cpu", limit=2)
    assert set(tables.examples["status"]) == {"skipped:nonfinite_gradient"}
    assert tables.examples["loss"].isna().all() and tables.spectra.empty


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradspec", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_profile_writes_tables_any_parquet_reader_can_load(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = _cli(
        "profile",
        "--model",
        str(tiny_model("gpt2")),
        "--data",
        str(GSM8K),
        "--out",
        str(out),
        "--limit",
        "3",
        "--top-k",
        "2",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "3 ok" in result.stderr
    spectra = pq.read_table(out / "spectra").to_pandas()
    assert len(spectra) == 3 * 2 * 4 and set(spectra["module"]) == {
        "qkv_proj",
        "o_proj",
        "fc_in",
        "fc_out",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["top_k"] == 2 and manifest["data"]["n_examples"] == 3
    assert {"torch", "transformers"} <= set(manifest["versions"])


@pytest.mark.slow
def test_cli_user_errors_have_no_traceback(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    result = _cli(
        "profile",
        "--model",
        str(tiny_model("llama")),
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode == 2
    assert f"{bad}:2: field 'output'" in result.stderr and "Traceback" not in result.stderr
    missing = _cli(
        "profile",
        "--model",
        str(tmp_path / "nowhere"),
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "run"),
    )
    assert missing.returncode == 2 and "not a local checkpoint" in missing.stderr
