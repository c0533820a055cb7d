"""Fuzzing the data readers with Hypothesis: any JSON array, JSONL or Parquet file of
Alpaca, chat or ShareGPT records with arbitrary Unicode (U+2028, NEL, CR, quotes, lone
surrogates) either loads with exactly the records ``json.loads`` / Arrow read, or is
refused with one line naming the file; nothing crashes. Valid records always load."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from gradspec.data import load_examples
from gradspec.errors import GradspecError

FUZZ = settings(max_examples=60, deadline=None, database=None)
TRICKY = ["\u2028", "\u2029", "\x85", "\r", "\n", "\r\n", '"', "\\", "\x00", "\ufeff", "é", "😀"]
SURROGATES = ["\ud800", "\udfff", "\udc80"]


def texts(surrogates: bool) -> st.SearchStrategy[str]:
    """Strings of any code point (lone surrogates only if asked), tricky ones often."""
    characters = st.characters(exclude_categories=() if surrogates else ("Cs",))
    pieces = st.one_of(
        st.text(characters, max_size=8), st.sampled_from(TRICKY + (SURROGATES * surrogates))
    )
    return st.lists(pieces, max_size=4).map("".join)


def record_kinds(surrogates: bool, optional: bool = True) -> list[st.SearchStrategy[dict]]:
    """Alpaca, chat and ShareGPT records with a response, their texts from ``texts``;
    Alpaca's optional fields only if ``optional``."""
    text = texts(surrogates)
    extra = {"input": text, "style": text} if optional else {}
    alpaca = st.fixed_dictionaries({"instruction": text, "output": text}, optional=extra)
    turn = st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": text})
    answer = st.fixed_dictionaries({"role": st.just("assistant"), "content": text})
    chat = st.tuples(st.lists(turn, max_size=2), answer).map(lambda t: {"messages": [*t[0], t[1]]})
    said = st.fixed_dictionaries({"from": st.sampled_from(["system", "human"]), "value": text})
    reply = st.fixed_dictionaries({"from": st.just("gpt"), "value": text})
    sharegpt = st.tuples(st.lists(said, max_size=2), reply).map(
        lambda t: {"conversations": [*t[0], t[1]]}
    )
    return [alpaca, chat, sharegpt]


def records(surrogates: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A record of any kind."""
    return st.one_of(record_kinds(surrogates))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | texts(surrogates=True),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts(True), inner, max_size=3),
    max_leaves=8,
)


def json_array(values: list[Any], ascii_only: bool, indent: int | None, crlf: bool) -> bytes:
    text = json.dumps(values, ensure_ascii=ascii_only, indent=indent)
    return (text.replace("\n", "\r\n") if crlf else text).encode("utf-8", "surrogatepass")


def json_lines(values: list[Any], ascii_only: bool, indent: int | None, crlf: bool) -> bytes:
    lines = [json.dumps(v, ensure_ascii=ascii_only) for v in values]
    end = "\r\n" if crlf else "\n"
    return (end.join(lines) + end * (indent is None)).encode("utf-8", "surrogatepass")


def read_json_array(data: bytes) -> list[Any]:
    return json.loads(data.decode("utf-8"))


def read_json_lines(data: bytes) -> list[Any]:
    """JSON Lines, or one JSON array when the file starts with '[' (gradspec reads a .jsonl
    file by its content, as the format registry detects it)."""
    if data.lstrip().startswith(b"["):
        return read_json_array(data)
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]


TEXT_FORMATS: dict[str, tuple[Callable[..., bytes], Callable[[bytes], list[Any]]]] = {
    "d.json": (json_array, read_json_array),
    "d.jsonl": (json_lines, read_json_lines),
}


def load_or_refuse(path: Path) -> list[dict[str, Any]] | None:
    """The loaded records (each with an id), or None when refused with one line naming
    the file; any other exception fails the test."""
    try:
        examples = load_examples(path)
    except GradspecError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message
        return None
    assert all(len(ex.example_id) == 16 for ex in examples)
    return [ex.record for ex in examples]


def written(name: str, data: bytes) -> Callable[[Callable[[Path], None]], None]:
    """Run a check on ``data`` saved as ``name`` in a fresh folder."""

    def run(check: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            check(path)

    return run


layouts = st.tuples(st.booleans(), st.sampled_from([None, 1, 4]), st.booleans())


@FUZZ
@given(st.sampled_from(list(TEXT_FORMATS)), st.lists(records(False), min_size=1), layouts)
def test_valid_records_load_as_json_reads_them(name, values, layout):
    write, read = TEXT_FORMATS[name]
    data = write(values, *layout)

    def check(path: Path) -> None:
        assert load_or_refuse(path) == read(data) == values

    written(name, data)(check)


@FUZZ
@given(
    st.sampled_from(list(TEXT_FORMATS)),
    st.lists(st.one_of(records(True), JSON_VALUES), max_size=4),
    layouts,
)
def test_any_json_loads_as_json_reads_it_or_is_refused(name, values, layout):
    write, read = TEXT_FORMATS[name]
    data = write(values, *layout)

    def check(path: Path) -> None:
        loaded = load_or_refuse(path)
        if loaded is not None:
            assert loaded == read(data)

    written(name, data)(check)


@FUZZ
@given(st.sampled_from(list(TEXT_FORMATS)), st.binary(max_size=64))
def test_arbitrary_bytes_load_or_are_refused(name, data):
    written(name, data)(load_or_refuse)


# Records of one kind, all fields present: a Parquet file holds one schema.
same_kind = st.sampled_from(record_kinds(False, optional=False)).flatmap(
    lambda kind: st.lists(kind, min_size=1, max_size=4)
)


@FUZZ
@given(same_kind)
def test_parquet_records_load_as_arrow_reads_them(values):
    def check(path: Path) -> None:
        pq.write_table(pa.Table.from_pylist(values), path)
        # The records of one kind share their fields, so Arrow reads no nulls to drop.
        assert load_or_refuse(path) == pq.read_table(path).to_pylist() == values

    written("d.parquet", b"")(check)
