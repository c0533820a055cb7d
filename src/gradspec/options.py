"""The options of a profiling run, in one place for the API, the CLI and study files.

Each field of :class:`ProfileOptions` carries its CLI help and help panel; the ``profile``
command's options are made from these fields (cli.py). This module loads neither torch nor
the engine, so the CLI can build its help without them.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from typing import TypeVar

from .errors import GradspecError
from .formats.fields import format_fields, parse_fields
from .statistics import REPORT_STATISTICS


class Template(StrEnum):
    """How a record becomes text: ``plain`` concatenation or the tokenizer's chat template."""

    plain = "plain"
    chat = "chat"


class LossTokens(StrEnum):
    """Which tokens the loss averages over: ``response`` the response's own tokens only (the
    paper: no EOS, no end-of-turn text), ``response_eos`` the response plus EOS or the chat
    template's end-of-turn text (what SFT trains on)."""

    response = "response"
    response_eos = "response_eos"


# The paper's system message for instruction-tuned models (none where the template has no
# system role, as the paper's code does for Gemma).
PAPER_SYSTEM_MESSAGE = "You are a helpful assistant."


class Method(StrEnum):
    """``fast`` spectra from hooks, or the published per-example full-SVD ``reference``."""

    fast = "fast"
    reference = "reference"


class ModelDtype(StrEnum):
    """Precision the model runs in; ``auto``: float32 on CPU, the checkpoint's on GPU."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


class SpectraDtype(StrEnum):
    """Precision of the spectra; ``auto``: float32, float64 for float64 models."""

    auto = "auto"
    float32 = "float32"
    float64 = "float64"


class Shard(StrEnum):
    """How each rank holds the model: ``none`` a whole copy, ``fsdp`` 1/N of it (FSDP2 over
    all N ranks), ``hsdp`` 1/n of it (n ranks per node; each node holds a whole copy)."""

    none = "none"
    fsdp = "fsdp"
    hsdp = "hsdp"


class PaddingSide(StrEnum):
    """Where padding goes in a batch."""

    left = "left"
    right = "right"


class AdapterMatrices(StrEnum):
    """For a PEFT LoRA adapter: the ``merged`` matrices W + BA, the adapter's ``lora`` A and
    B matrices, or ``both`` (named as the training monitor names them)."""

    merged = "merged"
    lora = "lora"
    both = "both"


E = TypeVar("E", bound=StrEnum)

# The statistics the report can draw (statistics.py's registry and its derived ones).
ReportStatistic = StrEnum("ReportStatistic", {name: name for name in REPORT_STATISTICS})

DATA_PANEL = "Data"
MODEL_PANEL = "Model and matrices"
BATCH_PANEL = "Batching"
OUTPUT_PANEL = "What is recorded"


# The smallest value each numeric option takes (None, where allowed, means "not set").
LEAST_VALUES = {
    "limit": 1,
    "batch_size": 1,
    "max_length": 1,
    "token_budget": 1,
    "top_k": 0,
    "chunk_size": 1,
}


def _cli(help: str, panel: str) -> dict[str, str]:
    """Field metadata that makes a ProfileOptions field a CLI option."""
    return {"help": help, "panel": panel}


@dataclass(frozen=True)
class ProfileOptions:
    """Everything that decides the numbers of a run; all of it but ``limit`` is fingerprinted.

    Strings are accepted wherever an Enum is expected; a value outside its choices is a
    GradspecError naming the option, raised on construction, before any work starts.
    """

    template: Template = field(
        default=Template.plain,
        metadata=_cli("Text layout: plain, or chat (the tokenizer's chat template).", DATA_PANEL),
    )
    loss_tokens: LossTokens = field(
        default=LossTokens.response_eos,
        metadata=_cli(
            "Loss over: response (the paper: the response's tokens only) or response_eos "
            "(plus EOS / end-of-turn, as SFT trains).",
            DATA_PANEL,
        ),
    )
    system: str = field(
        default="default",
        metadata=_cli(
            "Chat system message: default (the template's own), paper ('You are a helpful "
            "assistant.', none where the template has no system role), or a text.",
            DATA_PANEL,
        ),
    )
    fields: str | None = field(
        default=None,
        metadata=_cli(
            "Map record fields, e.g. instruction=question,output=answer (GSM8K's columns).",
            DATA_PANEL,
        ),
    )
    modules: str = field(
        default="all", metadata=_cli("all, attn, mlp, or a regex on names.", MODEL_PANEL)
    )
    adapter_matrices: AdapterMatrices = field(
        default=AdapterMatrices.merged,
        metadata=_cli(
            "With a PEFT adapter as --model: merged (W + BA), lora (its A and B) or both.",
            MODEL_PANEL,
        ),
    )
    limit: int | None = field(
        default=None, metadata=_cli("Profile the first N examples.", DATA_PANEL)
    )
    batch_size: int | None = field(
        default=None,
        metadata=_cli(
            "Examples per batch; default: as many of similar length (padding <= 10%) "
            "as fit --token-budget.",
            BATCH_PANEL,
        ),
    )
    token_budget: int = field(default=4096, metadata=_cli("Padded tokens per batch.", BATCH_PANEL))
    max_length: int | None = field(
        default=None,
        metadata=_cli(
            "Truncate examples to L tokens; default: the model's context "
            "(config max_position_embeddings). Longer examples are reported.",
            DATA_PANEL,
        ),
    )
    dtype: ModelDtype = field(
        default=ModelDtype.auto,
        metadata=_cli("Model dtype (auto: float32 on CPU, the checkpoint's on GPU).", MODEL_PANEL),
    )
    spectra_dtype: SpectraDtype = field(
        default=SpectraDtype.auto,
        metadata=_cli(
            "Spectra precision (auto: float32; float64 for float64 models).", MODEL_PANEL
        ),
    )
    method: Method = field(
        default=Method.fast,
        metadata=_cli(
            "fast, or reference (the published per-example full-SVD algorithm).", MODEL_PANEL
        ),
    )
    route: str = field(
        default="cost",
        metadata=_cli(
            "cost: the cost model's cheapest exact route per matrix (runs reproduce bit for "
            "bit); auto: each shape's fastest exact route, timed on its first batch (the "
            "manifest records the choices); or one route for every matrix: factor, gram, "
            "full, factor-eigvalsh, factor-cpu, ... (gradspec.routes.ROUTES).",
            MODEL_PANEL,
        ),
    )
    top_k: int = field(
        default=0, metadata=_cli("Also store the K largest singular values.", OUTPUT_PANEL)
    )
    ifd: bool = field(
        default=False,
        metadata=_cli(
            "Also record the response-only loss and IFD (one extra forward).", OUTPUT_PANEL
        ),
    )
    chunk_size: int = 64
    padding_side: PaddingSide = field(
        default=PaddingSide.right, metadata=_cli("left or right.", BATCH_PANEL)
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for option in fields(self):
            kind = hints[option.name]
            if isinstance(kind, type) and issubclass(kind, Enum):
                value = parse_choice(kind, option.name, getattr(self, option.name))
                object.__setattr__(self, option.name, value)
        if self.fields is not None:  # as the examples table records it
            object.__setattr__(self, "fields", format_fields(parse_fields(self.fields)))
        self.check()

    def check(self) -> None:
        """Reject impossible numbers before any work starts."""
        for name, least in LEAST_VALUES.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise GradspecError(
                    f"--{name.replace('_', '-')} must be at least {least}, got {value}"
                )


def parse_choice(kind: type[E], name: str, value: object) -> E:
    """``value`` as a member of ``kind``, or a GradspecError naming the option ``--name``."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise GradspecError(f"--{name.replace('_', '-')} {value}: use one of {choices}") from None
