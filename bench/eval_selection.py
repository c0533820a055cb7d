"""Does selecting by gradients train a better model? Select, fine-tune, evaluate.

A pool is built from the shared data (``bench/mixes.py``): for every reasoning task and
response style and every Wikipedia set, the first ``--pool-size`` / 16 instructions, a
``--share`` of them given their irrelevant twin instead of their own response. The pool is
profiled once with gradspec (with IFD) and scored (``gradspec.quality``). ``--k`` examples
are then kept by each method: ``random``, the baselines ``loss`` and ``ifd``, every gradient
score, ``flag``, ``diverse`` (``gradspec select --diverse``: facility location over the
gradient signatures of the best 1.5k by flag) and ``learned`` (the probability of the
detector ``gradspec flag --learn`` learns from corrupted twins of ``--learn-twins`` pool
examples, every corruption kind, profiled beside the pool's profile with the same
options; ``gradspec.detector.learn_flags``). Each scored method also has a
``<method>_within`` variant that ranks an example by its place within its own source file
(``gradspec select --within cell``; the pool's records carry their file as ``cell``), so k
is spread over the files as the pool is: pooled over styles, gradient scores select by
style (answer-only responses have the largest gradients), not by quality. Score methods go
through ``gradspec.selection.select``, the function behind ``gradspec select``.

Each subset fine-tunes the model with ``transformers.Trainer`` under the same budget
(``--steps`` steps of ``--batch-size``; LoRA, see ``LORA``) and seed. Evaluation uses
held-out instructions with their correct responses, taken from the end of each file (the
pool comes from its start; no pool instruction is ever evaluated, which is checked):

- response loss (mean token cross-entropy over response tokens) per task and style;
- answer accuracy by greedy generation for the tasks with a final answer (GSM8K number,
  AQuA letter, ECQA option, StrategyQA yes/no; ``mixes.extract_answer``), against the
  task's answer-only response.

Means over ``--seeds`` training seeds (the pool and its profile stay fixed; the seed moves
the random subset, the LoRA initialisation and the batch order), with 95% bootstrap
intervals over held-out items (each item's value averaged over seeds) and the difference
from ``random`` with a paired bootstrap. Every (method, seed) result is cached as JSON in
``--work``; a rerun skips finished ones.

Defaults, chosen for a 2-core CPU: pool 160 (10 per cell, 48 irrelevant), k = 64 (40%:
a perfect filter can drop every irrelevant response; random keeps about 19), 16 steps of 4
(one epoch of k), 128 tokens, 4 held-out instructions per cell (64 loss items), 12 per
answer task (48 generations of 32 tokens), 3 seeds, ``DEFAULT_METHODS`` (13: random, loss,
ifd, nuclear_norm, flag, diverse, learned and the six ``_within`` variants; the
attention/MLP nuclear norms, effective rank and layer MAD behaved like nuclear_norm in the
first run and are left to ``--methods``): 40 runs with ``base``, two at a time (``--jobs
2``: processes of one thread each, each run's result its own JSON file renamed into
place), and 160 twins for ``learned``.

Estimated wall time of the default run on two idle cores: about 40 minutes (under 45 with
a 10% margin for two processes sharing the memory bus). From CPU seconds of one thread
(``time.process_time``; the machine was loaded, so not wall seconds) on SmolLM2-135M:
profile with IFD 1.4 s per pool example (16 examples: 22.5 s), so 225 s for 160; a
fine-tune 2.2 s + 4.45 s per step of 4 (1 and 5 steps: 6.6 and 24.4 s), so 73 s; the 64
loss items 24.8 s and the 48 greedy answers about 28 s on the merged model (29.4 and 32.7
s with the LoRA adapters unmerged): a run about 127 s, ``base`` about 54 s. 225 s +
(33 x 127 s + 54 s) / 2 + about 40 s of selections and worker start = 2390 s for the
first 11 methods; ``learned`` adds its 160 twins (225 s) and 6 runs (381 s): about 3000 s.

    .venv/bin/python bench/eval_selection.py --model path/to/smollm2-135m-instruct
    .venv/bin/python bench/eval_selection.py --model M --device cuda --jobs 1 \\
        --pool-size 1600 --k 800 --steps 400 --max-length 512 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mixes import (
    ANSWER_TASKS,
    CellFiles,
    build_mix,
    extract_answer,
    normalise_gold,
    read_records,
    reasoning_cell,
    wiki_cell,
    write_json,
)
from rich.console import Console
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

import gradspec
from gradspec.batching import collate, per_example_losses, plan_batches, response_logits
from gradspec.data import Example, encode_example, load_examples
from gradspec.detector import learn_flags
from gradspec.modeling import check_model_dir, model_signature
from gradspec.selection import select
from gradspec.shared_data import REASONING_TASKS, STYLE_SUFFIXES, WIKI_SETS, shared_data_dir

GRADIENT_SCORES = (
    "nuclear_norm",
    "nuclear_norm_attn",
    "nuclear_norm_mlp",
    "effective_rank",
    "layer_mad",
    "flag",
)
# ``learned``: the probability of gradspec's learned detector (``gradspec flag --learn``:
# twins of the pool, every corruption kind, profiled beside the pool's profile).
SCORED = ("loss", "ifd", *GRADIENT_SCORES, "diverse", "learned")
# ``<method>_within``: ranked by the place within the example's source file (``select
# --within cell``), so k is spread over the files as the pool is: pooled gradient scores
# select by response style (answer-only responses have the largest gradients).
WITHIN = "cell"
METHODS = ("random", *SCORED, *(f"{method}_within" for method in SCORED))
DEFAULT_SCORED = ("loss", "ifd", "nuclear_norm", "flag", "diverse", "learned")
DEFAULT_METHODS = ("random", *DEFAULT_SCORED, *(f"{method}_within" for method in DEFAULT_SCORED))
# LoRA rather than a full fine-tune: a fraction of the optimizer state and of the weight
# gradients (the CPU budget), the adapter setting LESS fine-tunes with, and the model's
# instruction following is kept so that differences come from the subset.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
ITEM_SETS = ("pool", "held_out", "accuracy")
POOL_LAYOUT = 2  # in the pool folder's name: bump when the pool's records change (2: + cell)
console = Console(width=200)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint folder")
    parser.add_argument("--template", choices=("plain", "chat"), default="chat")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--pool-size", type=int, default=160, help="split evenly over 16 cells")
    parser.add_argument("--share", type=float, default=0.3, help="share of irrelevant responses")
    parser.add_argument("--k", type=int, default=64, help="examples kept by each method")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per fine-tune")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate")
    parser.add_argument("--max-length", type=int, default=128, help="truncate to L tokens")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="(method, seed) runs at a time, in processes of one thread (1: in this one)",
    )
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"of {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--diverse-pool",
        type=float,
        default=1.5,
        help="diverse: cover from the best POOL x k by flag (select --pool)",
    )
    parser.add_argument(
        "--learn-twins",
        type=int,
        default=160,
        help="learned: pool examples given a corrupted twin (flag --learn --twins)",
    )
    parser.add_argument("--eval-per-cell", type=int, default=4, help="held-out loss items")
    parser.add_argument("--accuracy-per-task", type=int, default=12, help="generated answers")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per answer")
    parser.add_argument("--pool-seed", type=int, default=0, help="which responses are replaced")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the (method, seed) results already finished",
    )
    parser.add_argument("--work", type=Path, default=Path(".cache/eval-selection"))
    parser.add_argument("--markdown", type=Path, default=None, help="default WORK/.../results.md")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; use {', '.join(METHODS)}")
    return args


# ---------------------------------------------------------------- pool and held-out items


@dataclass(frozen=True)
class Item:
    """One record of the pool or of the evaluation, with its cell and label."""

    record: dict[str, str]
    task: str
    style: str
    index: int  # position of the instruction in its file
    kind: str = "correct"  # "correct" or "irrelevant"
    gold: str | None = None  # normalised final answer (accuracy items only)


def all_cells(data: Path) -> list[CellFiles]:
    """Every reasoning task x style and every Wikipedia set of the shared data."""
    return [
        reasoning_cell(data, task, style) for task in REASONING_TASKS for style in STYLE_SUFFIXES
    ] + [wiki_cell(data, name) for name in WIKI_SETS]


def build_pool(cells: list[CellFiles], size: int, share: float, seed: int) -> list[Item]:
    """The first size/len(cells) instructions of each cell, a share given irrelevant twins."""
    per_cell = size // len(cells)
    if per_cell < 1:
        raise SystemExit(f"--pool-size {size}: needs at least one example per cell ({len(cells)})")
    return [
        Item({**m.record, WITHIN: cell_name(files)}, files.task, files.style, m.index, m.kind)
        for files in cells
        for m in build_mix(files, ["irrelevant"], share, seed, per_cell)
    ]


def cell_name(files: CellFiles) -> str:
    """The name of a cell's source file in the shared data, without its suffix."""
    return files.correct.stem


def build_eval(cells: list[CellFiles], per_cell: int, pool: list[Item]) -> list[Item]:
    """The last ``per_cell`` instructions of each cell with their correct responses."""
    items = []
    for files in cells:
        records = read_records(files.correct)
        first = len(records) - per_cell
        items += [Item(records[i], files.task, files.style, i) for i in range(first, len(records))]
    return checked_disjoint(items, pool)


def build_accuracy(cells: list[CellFiles], per_task: int, pool: list[Item]) -> list[Item]:
    """The last ``per_task`` instructions of each answer task, with their gold answers."""
    items = []
    for files in cells:
        if files.task not in ANSWER_TASKS or files.style != "no_cot":
            continue
        records = read_records(files.correct)
        first = len(records) - per_task
        items += [
            Item(
                records[i],
                files.task,
                "answer",
                i,
                gold=normalise_gold(files.task, records[i]["output"]),
            )
            for i in range(first, len(records))
        ]
    return checked_disjoint(items, pool)


def checked_disjoint(items: list[Item], pool: list[Item]) -> list[Item]:
    """The items, after checking that no instruction of the pool is among them."""
    seen = {item.record["instruction"] for item in pool}
    shared = [item for item in items if item.record["instruction"] in seen]
    if shared:
        first = shared[0]
        raise SystemExit(
            f"{first.task}/{first.style} record {first.index}: its instruction is also in "
            "the pool; use a smaller --pool-size or fewer held-out items"
        )
    return items


# ---------------------------------------------------------------- profile and select


def examples_of(items: list[Item], path: Path) -> list[Example]:
    """The items' records written to ``path`` and read back as gradspec examples."""
    write_json([item.record for item in items], path)
    return load_examples(path)


def profile_pool(model: Path, work: Path, args: argparse.Namespace) -> None:
    """Profile the pool (already in WORK/pool.json) once, resumably, with IFD."""
    gradspec.profile(
        model,
        work / "pool.json",
        work / "profile",
        device=args.device,
        ifd=True,
        template=args.template,
        max_length=args.max_length,
    )


def selected_indices(
    method: str, seed: int, context: dict[str, Any], args: argparse.Namespace
) -> list[int]:
    """Pool positions kept by a method (random depends on the seed, the scores do not)."""
    if method == "base":
        return []
    if method == "random":
        chosen = np.random.default_rng(seed).permutation(len(context["pool"]))[: args.k]
        return sorted(int(i) for i in chosen)
    score = method.removesuffix("_within")
    by, diverse = ("flag", True) if score == "diverse" else (score, False)
    work = context["work"]
    extra = learned_scores(context, args) if score == "learned" else None
    selection = select(
        context["run"],
        work / "pool.json",
        work / "selections" / f"{method}.json",
        str(args.k),
        by=by,
        diverse=diverse,
        pool=args.diverse_pool,
        within=WITHIN if method.endswith("_within") else None,
        extra_scores=extra,
    )
    report = selection.report
    return sorted(int(i) for i in report.loc[report["kept"], "example_index"])


def learned_scores(context: dict[str, Any], args: argparse.Namespace) -> pd.DataFrame:
    """The learned detector's probability per pool example, as the score ``learned``
    (learnt once per pool, with all corruption kinds, the pool seed as its seed)."""
    if "learned" not in context:
        learned = learn_flags(
            context["run"], sample=args.learn_twins, seed=args.pool_seed, device=args.device
        )
        console.print(
            f"learned detector: held-out AUROC {learned.summary['held_out_auroc']:.3f} "
            f"on {learned.summary['pairs']} twins ({learned.folder})"
        )
        scores = learned.ranking[["example_index", "probability"]]
        context["learned"] = scores.rename(columns={"probability": "learned"})
    return context["learned"]


# ---------------------------------------------------------------- fine-tune and evaluate


def training_rows(
    tokenizer: Any, examples: list[Example], template: str, max_length: int
) -> list[dict[str, list[int]]]:
    """The token ids and labels gradspec profiles, for the examples with response tokens."""
    encoded = [encode_example(tokenizer, ex, template, max_length) for ex in examples]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if not e.skip_reason]


def fine_tune(
    model_dir: Path, tokenizer: Any, examples: list[Example], seed: int, args: argparse.Namespace
) -> torch.nn.Module:
    """A LoRA fine-tune of the model on the examples (same steps, batch and seed for all),
    merged into the weights so that evaluating it costs what the base model costs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    training = TrainingArguments(
        output_dir=str(args.work / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=args.device == "cpu",
    )
    data = training_rows(tokenizer, examples, args.template, args.max_length)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    Trainer(model=model, args=training, train_dataset=data, data_collator=collator).train()
    return model.merge_and_unload().eval()


@torch.no_grad()
def response_losses(
    model: torch.nn.Module, tokenizer: Any, examples: list[Example], args: argparse.Namespace
) -> list[float]:
    """Each held-out example's mean cross-entropy over its response tokens."""
    encoded = [encode_example(tokenizer, ex, args.template, args.max_length) for ex in examples]
    device = next(model.parameters()).device
    losses = [float("nan")] * len(examples)
    for members in plan_batches([len(e.input_ids) for e in encoded], 8, 0):
        batch = collate(members, encoded, tokenizer.pad_token_id, "right", device)
        values = per_example_losses(*response_logits(model, batch))
        for member, value in zip(members, values.tolist(), strict=True):
            losses[member] = value
    return losses


@torch.no_grad()
def generated_answers(
    model: torch.nn.Module, tokenizer: Any, examples: list[Example], args: argparse.Namespace
) -> list[str]:
    """Greedy continuations of the examples' prompts (the template's generation prompt)."""
    prompts = []
    for ex in examples:
        enc = encode_example(tokenizer, ex, args.template)
        prompts.append(enc.input_ids[: enc.n_prompt_tokens])
    device = next(model.parameters()).device
    texts = [""] * len(examples)
    for members in plan_batches([len(p) for p in prompts], 16, 0):
        width = max(len(prompts[m]) for m in members)
        ids = torch.full((len(members), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, m in enumerate(members):
            ids[row, width - len(prompts[m]) :] = torch.tensor(prompts[m])
            mask[row, width - len(prompts[m]) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, m in enumerate(members):
            texts[m] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return texts


def evaluate(model: torch.nn.Module, context: dict[str, Any], args: argparse.Namespace) -> dict:
    """Per-item response losses, generated texts and whether each answer is right."""
    tokenizer, accuracy = context["tokenizer"], context["accuracy"]
    texts = generated_answers(model, tokenizer, context["examples"]["accuracy"], args)
    answers = [
        extract_answer(it.task, text, it.record["instruction"])
        for it, text in zip(accuracy, texts, strict=True)
    ]
    return {
        "loss": response_losses(model, tokenizer, context["examples"]["held_out"], args),
        "generated": texts,
        "answer": answers,
        "correct": [a == it.gold for a, it in zip(answers, accuracy, strict=True)],
    }


def result_path(method: str, seed: int, context: dict[str, Any], args: argparse.Namespace) -> Path:
    return context["work"] / setting_name(args) / f"{method}_seed{seed}.json"


def cached_result(
    method: str, seed: int, context: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any] | None:
    """The finished result of a (method, seed), or None."""
    path = result_path(method, seed, context, args)
    return json.loads(path.read_text()) if path.exists() else None


def run_one(
    method: str, seed: int, kept: list[int], context: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Fine-tune on the kept pool positions (none: the base model), evaluate, and save the
    result atomically (a rename), so an interrupted run never leaves a partial file."""
    started = time.perf_counter()
    pool, tokenizer = context["pool"], context["tokenizer"]
    if kept:
        examples = [context["examples"]["pool"][i] for i in kept]
        model = fine_tune(context["model"], tokenizer, examples, seed, args)
    else:
        model = AutoModelForCausalLM.from_pretrained(context["model"], dtype=torch.float32).eval()
    model.to(args.device)
    result = {
        "method": method,
        "seed": seed,
        "kept": kept,
        "irrelevant_kept": float(np.mean([pool[i].kind == "irrelevant" for i in kept]))
        if kept
        else float("nan"),
        **evaluate(model, context, args),
    }
    result["seconds"] = time.perf_counter() - started
    path = result_path(method, seed, context, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(result))
    partial.replace(path)
    return result


WORKER: dict[str, Any] = {}  # a --jobs worker's context, built once per process


def start_worker(args: argparse.Namespace) -> None:
    """A --jobs worker: one thread, the pool and items of the parent (already profiled)."""
    torch.set_num_threads(1)
    WORKER.update(context_of(args))


def run_in_worker(method: str, seed: int, kept: list[int], args: argparse.Namespace) -> dict:
    return run_one(method, seed, kept, WORKER, args)


def run_units(
    units: list[tuple[str, int]], context: dict[str, Any], args: argparse.Namespace
) -> None:
    """Fine-tune and evaluate each (method, seed), ``--jobs`` at a time; selections are made
    here first (they are cheap and some are shared between seeds)."""
    kept = {unit: selected_indices(*unit, context, args) for unit in units}
    if args.jobs == 1:
        for unit in units:
            show(run_one(*unit, kept[unit], context, args))
        return
    with ProcessPoolExecutor(
        args.jobs, mp_context=get_context("spawn"), initializer=start_worker, initargs=(args,)
    ) as workers:
        futures = [workers.submit(run_in_worker, *unit, kept[unit], args) for unit in units]
        for future in as_completed(futures):
            show(future.result())


def show(result: dict[str, Any]) -> None:
    """One line per finished (method, seed)."""
    console.print(
        f"{result['method']} seed {result['seed']}: loss {np.nanmean(result['loss']):.3f}, "
        f"accuracy {np.mean(result['correct']):.1%}, irrelevant kept "
        f"{result['irrelevant_kept']:.1%} ({result['seconds']:.0f} s)"
    )


# ---------------------------------------------------------------- summary


def bootstrap_mean(values: np.ndarray, rng: np.random.Generator, repeats: int = 2000) -> tuple:
    """Mean and 95% percentile-bootstrap interval over the rows (items)."""
    rows = rng.integers(0, len(values), size=(repeats, len(values)))
    means = np.nanmean(values[rows], axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(np.nanmean(values)), float(low), float(high)


def item_values(results: list[dict[str, Any]], metric: str) -> dict[tuple[str, int], np.ndarray]:
    """Each (method, seed)'s per-item values of a metric."""
    return {(r["method"], r["seed"]): np.asarray(r[metric], dtype=float) for r in results}


def seeds_of(values: dict[tuple[str, int], np.ndarray], method: str) -> list[int]:
    return sorted(seed for m, seed in values if m == method)


def summary_rows(
    values: dict[tuple[str, int], np.ndarray],
    items: list[Item],
    by: str,
    methods: list[str],
    versus_random: bool,
) -> list[dict[str, str]]:
    """One row per method: its mean [95% CI] over all items and per group of ``by``, each
    item averaged over the method's seeds; or (``versus_random``) its difference from
    random, paired by item and seed (over the seeds both have)."""
    groups = np.array([getattr(it, by) for it in items])
    rows = []
    for method in methods:
        seeds = seeds_of(values, method)
        if versus_random:
            if method in ("random", "base"):
                continue
            seeds = [s for s in seeds if s in seeds_of(values, "random")]
        if not seeds:
            continue
        per_seed = [
            values[method, s] - values["random", s] if versus_random else values[method, s]
            for s in seeds
        ]
        per_item = np.mean(per_seed, axis=0)
        row = {"method": method, "seeds": str(len(seeds))}
        for group in ["all", *dict.fromkeys(groups)]:
            part = per_item if group == "all" else per_item[groups == group]
            mean, low, high = bootstrap_mean(part, np.random.default_rng(0))
            sign = "+" if versus_random else ""
            row[group] = f"{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    """A GitHub Markdown table of string cells."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def kept_table(
    results: list[dict[str, Any]], methods: list[str], pool: list[Item]
) -> list[dict[str, str]]:
    """Per method: the share of irrelevant examples kept, what it kept of each style (with
    the irrelevant share among them; averaged over seeds) and the seconds per run."""
    styles = list(dict.fromkeys(item.style for item in pool))
    rows = []
    for method in methods:
        mine = [r for r in results if r["method"] == method and r["kept"]]
        if not mine:
            continue
        row = {
            "method": method,
            "seeds": str(len(mine)),
            "irrelevant kept": f"{np.mean([r['irrelevant_kept'] for r in mine]):.1%}",
        }
        for style in styles:
            kept = [[pool[i] for i in r["kept"] if pool[i].style == style] for r in mine]
            count = np.mean([len(k) for k in kept])
            bad = [it.kind == "irrelevant" for k in kept for it in k]
            row[f"{style} kept (irrelevant)"] = (
                f"{count:.1f} ({np.mean(bad):.0%})" if bad else f"{count:.1f}"
            )
        row["seconds per run"] = f"{np.mean([r['seconds'] for r in mine]):.0f}"
        rows.append(row)
    return rows


def seed_spread(results: list[dict[str, Any]], methods: list[str]) -> list[dict[str, str]]:
    """Per method: mean held-out loss and accuracy of each seed (training noise)."""
    rows = []
    for method in methods:
        mine = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if mine:
            rows.append(
                {
                    "method": method,
                    "loss per seed": ", ".join(f"{np.nanmean(r['loss']):.3f}" for r in mine),
                    "accuracy per seed": ", ".join(f"{np.mean(r['correct']):.1%}" for r in mine),
                }
            )
    return rows


def report(
    results: list[dict[str, Any]],
    context: dict[str, Any],
    methods: list[str],
    header: str,
) -> str:
    """The Markdown report: kept shares, losses and accuracies per style/task, seeds."""
    held_out, accuracy = context["held_out"], context["accuracy"]
    losses = item_values(results, "loss")
    correct = item_values(results, "correct")
    sections = [
        header,
        "### What each method kept (irrelevant in the pool: "
        f"{np.mean([it.kind == 'irrelevant' for it in context['pool']]):.1%})\n\n"
        + markdown(kept_table(results, methods, context["pool"])),
    ]
    for title, table, items, by in (
        ("Held-out response loss per style (lower is better)", losses, held_out, "style"),
        ("Held-out response loss per task", losses, held_out, "task"),
        (
            "Answer accuracy by greedy generation per task (share correct)",
            correct,
            accuracy,
            "task",
        ),
    ):
        sections += [
            f"### {title}\n\n" + markdown(summary_rows(table, items, by, methods, False)),
            f"### {title}: difference from random (paired)\n\n"
            + markdown(summary_rows(table, items, by, methods, True)),
        ]
    sections.append("### Per seed (training noise)\n\n" + markdown(seed_spread(results, methods)))
    return "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------- main


def pool_name(args: argparse.Namespace) -> str:
    """The folder of one pool and its profile, shared by every training setting."""
    return (
        f"pool{args.pool_size}_s{args.share}_p{args.pool_seed}_{args.template}_L{args.max_length}"
        f"_v{POOL_LAYOUT}"
    )


def setting_name(args: argparse.Namespace) -> str:
    """The folder of one training and evaluation setting: results are never mixed."""
    return (
        f"k{args.k}_steps{args.steps}x{args.batch_size}_lr{args.lr}_d{args.diverse_pool}_"
        f"e{args.eval_per_cell}_a{args.accuracy_per_task}x{args.new_tokens}"
    )


def context_of(args: argparse.Namespace) -> dict[str, Any]:
    """Pool, held-out items, their examples and the tokenizer (no model loaded)."""
    model = check_model_dir(args.model)
    key = model_signature(model)["config_and_tokenizer_sha256"][:12]
    work = args.work / f"{model.name}-{key}" / pool_name(args)
    cells = all_cells(shared_data_dir())
    pool = build_pool(cells, args.pool_size, args.share, args.pool_seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = {
        "model": model,
        "work": work,
        "run": work / "profile",
        "pool": pool,
        "held_out": build_eval(cells, args.eval_per_cell, pool),
        "accuracy": build_accuracy(cells, args.accuracy_per_task, pool),
        "tokenizer": tokenizer,
    }
    context["examples"] = {
        name: examples_of(context[name], work / f"{name}.json") for name in ITEM_SETS
    }
    return context


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The context, after profiling the pool (once: a finished profile is reused)."""
    context = context_of(args)
    started = time.perf_counter()
    profile_pool(context["model"], context["work"], args)
    console.print(f"pool profiled in {time.perf_counter() - started:.0f} s ({context['work']})")
    return context


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    context = prepare(args)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    units = [("base", 0), *((method, seed) for seed in seeds for method in methods)]
    if not args.report_only:
        pending = [unit for unit in units if cached_result(*unit, context, args) is None]
        run_units(pending, context, args)
    results = [r for unit in units if (r := cached_result(*unit, context, args)) is not None]
    pool = context["pool"]
    header = (
        f"Model `{context['model'].name}` (template {args.template}, "
        f"max length {args.max_length}); "
        f"pool {len(pool)} ({args.share:.0%} irrelevant, pool seed {args.pool_seed}); k = "
        f"{args.k}; LoRA {LORA}, {args.steps} steps x batch {args.batch_size}, lr {args.lr}; "
        f"seeds {args.seeds}{' (finished ones only)' if args.report_only else ''}; "
        f"{len(context['held_out'])} held-out loss items, "
        f"{len(context['accuracy'])} accuracy items ({args.new_tokens} new tokens). `base` = "
        "the model before fine-tuning. Cells: mean [95% bootstrap CI over items, each item "
        "averaged over seeds]; differences from random are paired by item and seed."
    )
    text = report(results, context, ["base", *methods], header)
    path = args.markdown or context["work"] / setting_name(args) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    console.print(text)
    return path


if __name__ == "__main__":
    main()
