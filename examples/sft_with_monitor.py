"""Fine-tune a small causal LM on a mix with 20% irrelevant responses, watched by gradspec.

The mix: GSM8K questions of the shared data with their chain-of-thought answers, of which
20% get the shared data's *irrelevant* response instead (a known bad label). Training runs
on the CPU with TensorBoard logs (``<out>/trainer/runs``); the monitor profiles every
``--every`` steps and flags online. At the end the script draws ``--figure``: the mean
nuclear norm per layer kind over steps for correct vs irrelevant examples, and the AUROC
of the online flag score against the known irrelevant examples, next to that of the loss
(both over the examples the flag scored).

    .venv/bin/python examples/sft_with_monitor.py    # the demo's SmolLM2-135M-Instruct
    .venv/bin/python examples/sft_with_monitor.py --model path/to/checkpoint-or.gguf
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

import gradspec
from gradspec.demo import demo_model_path
from gradspec.integrations.transformers import watch
from gradspec.labels import CORRECTNESS
from gradspec.modeling import resolve_checkpoint
from gradspec.quality import auroc
from gradspec.shared_data import reasoning_file, shared_data_dir

REPO = Path(__file__).resolve().parents[1]


def mixed_records(data_dir: Path, n: int, irrelevant_share: float, seed: int) -> list[dict]:
    """n records; a share of them take the irrelevant response of the same question."""
    correct, irrelevant = (
        json.loads((data_dir / reasoning_file("gsm8k", "with_cot", c)).read_text())[:n]
        for c in CORRECTNESS
    )
    bad = set(random.Random(seed).sample(range(n), round(irrelevant_share * n)))
    return [
        {**(irrelevant[i] if i in bad else correct[i]), "irrelevant": i in bad} for i in range(n)
    ]


def tokenized(records: list[dict], tokenizer, max_length: int) -> Dataset:
    rows = []
    for i, record in enumerate(records):
        fields = {k: record[k] for k in ("instruction", "input", "output") if k in record}
        input_ids, labels = gradspec.encode(tokenizer, fields, max_length=max_length)
        rows.append({"input_ids": input_ids, "labels": labels, "example_id": str(i)})
    return Dataset.from_list(rows)


def draw(run: Path, records: list[dict], figure: Path) -> dict[str, float]:
    """Spectra over steps (correct vs irrelevant) and AUROC of flag score and loss."""
    examples = pd.read_parquet(run / "examples")
    spectra = pd.read_parquet(run / "spectra")
    bad = np.array([r["irrelevant"] for r in records])
    examples["irrelevant"] = bad[examples["source_line"]]
    spectra = spectra.merge(examples[["example_index", "irrelevant"]], on="example_index")
    curves = spectra.groupby(["step", "kind", "irrelevant"])["nuclear_norm"].mean().unstack()
    scored = examples.dropna(subset=["flag_score"])  # the flag's window was full enough
    result = {
        name: auroc(scored[column].to_numpy(), scored["irrelevant"].to_numpy())
        for name, column in (("online flag", "flag_score"), ("loss", "loss"))
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (kind, irrelevant), series in curves.stack().groupby(level=[1, 2]):
        label = f"{kind}, {'irrelevant' if irrelevant else 'correct'}"
        left.plot(series.index.get_level_values(0), series.to_numpy(), marker="o", label=label)
    left.set(xlabel="step", ylabel="mean nuclear norm", yscale="log", title="spectra over steps")
    left.legend()
    right.bar(list(result), list(result.values()), color=["tab:blue", "tab:gray"])
    right.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    right.set(ylim=(0, 1), ylabel="AUROC vs irrelevant", title="online flag vs loss")
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="checkpoint folder or .gguf file; default the demo's SmolLM2-135M-Instruct GGUF",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="the shared data")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "sft_monitor")
    parser.add_argument(
        "--figure", type=Path, default=REPO / "docs" / "assets" / "sft_with_monitor.png"
    )
    parser.add_argument("--examples", type=int, default=120)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=160)
    args = parser.parse_args()

    torch.manual_seed(0)
    records = mixed_records(args.data_dir or shared_data_dir(), args.examples, 0.2, seed=0)
    model_dir = resolve_checkpoint(args.model or demo_model_path()).directory
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = Trainer(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        TrainingArguments(
            output_dir=str(args.out / "trainer"),
            per_device_train_batch_size=4,
            num_train_epochs=args.epochs,
            learning_rate=2e-5,
            logging_steps=args.every,
            report_to=["tensorboard"],
            save_strategy="no",
            use_cpu=True,
            seed=0,
        ),
        train_dataset=tokenized(records, tokenizer, args.max_length),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    watch(trainer, args.out / "run", id_column="example_id", window=64, min_window=8)
    trainer.train()
    result = draw(args.out / "run", records, args.figure)
    print(json.dumps({"auroc": result, "figure": str(args.figure)}, indent=2))


if __name__ == "__main__":
    main()
