"""Training data: load records of any registered format with their source positions, and
template them.

The engine trains on exactly the tokens that :func:`encode` returns, so this module is
the single place that decides what a prompt and a response are. Formats (JSON array,
JSONL, Parquet, datasets folders) and record schemas (Alpaca, chat, ShareGPT) live in
:mod:`gradspec.formats`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from .errors import GradspecError
from .formats import SCHEMAS, Location, format_of, is_data_path, schema_of
from .formats.fields import map_fields
from .hub import dataset_split, hub_dataset_name
from .options import PAPER_SYSTEM_MESSAGE, ProfileOptions

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training record and where it came from: its file, 0-based row and line."""

    index: int
    source: str
    row: int
    line: int | None  # 1-based line in a JSON/JSONL file; None in a Parquet file or folder
    record: dict[str, Any]
    kind: str  # a schema of gradspec.formats.SCHEMAS: "alpaca", "chat" or "sharegpt"

    @property
    def example_id(self) -> str:
        """Stable content hash: the same record gets the same id in any file or position."""
        canonical = json.dumps(self.record, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    @property
    def source_line(self) -> int:
        """The position the examples table records: the line in a text file, else the row."""
        return self.row if self.line is None else self.line

    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation before the response, as chat messages."""
        return SCHEMAS[self.kind].prompt_messages(self.record)

    @property
    def response(self) -> str:
        """The text the model is trained to produce: the output, or the last assistant turn."""
        return SCHEMAS[self.kind].response(self.record)


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


@dataclass(frozen=True)
class DataSource:
    """The local files of ``--data``; for a Hub data set, what the manifest records of it."""

    files: list[Path]
    hub: dict[str, Any] | None = None

    @cached_property
    def sha256(self) -> str:
        """The files' hash, computed once when asked."""
        return data_sha256(self.files)


def resolve_data(
    data: str | os.PathLike | DataSource, split: str | None = None, config: str | None = None
) -> DataSource:
    """``--data`` as local files: a local path wins; a Hub id (``org/name``) is one split
    (default ``train``) of the data set, in config ``config``, saved once as a folder. A
    resolved DataSource is returned as it is."""
    if isinstance(data, DataSource):
        return data
    name = hub_dataset_name(data)
    if name is None:
        if split or config:
            raise GradspecError(
                f"--split/--data-config: only for a Hub data set id; --data {data} is local"
            )
        return DataSource(resolve_data_files(data))
    dataset = dataset_split(name, split, config)
    return DataSource([dataset.directory], dataset.record())


def resolve_data_files(data: str | os.PathLike) -> list[Path]:
    """The data named by a file, a datasets folder, a directory of data, or a glob."""
    path = Path(data)
    if path.is_file() or is_data_path(path):
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if is_data_path(p))
    else:
        files = sorted(
            Path(p) for p in glob.glob(str(data), recursive=True) if is_data_path(Path(p))
        )
    if not files:
        raise GradspecError(
            f"no data files found at '{data}' (give a .json/.jsonl/.parquet file, a "
            "datasets save_to_disk folder, a directory of them, or a glob)"
        )
    return files


def data_sha256(files: list[Path]) -> str:
    """Hash of the data's names and bytes (every file of a folder), to detect changes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        parts = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for part in parts:
            if part != path:
                digest.update(part.relative_to(path).as_posix().encode())
            digest.update(part.read_bytes())
    return digest.hexdigest()


def load_examples(
    data: str | os.PathLike | DataSource, fields: dict[str, str] | None = None
) -> list[Example]:
    """Every record of the data, its fields mapped by ``fields`` ({schema field: record
    field}), validated, numbered 0.. in file order."""
    examples: list[Example] = []
    for path in resolve_data(data).files:
        for source in format_of(path).read(path):
            where = source.location(path)
            record = map_fields(source.value, fields or {}, where)
            kind = schema_of(record, where).name
            examples.append(
                Example(len(examples), str(path), source.row, source.line, record, kind)
            )
    return examples


# ---------------------------------------------------------------- templating


def encode(
    tokenizer: Any,
    example: Example | dict[str, Any],
    template: str = "plain",
    max_length: int | None = None,
    loss_tokens: str = "response_eos",
    system: str = "default",
) -> tuple[list[int], list[int]]:
    """The exact ``(input_ids, labels)`` the engine trains on; prompt labels are -100."""
    encoded = encode_example(
        tokenizer, _as_example(example), template, max_length, loss_tokens, system
    )
    return encoded.input_ids, encoded.labels


def encode_example(
    tokenizer: Any,
    example: Example,
    template: str = "plain",
    max_length: int | None = None,
    loss_tokens: str = "response_eos",
    system: str = "default",
) -> Encoded:
    """Template and tokenize one example, truncating from the right to ``max_length``.

    ``plain``: the prompt turns' texts joined by "\\n" (Alpaca: instruction, then "\\n" and
    input if non-empty), then "\\n", then the response. ``chat``: the tokenizer's chat
    template with the generation prompt (and the ``system`` message), then the response.
    ``loss_tokens="response_eos"`` adds EOS (plain) or the template's end-of-turn text (chat)
    to the loss, as SFT does; ``"response"`` is the paper's construction, token for token:
    ``tokenizer.encode(prompt + response)`` with the first ``len(tokenizer.encode(text[:
    text.rfind(response)]))`` labels masked, nothing after the response.
    """
    if template not in ("plain", "chat"):
        raise GradspecError(f"unknown template '{template}' (use 'plain' or 'chat')")
    if loss_tokens == "response":
        prompt = prompt_text(tokenizer, example, template, system)
        encoded = _paper_encode(tokenizer, prompt + example.response, example.response, max_length)
    elif template == "plain":
        prompt = prompt_text(tokenizer, example, template, system)
        encoded = _split_encode(tokenizer, prompt, prompt + example.response, True, max_length)
    else:
        prompt, full = _chat_texts(tokenizer, example, system)
        encoded = _split_encode(tokenizer, prompt, full, False, max_length)
    if not example.response.strip():
        encoded.skip_reason = "empty_response"
    return encoded


def encode_with_options(tokenizer: Any, example: Example, opts: ProfileOptions) -> Encoded:
    """:func:`encode_example` with a run's template, loss tokens, system message and length."""
    return encode_example(
        tokenizer, example, opts.template, opts.max_length, opts.loss_tokens, opts.system
    )


def encode_response_only(
    tokenizer: Any,
    example: Example,
    max_length: int | None = None,
    loss_tokens: str = "response_eos",
) -> Encoded:
    """The response alone (after BOS where the tokenizer adds one), for the IFD denominator,
    over the same loss tokens as the example: with EOS, or (the paper's) without."""
    if loss_tokens == "response":
        return _paper_encode(tokenizer, example.response, example.response, max_length)
    return _split_encode(tokenizer, "", example.response, True, max_length)


def prompt_text(tokenizer: Any, example: Example, template: str, system: str = "default") -> str:
    """The text before the response: plain turns and "\\n", or the rendered chat prompt."""
    if template == "plain":
        return "\n".join(m["content"] for m in example.prompt_messages()) + "\n"
    return _render_chat(tokenizer, _chat_messages(tokenizer, example, system), True)


def _chat_messages(tokenizer: Any, example: Example, system: str) -> list[dict[str, str]]:
    """The prompt turns with the chosen system message in front (unless the record has one)."""
    messages = example.prompt_messages()
    if system == "default" or any(m["role"] == "system" for m in messages):
        return messages
    text = PAPER_SYSTEM_MESSAGE if system == "paper" else system
    with_system = [{"role": "system", "content": text}, *messages]
    if system == "paper" and not _accepts_system_turn(tokenizer, with_system):
        return messages  # the paper's rule for templates without a system role (Gemma)
    return with_system


def _accepts_system_turn(tokenizer: Any, messages: list[dict[str, str]]) -> bool:
    """Whether the chat template renders a system turn (Gemma's raises instead)."""
    try:
        _render_chat(tokenizer, messages, True)
    except TemplateError:
        return False
    return True


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The chat template's text for ``messages``; a one-line error without a template."""
    if not getattr(tokenizer, "chat_template", None):
        raise GradspecError("the tokenizer has no chat template; use --template plain")
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False
    )


def _chat_texts(tokenizer: Any, example: Example, system: str) -> tuple[str, str]:
    """(prompt text, full text with the end-of-turn text) rendered by the chat template."""
    messages = _chat_messages(tokenizer, example, system)
    prompt = _render_chat(tokenizer, messages, True)
    turn = {"role": "assistant", "content": example.response}
    full = _render_chat(tokenizer, [*messages, turn], False)
    if not full.startswith(prompt):
        full = prompt + example.response
    return prompt, full


def _paper_encode(tokenizer: Any, text: str, response: str, max_length: int | None) -> Encoded:
    """arXiv:2410.23743's labels: the text encoded with special tokens, masked up to the
    token count of ``text[:text.rfind(response)]`` encoded alone."""
    full = tokenizer.encode(text)
    ids = (
        full
        if max_length is None
        else tokenizer.encode(text, truncation=True, max_length=max_length)
    )
    n_prompt = len(tokenizer.encode(text[: text.rfind(response)]))
    labels = [IGNORE_INDEX if i < n_prompt else tok for i, tok in enumerate(ids)]
    truncated = len(full) > len(ids)
    encoded = Encoded(list(ids), labels, min(n_prompt, len(ids)), truncated)
    if encoded.n_response_tokens == 0:
        encoded.skip_reason = "response_truncated_away" if truncated else "no_response_tokens"
    return encoded


def _split_encode(
    tokenizer: Any, prompt: str, full: str, add_special_tokens: bool, max_length: int | None
) -> Encoded:
    """Tokenize the full text once; tokens that start inside the prompt get label -100; with
    special tokens, EOS is appended (and trained on) unless the tokenizer added it."""
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
    kind = schema_of(example, Location("<example>", line=0)).name
    return Example(0, "<memory>", 0, 0, example, kind)
