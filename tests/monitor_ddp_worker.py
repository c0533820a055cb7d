"""One rank of the monitor's DDP test (run by torchrun from test_monitor.py): trains the tiny
model on 2 gloo processes, profiles step 2, saves the model before it (rank 0), and writes
what this rank logged and flagged to ``<out>/rank<r>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import load_from_disk
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradspec.integrations.transformers import watch

PROFILED_STEP = 2


class Record(TrainerCallback):
    """Saves the model before the profiled step (rank 0) and keeps the gradspec logs."""

    def __init__(self, checkpoint: Path, tokenizer):
        self.checkpoint, self.tokenizer, self.logs = checkpoint, tokenizer, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == PROFILED_STEP and dist.get_rank() == 0:
            model.save_pretrained(self.checkpoint)
            self.tokenizer.save_pretrained(self.checkpoint)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.update({k: v for k, v in (logs or {}).items() if k.startswith("gradspec/")})


def main(model_dir: str, data_dir: str, out: str) -> None:
    out_dir = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = Trainer(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        TrainingArguments(
            output_dir=str(out_dir / "trainer"),
            per_device_train_batch_size=2,
            max_steps=3,
            logging_steps=PROFILED_STEP,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            ddp_backend="gloo",
            seed=0,
        ),
        train_dataset=load_from_disk(data_dir),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    callback = watch(trainer, out_dir / "run", id_column="example_id", min_window=2)
    record = Record(out_dir / "checkpoint", tokenizer)
    trainer.add_callback(record)
    trainer.train()
    step = callback.last_step
    result = {
        "world_size": dist.get_world_size(),
        "logs": record.logs,
        "ids": [o.example_id for o in step.occurrences],
        "scores": [None if s != s else s for s in step.scores.tolist()],
        "flagged": step.flagged.tolist(),
    }
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
