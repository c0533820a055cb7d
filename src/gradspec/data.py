"""Training data: load Alpaca or chat records with their source positions, and template them.

The engine trains on exactly the tokens that :func:`encode` returns, so this module is
the single place that decides what a prompt and a response are.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, GradspecError

IGNORE_INDEX = -100
DATA_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Example:
    """One training record and where it came from; ``raw`` is its exact source text."""

    index: int
    source: str
    line: int
    record: dict[str, Any]
    raw: str
    kind: str  # "alpaca" or "chat"

    @property
    def example_id(self) -> str:
        """Stable content hash: the same record gets the same id in any file or position."""
        canonical = json.dumps(self.record, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation before the response, as chat messages."""
        if self.kind == "chat":
            messages = self.record["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            return [dict(m) for m in messages[:last]]
        return [{"role": "user", "content": _alpaca_prompt_body(self.record)}]

    @property
    def response(self) -> str:
        """The text the model is trained to produce: the output, or the last assistant turn."""
        if self.kind == "chat":
            messages = self.record["messages"]
            return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        return self.record["output"]


@dataclass
class Encoded:
    """Token ids and labels of one example, with the facts the examples table records."""

    input_ids: list[int]
    labels: list[int]
    n_prompt_tokens: int
    truncated: bool
    skip_reason: str | None = None
    n_response_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        # Position 0 is never predicted, so a label there would not count.
        self.n_response_tokens = sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


# ---------------------------------------------------------------- loading


def resolve_data_files(data: str | os.PathLike) -> list[Path]:
    """The data files named by a file path, a directory (its .json/.jsonl files) or a glob."""
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(data), recursive=True) if Path(p).is_file())
    if not files:
        raise GradspecError(
            f"no data files found at '{data}' (give a .json/.jsonl file, a "
            "directory of them, or a glob)"
        )
    return files


def data_sha256(files: list[Path]) -> str:
    """Hash of the data files' names and bytes, recorded in the manifest to detect changes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_examples(data: str | os.PathLike) -> list[Example]:
    """Every record of the data, validated, numbered 0.. in file order."""
    examples: list[Example] = []
    for path in resolve_data_files(data):
        for line, record, raw in _read_records(path):
            kind = _validate(record, str(path), line)
            examples.append(Example(len(examples), str(path), line, record, raw, kind))
    return examples


def _read_records(path: Path) -> list[tuple[int, Any, str]]:
    """(line, parsed record, raw text) for each record of a JSON array or JSONL file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return _read_json_array(path, text)
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json.loads(line), line))
        except json.JSONDecodeError as exc:
            raise DataError(
                str(path), line_no, f"malformed JSON: {exc.msg} (column {exc.colno})"
            ) from None
    return records


def _read_json_array(path: Path, text: str) -> list[tuple[int, Any, str]]:
    """Parse a JSON array element by element, so each record keeps its line and raw text."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any, str]] = []
    pos = text.index("[") + 1

    def fail(at: int, message: str) -> DataError:
        return DataError(str(path), text.count("\n", 0, at) + 1, f"malformed JSON: {message}")

    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]" and not records:
            return records
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, exc.msg) from None
        records.append((text.count("\n", 0, pos) + 1, record, text[pos:end]))
        pos = _skip_space(text, end)
        if pos >= len(text):
            raise fail(pos, "unterminated array")
        if text[pos] == "]":
            return records
        if text[pos] != ",":
            raise fail(pos, f"expected ',' or ']' after a record, found {text[pos]!r}")
        pos += 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _validate(record: Any, path: str, line: int) -> str:
    """Check one record's fields and say which format it is in."""
    if not isinstance(record, dict):
        raise DataError(path, line, f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        return _validate_chat(record["messages"], path, line)
    for name in ("instruction", "output"):
        if name not in record:
            raise DataError(
                path,
                line,
                "missing (an Alpaca record needs 'instruction' and "
                "'output'; a chat record needs 'messages')",
                field=name,
            )
    for name in ("instruction", "input", "output"):
        if name in record and not isinstance(record[name], str):
            raise DataError(
                path, line, f"expected a string, found {type(record[name]).__name__}", field=name
            )
    return "alpaca"


def _validate_chat(messages: Any, path: str, line: int) -> str:
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, "expected a non-empty list of messages", field="messages")
    for i, message in enumerate(messages):
        ok = (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        )
        if not ok:
            raise DataError(
                path, line, f"message {i} needs string 'role' and 'content'", field="messages"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(path, line, "no assistant turn to use as the response", field="messages")
    return "chat"


# ---------------------------------------------------------------- templating


def _alpaca_prompt_body(record: dict[str, Any]) -> str:
    instruction, extra = record["instruction"], record.get("input") or ""
    return f"{instruction}\n{extra}" if extra else instruction


def encode(
    tokenizer: Any,
    example: Example | dict[str, Any],
    template: str = "plain",
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """The exact ``(input_ids, labels)`` the engine trains on; prompt labels are -100."""
    encoded = encode_example(tokenizer, _as_example(example), template, max_length)
    return encoded.input_ids, encoded.labels


def encode_example(
    tokenizer: Any, example: Example, template: str = "plain", max_length: int | None = None
) -> Encoded:
    """Template and tokenize one example, truncating from the right to ``max_length``.

    ``plain``: instruction, then "\\n" and input if non-empty, then "\\n", then the response
    and EOS. ``chat``: the tokenizer's chat template with the generation prompt, then the
    response with the template's own end-of-turn text.
    """
    if template == "plain":
        prompt = _alpaca_prompt_body(_alpaca_view(example)) + "\n"
        encoded = _split_encode(tokenizer, prompt, prompt + example.response, True, max_length)
    elif template == "chat":
        prompt, full = _chat_texts(tokenizer, example)
        encoded = _split_encode(tokenizer, prompt, full, False, max_length)
    else:
        raise GradspecError(f"unknown template '{template}' (use 'plain' or 'chat')")
    if not example.response.strip():
        encoded.skip_reason = "empty_response"
    return encoded


def encode_response_only(
    tokenizer: Any, example: Example, max_length: int | None = None
) -> Encoded:
    """The response alone (after BOS where the tokenizer adds one), for the IFD denominator."""
    return _split_encode(tokenizer, "", example.response, True, max_length)


def _alpaca_view(example: Example) -> dict[str, Any]:
    if example.kind == "alpaca":
        return example.record
    body = "\n".join(m["content"] for m in example.prompt_messages())
    return {"instruction": body}


def _chat_texts(tokenizer: Any, example: Example) -> tuple[str, str]:
    """(prompt text, full text) rendered by the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise GradspecError("the tokenizer has no chat template; use --template plain")
    messages = example.prompt_messages()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    turn = {"role": "assistant", "content": example.response}
    full = tokenizer.apply_chat_template([*messages, turn], tokenize=False)
    if not full.startswith(prompt):
        full = prompt + example.response
    return prompt, full


def _split_encode(
    tokenizer: Any, prompt: str, full: str, add_special_tokens: bool, max_length: int | None
) -> Encoded:
    """Tokenize the full text once; tokens that start inside the prompt get label -100."""
    enc = tokenizer(full, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    is_response = [start >= len(prompt) and end > start for start, end in enc["offset_mapping"]]
    if (
        add_special_tokens
        and tokenizer.eos_token_id is not None
        and full != prompt
        and (not ids or ids[-1] != tokenizer.eos_token_id)
    ):
        ids.append(tokenizer.eos_token_id)
        is_response.append(True)
    labels = [tok if resp else IGNORE_INDEX for tok, resp in zip(ids, is_response, strict=True)]
    n_prompt = is_response.index(True) if True in is_response else len(ids)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    encoded = Encoded(ids, labels, min(n_prompt, len(ids)), truncated)
    if encoded.n_response_tokens == 0:
        encoded.skip_reason = "response_truncated_away" if truncated else "no_response_tokens"
    return encoded


def _as_example(example: Example | dict[str, Any]) -> Example:
    if isinstance(example, Example):
        return example
    kind = _validate(example, "<example>", 0)
    return Example(0, "<memory>", 0, example, json.dumps(example), kind)
