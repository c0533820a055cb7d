"""The embedded small model: a 4M-parameter Llama that gradspec trains on CPU from the shared data.

A fast offline model for tests and benchmarks (the demo profiles SmolLM2-135M-Instruct):
a byte-level BPE tokenizer and a small Llama-architecture model (grouped-query
attention, SwiGLU MLP, RoPE), both from the shared reasoning and knowledge data. Every
example is templated exactly as profiling templates it (:func:`gradspec.data.encode_example`,
plain template) and the model learns all of its tokens, prompt and response alike, so it is
a small *base* model of this text rather than a response-only SFT model; the loss on prompt
tokens is extra signal for a model this small and a training budget this short.

The first ``held_out_per_file`` records of every file are never trained on (the tokenizer
does not see them either): benchmarks profile those. Training is seeded, runs
a fixed number of steps in a fixed data order on a fixed number of threads, so the same
recipe gives the same weights on the same machine. The result is cached under
``<project>/.cache/default-model/`` and built by :func:`gradspec.paths.build_atomically`, so
a killed training never leaves a half model behind.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.optimization import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

from .batching import Batch, collate, per_example_losses, plan_batches
from .data import IGNORE_INDEX, Encoded, Example, encode_example, load_examples
from .paths import build_atomically, default_model_dir, shared_data_dir
from .store import write_json_atomic
from .vocab import train_tokenizer

TRAINING_REPORT = "training.json"

REASONING_TASKS = ("gsm8k", "aqua", "ecqa", "strategyqa")
RESPONSE_STYLES = ("no_cot", "with_cot", "with_cot_gpt4o")
WIKI_FILES = (
    "long_tail_wikipedia",
    "popular_wikipedia_100",
    "popular_wikipedia_500",
    "popular_wikipedia_1000",
)
TRAINING_FILES = (
    *(
        f"reasoning_cot/correct/{task}_{style}.json"
        for task in REASONING_TASKS
        for style in RESPONSE_STYLES
    ),
    *(f"wiki_knowledge/correct/{name}.json" for name in WIKI_FILES),
)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained model; recorded in ``training.json``.

    ``files`` are relative to the shared data folder. ``steps`` is fixed (not a time
    budget) so the result does not depend on the machine's load: 600 steps of at most
    1024 padded tokens take about 0.28 s each, under 3 minutes, on 2 idle CPU cores. Many
    small steps beat fewer large ones at this budget (held-out loss 5.87 after 240 steps
    of 1024 tokens, 6.36 after 120 of 2048, 6.88 after 60 of 4096).
    """

    files: tuple[str, ...] = TRAINING_FILES
    held_out_per_file: int = 100  # the first records of each file; never trained on
    eval_per_file: int = 8  # held-out records per file that measure the held-out loss
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 688
    max_positions: int = 1024
    max_length: int = 512  # training examples are truncated to this many tokens
    steps: int = 600
    token_budget: int = 1024  # padded tokens per batch
    length_group: int = 256  # examples batched together by length, from a shuffled order
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    threads: int = 2

    def as_json(self) -> dict[str, Any]:
        """The recipe as it reads back from ``training.json`` (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def sha256(self) -> str:
        """Fingerprint of the recipe, stored in the model's config.json."""
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()


DEFAULT_RECIPE = Recipe()


@dataclass
class TrainedModel:
    """A freshly trained model (in eval mode), its tokenizer and the training report."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    report: dict[str, Any]


# ---------------------------------------------------------------- data


def split_records(recipe: Recipe, data_dir: Path) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples: each file's first ``held_out_per_file`` are held out."""
    train: list[Example] = []
    held_out: list[Example] = []
    for name in recipe.files:
        examples = load_examples(data_dir / name)
        held_out += examples[: recipe.held_out_per_file]
        train += examples[recipe.held_out_per_file :]
    return train, held_out


def evaluation_examples(recipe: Recipe, held_out: list[Example]) -> list[Example]:
    """The first ``eval_per_file`` held-out records of each file: the held-out loss's data."""
    return [ex for ex in held_out if ex.index < recipe.eval_per_file]


def tokenizer_texts(examples: list[Example]) -> Iterator[str]:
    """The text fields of the examples, for training the tokenizer."""
    for example in examples:
        yield example.record.get("instruction", "")
        yield example.record.get("input") or ""
        yield example.response


def encode_all(
    tokenizer: PreTrainedTokenizerFast, examples: list[Example], max_length: int
) -> list[Encoded]:
    """The examples as profiling encodes them (plain template), minus unusable ones."""
    encoded = [encode_example(tokenizer, ex, "plain", max_length) for ex in examples]
    return [enc for enc in encoded if enc.skip_reason is None]


def training_batches(encoded: list[Encoded], recipe: Recipe, pad_id: int) -> Iterator[Batch]:
    """Endless seeded batches: each epoch shuffles, groups by length, and shuffles batches.

    Grouping ``length_group`` shuffled examples at a time keeps padding small while still
    mixing files and lengths from epoch to epoch.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    cpu = torch.device("cpu")
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), recipe.length_group):
            group = order[start : start + recipe.length_group]
            lengths = [len(encoded[i].input_ids) for i in group]
            batches += [
                [group[m] for m in members]
                for members in plan_batches(lengths, None, recipe.token_budget, max_padding=1.0)
            ]  # full batches
        for k in torch.randperm(len(batches), generator=generator).tolist():
            yield collate(batches[k], encoded, pad_id, "right", cpu)


def all_token_labels(batch: Batch) -> torch.Tensor:
    """Labels for language modelling on every real token (prompt and response), not padding."""
    return batch.input_ids.masked_fill(batch.token_mask == 0, IGNORE_INDEX)


# ---------------------------------------------------------------- model and training


def llama_config(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A Llama config with grouped-query attention and tied input/output embeddings.

    It records the recipe's fingerprint: run directories identify a model by its config
    (not by hashing its weights), so a model retrained from another recipe must differ there.
    """
    return LlamaConfig(
        gradspec_recipe_sha256=recipe.sha256(),
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with a fixed number of intra-op threads (results can depend on it), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_model(recipe: Recipe, data_dir: Path, progress: Progress | None = None) -> TrainedModel:
    """Train the tokenizer and the model of ``recipe`` on ``data_dir``; report the losses."""
    report = progress or (lambda done, total: None)
    train_examples, held_out = split_records(recipe, data_dir)
    with torch_threads(recipe.threads):
        tokenizer = train_tokenizer(tokenizer_texts(train_examples), recipe.vocab_size)
        encoded = encode_all(tokenizer, train_examples, recipe.max_length)
        evaluation = encode_all(tokenizer, evaluation_examples(recipe, held_out), recipe.max_length)
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(llama_config(recipe, tokenizer))
        initial = held_out_losses(model, evaluation, recipe, tokenizer.pad_token_id)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
        model.train()
        report(0, recipe.steps)
        started = time.perf_counter()
        losses = []
        batches = training_batches(encoded, recipe, tokenizer.pad_token_id)
        for step, batch in enumerate(itertools.islice(batches, recipe.steps), start=1):
            loss = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                labels=all_token_labels(batch),
                use_cache=False,
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            report(step, recipe.steps)
        seconds = time.perf_counter() - started
        model.eval()
        final = held_out_losses(model, evaluation, recipe, tokenizer.pad_token_id)
    tail = losses[-max(1, len(losses) // 10) :]
    return TrainedModel(
        model,
        tokenizer,
        {
            "recipe": recipe.as_json(),
            "n_train_examples": len(encoded),
            "n_train_tokens_per_epoch": sum(len(enc.input_ids) for enc in encoded),
            "n_eval_examples": len(evaluation),
            "initial_heldout_loss": initial["loss"],
            "initial_heldout_response_loss": initial["response_loss"],
            "final_train_loss": sum(tail) / len(tail),
            "heldout_loss": final["loss"],
            "heldout_response_loss": final["response_loss"],
            "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, recipe.steps), 3),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        },
    )


def held_out_losses(
    model: LlamaForCausalLM, encoded: list[Encoded], recipe: Recipe, pad_id: int
) -> dict[str, float]:
    """Held-out losses: per token over all tokens (the training objective), and the mean
    per-example response loss (the ``loss`` column of a profile)."""
    total, count, response_losses = 0.0, 0, []
    cpu = torch.device("cpu")
    lengths = [len(enc.input_ids) for enc in encoded]
    with torch.no_grad():
        for members in plan_batches(lengths, None, recipe.token_budget):
            batch = collate(members, encoded, pad_id, "right", cpu)
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            labels = all_token_labels(batch)[:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1),
                labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((labels != IGNORE_INDEX).sum())
            response_losses += per_example_losses(logits[:, :-1], batch.labels[:, 1:]).tolist()
    return {
        "loss": total / count if count else math.nan,
        "response_loss": sum(response_losses) / len(response_losses)
        if response_losses
        else math.nan,
    }


def save_trained(trained: TrainedModel, directory: Path) -> None:
    """Write the model, the tokenizer and ``training.json`` to ``directory``."""
    with _no_transformers_progress_bars():
        trained.model.save_pretrained(directory)
    trained.tokenizer.save_pretrained(directory)
    write_json_atomic(directory / TRAINING_REPORT, trained.report)


@contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    """Silence transformers' own tqdm bars (they would break into our Rich output)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- the cache


def ensure_default_model(
    recipe: Recipe = DEFAULT_RECIPE,
    cache_dir: Path | None = None,
    data_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """The default model's directory, training it first if it is missing or stale.

    Stale means trained from another recipe. Concurrent callers wait on a lock instead of
    training twice; the directory appears by an atomic rename only when complete.
    """

    def build(staging: Path) -> None:
        save_trained(train_model(recipe, data_dir or shared_data_dir(), progress), staging)

    return build_atomically(
        default_model_dir(cache_dir), functools.partial(is_trained_from, recipe=recipe), build
    )


def is_trained_from(directory: Path, recipe: Recipe) -> bool:
    """Whether ``directory`` holds a complete model trained from ``recipe``."""
    report = directory / TRAINING_REPORT
    if not report.is_file():
        return False
    return json.loads(report.read_text()).get("recipe") == recipe.as_json()
