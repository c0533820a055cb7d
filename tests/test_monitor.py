"""The training monitor: spectra from the Trainer's own steps equal `gradspec profile` on a
checkpoint saved just before the step; training itself is unchanged."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import GSM8K, read_shared
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradspec
from gradspec.data import load_examples
from gradspec.errors import GradspecError, GradspecWarning
from gradspec.families import coverage, find_targets
from gradspec.integrations.sinks import SINKS, MonitorSink
from gradspec.integrations.transformers import watch
from gradspec.quality import OnlineFlagger
from gradspec.statistics import STAT_COLUMNS
from gradspec.store import load_run

N_EXAMPLES = 8
PROFILED_STEP = 2


@pytest.fixture(scope="module")
def data_file(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight real records, short enough for a fast tiny model."""
    records = [r for r in read_shared(GSM8K, 40) if len(r["instruction"] + r["output"]) < 600]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(records[:N_EXAMPLES]))
    return path


@pytest.fixture(scope="module")
def train_dataset(data_file: Path, tokenizer) -> Dataset:
    """The records tokenized exactly as `gradspec profile` does, with their example ids."""
    rows = []
    for example in load_examples(data_file):
        input_ids, labels = gradspec.encode(tokenizer, example)
        rows.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "attention_mask": [1] * len(input_ids),
                "example_id": example.example_id,
            }
        )
    return Dataset.from_list(rows)


class SaveBefore(TrainerCallback):
    """Saves the model just before optimizer step ``step``; a LoRA model is rebuilt from
    ``rebuild`` with the weights of then and saved merged (a model with the monitor's hooks
    cannot be deep-copied)."""

    def __init__(self, step: int, directory: Path, tokenizer, rebuild=None):
        self.step, self.directory, self.tokenizer = step, directory, tokenizer
        self.rebuild = rebuild
        self.state: dict[str, torch.Tensor] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 != self.step:
            return
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.rebuild is None:
            model.save_pretrained(self.directory)
        else:
            self.model_before().merge_and_unload().save_pretrained(self.directory)
        self.tokenizer.save_pretrained(self.directory)

    def model_before(self) -> torch.nn.Module:
        """A fresh LoRA model with the weights saved before the step."""
        model = self.rebuild()
        model.load_state_dict(self.state)
        return model


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    tokenizer,
    out: Path,
    *,
    monitor: bool = True,
    trainer_class: type = Trainer,
    rebuild=None,
    watch_options: dict | None = None,
    loss_scale: float | None = None,
    extra_callbacks: tuple[TrainerCallback, ...] = (),
    **arguments,
):
    """Three optimizer steps; the monitor profiles step 2; a checkpoint is saved before it.

    ``loss_scale`` (with fp16=True) does on the CPU what accelerate does for fp16 on a GPU
    and refuses on a CPU: float16 autocast and a GradScaler multiplying the loss."""
    settings = dict(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=PROFILED_STEP,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        remove_unused_columns=True,
    )
    settings.update(arguments)
    if trainer_class is Trainer:
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        trainer = Trainer(
            model, TrainingArguments(**settings), train_dataset=dataset, data_collator=collator
        )
    else:
        from trl import SFTConfig

        trainer = trainer_class(
            model=model,
            args=SFTConfig(**settings),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    if loss_scale is not None:
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale)
    callback = (
        watch(trainer, out / "run", id_column="example_id", **(watch_options or {}))
        if monitor
        else None
    )
    saver = SaveBefore(PROFILED_STEP, out / "checkpoint", tokenizer, rebuild)
    trainer.add_callback(saver)
    for extra in extra_callbacks:
        trainer.add_callback(extra)
    trainer.train()
    return trainer, callback, saver


def reference_spectra(checkpoint: Path, data_file: Path, out: Path) -> pd.DataFrame:
    """`gradspec profile` of every example on the checkpoint, by (example id, param)."""
    tables = gradspec.profile(checkpoint, data_file, out, device="cpu", batch_size=1)
    return tables.spectra.set_index(["example_id", "param"])[list(STAT_COLUMNS)]


def monitored_spectra(run_dir: Path, base_name=lambda p: p) -> pd.DataFrame:
    """The monitor's rows of its run directory (one profiled step), by (example id, param)."""
    spectra = load_run(run_dir).spectra
    spectra["param"] = spectra["param"].map(base_name)
    return spectra.set_index(["example_id", "param"])[list(STAT_COLUMNS)]


def assert_same_spectra(monitored: pd.DataFrame, reference: pd.DataFrame) -> None:
    assert len(monitored) > 0
    expected = reference.loc[monitored.index]
    np.testing.assert_allclose(monitored.to_numpy(), expected.to_numpy(), rtol=1e-4, atol=1e-9)


def tiny(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
    ],
    ids=["full", "grad-accumulation", "checkpointing", "checkpointing-reentrant"],
)
def test_spectra_equal_profile_of_checkpoint(
    arguments, device, tiny_model, tokenizer, train_dataset, data_file, tmp_path
):
    """The Trainer on each device (CUDA where there is one); the CPU profile is the reference."""
    model = tiny(tiny_model("llama"))
    train(model, train_dataset, tokenizer, tmp_path, use_cpu=device == "cpu", **arguments)
    assert next(model.parameters()).device.type == device
    reference = reference_spectra(tmp_path / "checkpoint", data_file, tmp_path / "ref")
    monitored = monitored_spectra(tmp_path / "run")
    assert monitored.index.get_level_values(0).nunique() == 4  # the step's four examples
    assert_same_spectra(monitored, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "dtype", "loss_scale"),
    [("bf16", torch.bfloat16, None), ("fp16", torch.float16, 2.0**16)],
)
def test_autocast_spectra_equal_profile_under_autocast(
    precision, dtype, loss_scale, tiny_model, tokenizer, train_dataset, data_file, tmp_path
):
    """bf16=True, or fp16=True with a GradScaler multiplying the loss by 2^16 (CPU
    autocast, the Trainer's forward only, as accelerate wraps it; the monitor reads the
    scale off the logits' gradient): the step's spectra equal `gradspec profile` of the
    checkpoint run under the same autocast, to that precision. Not to float32 precision:
    the Trainer's loss weights every token by 1/(batch tokens), the profile by 1/(the
    example's tokens), so the low-precision gradients are rounded at other scales in every
    backward GEMM; differences measured are up to ~1.3e-3 relative (nuclear norm) and
    3.8e-3 (effective rank) in bf16, one bf16 unit roundoff (2^-8 = 3.9e-3), and 4e-3
    (stable rank) in fp16, hence rtol 1e-2. They exceed float32's 1e-4 against a float32
    profile, so autocast did run."""
    options = {precision: True, "loss_scale": loss_scale}
    trainer, _, _ = train(tiny(tiny_model("llama")), train_dataset, tokenizer, tmp_path, **options)
    if loss_scale is not None:  # the scaler did scale: it counted finite steps or backed off
        scaler = trainer.accelerator.scaler.state_dict()
        assert scaler["_growth_tracker"] > 0 or scaler["scale"] < loss_scale
    with torch.autocast("cpu", dtype=dtype):
        tables = gradspec.profile(
            tmp_path / "checkpoint", data_file, tmp_path / "ref", device="cpu", batch_size=1
        )
    under_autocast = tables.spectra.set_index(["example_id", "param"])[list(STAT_COLUMNS)]
    monitored = monitored_spectra(tmp_path / "run")
    assert monitored.index.get_level_values(0).nunique() == 4
    expected = under_autocast.loc[monitored.index].to_numpy()
    np.testing.assert_allclose(monitored.to_numpy(), expected, rtol=1e-2, atol=1e-9)
    float32 = reference_spectra(tmp_path / "checkpoint", data_file, tmp_path / "ref32")
    relative = np.abs(monitored.to_numpy() / float32.loc[monitored.index].to_numpy() - 1)
    assert relative.max() > 1e-4


class HookCounter(TrainerCallback):
    """The number of forward hooks on the model's modules as each step begins (after the
    monitor's own on_step_begin) and after it ends."""

    def __init__(self) -> None:
        self.at_begin: list[int] = []
        self.at_end: list[int] = []

    @staticmethod
    def hooks(model: torch.nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at_begin.append(self.hooks(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at_end.append(self.hooks(model))


class StepRecorder(MonitorSink):
    """An output of its own: every profiled step handed to the sinks, kept."""

    steps: ClassVar[list] = []

    @classmethod
    def open(cls, run):
        cls.steps = []
        return cls()

    def write(self, step):
        self.steps.append(step)


def test_a_new_sink_receives_each_profiled_step_as_the_run_directory_holds_it(
    tiny_model, tokenizer, train_dataset, tmp_path
):
    model = tiny(tiny_model("llama"))
    options = {"sinks": (*SINKS, StepRecorder), "min_window": 2}
    _, callback, _ = train(model, train_dataset, tokenizer, tmp_path, watch_options=options)
    assert [step.step for step in StepRecorder.steps] == [PROFILED_STEP]
    step = StepRecorder.steps[0]
    tables = load_run(tmp_path / "run")
    examples = tables.examples.set_index("example_index")
    assert examples["example_id"].tolist() == [o.example_id for o in step.occurrences]
    assert examples["source_line"].tolist() == [o.row for o in step.occurrences]
    np.testing.assert_array_equal(examples["flag_score"].to_numpy(), step.scores)
    spectra = tables.spectra.sort_values(["example_index", "param"])
    expected = pd.DataFrame(
        [
            {"example_index": i, "param": t.param, **dict(zip(STAT_COLUMNS, row, strict=True))}
            for i, o in enumerate(step.occurrences)
            for t, row in zip(callback.capture.targets, o.statistics, strict=True)
        ]
    ).sort_values(["example_index", "param"])
    columns = ["example_index", "param", *STAT_COLUMNS]
    pd.testing.assert_frame_equal(
        spectra[columns].reset_index(drop=True), expected[columns].reset_index(drop=True)
    )


def test_hooks_only_on_profiled_steps(tiny_model, tokenizer, train_dataset, tmp_path):
    """Steps that are not profiled run with no hook of the monitor's (no idle cost): on the
    profiled step 2 of 3, one per target matrix and three on the model and its LM head."""
    model = tiny(tiny_model("llama"))
    before = HookCounter.hooks(model)
    counter = HookCounter()
    _, callback, _ = train(model, train_dataset, tokenizer, tmp_path, extra_callbacks=(counter,))
    targets = len(callback.capture.targets)
    assert counter.at_begin == [before, before + targets + 3, before]
    assert counter.at_end == [before] * 3
    assert load_run(tmp_path / "run").spectra["step"].unique().tolist() == [PROFILED_STEP]


def test_a_training_run_states_its_coverage(tiny_model, tokenizer, train_dataset, tmp_path):
    """The run's manifest holds the coverage `gradspec profile` states for the same matrices
    (here q, k, v, o), and the monitor warns naming the MLP weights it leaves out."""
    model = tiny(tiny_model("llama"))
    with pytest.warns(GradspecWarning, match=r"left out: model\.layers\.\*\.mlp\.down_proj"):
        train(model, train_dataset, tokenizer, tmp_path, watch_options={"modules": "attn"})
    stated = load_run(tmp_path / "run").manifest["coverage"]
    expected = coverage(model, find_targets(model, "attn")).as_dict()
    assert stated == json.loads(json.dumps(expected))
    assert 0 < stated["share"] < 1 and len(stated["left_out"]) == 3 * len(model.model.layers)


@pytest.mark.slow
def test_training_unchanged_by_monitor(tiny_model, tokenizer, train_dataset, tmp_path):
    """Every step profiled, the final weights equal those of a run without the monitor."""
    runs = []
    for monitor in (True, False):
        trainer, *_ = train(
            tiny(tiny_model("llama")),
            train_dataset,
            tokenizer,
            tmp_path / str(monitor),
            monitor=monitor,
            logging_steps=1,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
        )
        runs.append(trainer.model.state_dict())
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


def lora_model(model_dir: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"])
    return get_peft_model(tiny(model_dir), config)


def base_param_name(param: str) -> str:
    """The merged model's name of a LoRA model's base matrix; LoRA matrices keep theirs."""
    if "lora_" in param:
        return param
    return param.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.mark.slow
def test_lora_base_and_adapter_matrices(tiny_model, tokenizer, train_dataset, data_file, tmp_path):
    """Frozen base matrices equal the merged checkpoint's profile; LoRA matrices equal the
    float64 SVD of the explicitly built per-example gradient."""
    model_dir = tiny_model("llama")
    _, callback, saver = train(
        lora_model(model_dir),
        train_dataset,
        tokenizer,
        tmp_path,
        rebuild=lambda: lora_model(model_dir),
    )
    monitored = monitored_spectra(tmp_path / "run", base_param_name)
    is_lora = monitored.index.get_level_values(1).str.contains("lora_")
    modules = {t.module_name for t in callback.capture.targets}
    assert {"q_proj", "q_proj.lora_A", "q_proj.lora_B", "down_proj.lora_B"} <= modules
    reference = reference_spectra(tmp_path / "checkpoint", data_file, tmp_path / "ref")
    assert_same_spectra(monitored[~is_lora], reference)

    by_id = {row["example_id"]: row for row in train_dataset}
    model = saver.model_before().double()
    for (example_id, param), values in monitored[is_lora].iterrows():
        row = by_id[example_id]
        weight = model.get_parameter(param)
        model.zero_grad()
        model(
            input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])
        ).loss.backward()
        singular = torch.linalg.svdvals(weight.grad)
        np.testing.assert_allclose(values["nuclear_norm"], float(singular.sum()), rtol=1e-4)
        np.testing.assert_allclose(values["spectral_norm"], float(singular[0]), rtol=1e-4)


@pytest.mark.slow
def test_sft_trainer(tiny_model, tokenizer, train_dataset, data_file, tmp_path):
    """TRL's SFTTrainer (fused LM head, completion-only loss) on pre-tokenized rows."""
    from trl import SFTTrainer

    completion = [
        {
            "input_ids": row["input_ids"],
            "completion_mask": [int(label != -100) for label in row["labels"]],
            "example_id": row["example_id"],
        }
        for row in train_dataset
    ]
    dataset = Dataset.from_list(completion)
    train(
        tiny(tiny_model("llama")),
        dataset,
        tokenizer,
        tmp_path,
        trainer_class=SFTTrainer,
        completion_only_loss=True,
        bf16=False,  # SFTConfig's default autocast; the profile runs in float32
    )
    reference = reference_spectra(tmp_path / "checkpoint", data_file, tmp_path / "ref")
    assert_same_spectra(monitored_spectra(tmp_path / "run"), reference)


def test_packed_rows_are_refused(tiny_model, tokenizer, train_dataset, tmp_path):
    packed = Dataset.from_list(
        [
            {
                "input_ids": row["input_ids"],
                "labels": row["labels"],
                "example_id": row["example_id"],
                "position_ids": list(range(5)) + list(range(len(row["input_ids"]) - 5)),
            }
            for row in train_dataset
        ]
    )
    with pytest.raises(GradspecError, match="one example per row"):
        train(
            tiny(tiny_model("llama")),
            packed,
            tokenizer,
            tmp_path,
            max_steps=PROFILED_STEP,
            per_device_train_batch_size=1,
        )


@pytest.mark.slow
def test_aggregates_reach_tensorboard_and_rows_are_scored(
    tiny_model, tokenizer, train_dataset, tmp_path
):
    """The logged aggregates are read back from TensorBoard's event files and equal those of
    the run directory's rows, which `gradspec score` reads."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradspec.quality import example_scores

    train(
        tiny(tiny_model("llama")),
        train_dataset,
        tokenizer,
        tmp_path,
        report_to=["tensorboard"],
    )
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    tables = load_run(tmp_path / "run")
    attn = tables.spectra[tables.spectra["kind"] == "attn"]
    assert logged["train/gradspec/attn/nuclear_norm_mean"] == pytest.approx(
        attn["nuclear_norm"].mean(), rel=1e-6
    )
    assert logged["train/gradspec/mlp/effective_rank_max"] == pytest.approx(
        tables.spectra.loc[tables.spectra["kind"] == "mlp", "effective_rank"].max(), rel=1e-6
    )
    assert "train/gradspec/flagged_frac" in logged
    scores = example_scores(tables)
    assert len(scores) == 4 and scores["nuclear_norm"].notna().all()


def logged_aggregates(run_dir: Path) -> dict[str, float]:
    """What the monitor logs for its one profiled step, recomputed with pandas from the
    run directory's rows: each kind's statistics over its (example, matrix) values."""
    spectra = read_parts(run_dir / "spectra")
    expected = {}
    for kind, rows in spectra.groupby("kind"):
        for stat in STAT_COLUMNS:
            values = rows[stat]
            aggregates = {"mean": values.mean(), "p95": values.quantile(0.95), "max": values.max()}
            for name, value in aggregates.items():
                expected[f"gradspec/{kind}/{stat}_{name}"] = float(value)
    return expected


def assert_logged(logged: dict[str, float], run_dir: Path, prefix: str = "") -> None:
    """Every aggregate of the profiled step was logged, with its value; nothing flagged."""
    expected = logged_aggregates(run_dir)
    assert len(expected) == 2 * len(STAT_COLUMNS) * 3
    for key, value in expected.items():
        assert logged[prefix + key] == pytest.approx(value, rel=1e-12), key
    assert logged[prefix + "gradspec/flagged_frac"] == 0.0  # the window is still filling


@pytest.mark.slow
def test_aggregates_reach_mlflow(tiny_model, tokenizer, train_dataset, tmp_path, monkeypatch):
    """report_to=["mlflow"] with a local file store: the aggregates are read back with the
    MLflow client at the profiled step and equal those of the run directory's rows."""
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # no SQL database needed
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "gradspec-test")
    train(tiny(tiny_model("llama")), train_dataset, tokenizer, tmp_path, report_to=["mlflow"])

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("gradspec-test")
    (run,) = client.search_runs([experiment.experiment_id])
    keys = [k for k in run.data.metrics if k.startswith("gradspec/")]
    histories = {k: client.get_metric_history(run.info.run_id, k) for k in keys}
    assert all([m.step for m in history] == [PROFILED_STEP] for history in histories.values())
    assert "loss" in run.data.metrics  # the same run as the loss
    assert_logged({k: history[0].value for k, history in histories.items()}, tmp_path / "run")


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B run file (``run-*.wandb``, LevelDB log format: 32 KiB blocks of
    chunks with a 7-byte header each), which wandb itself no longer reads back offline."""
    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:header] == b":W&B\xe1\xbe\x00", f"{path}: not a W&B run file"
    position, chunks = header, []
    while position + header <= len(data):
        if block - position % block < header:  # the block's tail is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        chunks.append(data[position + header : position + header + length])
        position += header + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            yield b"".join(chunks)
            chunks = []


@pytest.mark.slow
def test_aggregates_reach_wandb_offline(
    tiny_model, tokenizer, train_dataset, tmp_path, monkeypatch
):
    """report_to=["wandb"] with WANDB_MODE=offline: the aggregates are read back from the
    offline run's file (history rows) at the profiled step, equal to the run's rows."""
    wandb = pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny(tiny_model("llama")), train_dataset, tokenizer, tmp_path, report_to=["wandb"])
    wandb.teardown()  # finishes the run and waits until wandb-core has written all of it

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows, summary = [], {}
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(dict(map(wandb_item, record.history.item)))
        elif kind == "summary":
            summary.update(map(wandb_item, record.summary.update))
    (row,) = [r for r in rows if any(k.startswith("train/gradspec/") for k in r)]
    assert row["train/global_step"] == PROFILED_STEP and "train/loss" in row
    assert_logged(row, tmp_path / "run", prefix="train/")
    assert_logged(summary, tmp_path / "run", prefix="train/")  # the run's last values


def wandb_item(item) -> tuple[str, object]:
    """(key, value) of a W&B history or summary item (a nested key joined by dots)."""
    return ".".join(item.nested_key) or item.key, json.loads(item.value_json)


def read_parts(folder: Path) -> pd.DataFrame:
    """All Parquet parts of a run directory's folder, read directly."""
    return pd.concat(pd.read_parquet(p) for p in sorted(folder.glob("part-*.parquet")))


@pytest.mark.slow
def test_report_score_and_flag_read_a_training_run(tiny_model, tokenizer, train_dataset, tmp_path):
    """Every step profiled: `gradspec report` draws each layer kind over the steps (mean,
    10th-90th percentile band) and the online flagged fraction, equal to a pandas groupby
    of the run's Parquet rows; `gradspec score` and `flag` keep each row's step."""
    from typer.testing import CliRunner

    from gradspec.cli import app

    train(
        tiny(tiny_model("llama")),
        train_dataset,
        tokenizer,
        tmp_path,
        logging_steps=1,
        watch_options={"min_window": 4, "threshold": 0.0},  # flags about half the scored
    )
    run = tmp_path / "run"
    html = tmp_path / "report.html"
    commands = [
        ["report", str(run), "--out", str(html), "--bootstrap", "50"],
        ["score", str(run)],
        ["flag", str(run)],
    ]
    for command in commands:
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output

    spectra, examples = read_parts(run / "spectra"), read_parts(run / "examples")
    by_step = spectra.groupby(["step", "kind"])["nuclear_norm"]
    expected = pd.DataFrame(
        {
            "mean": by_step.mean(),
            "p10": by_step.agg(lambda v: np.percentile(v, 10)),
            "p90": by_step.agg(lambda v: np.percentile(v, 90)),
        }
    )
    curves = pd.read_csv(tmp_path / "report_tables" / "steps.csv").set_index(["step", "kind"])
    assert list(curves.index) == [(s, k) for s in (1, 2, 3) for k in ("attn", "mlp")]
    np.testing.assert_allclose(curves[expected.columns], expected.loc[curves.index], rtol=1e-12)
    assert (curves["examples"] == 4).all()

    flags = pd.read_csv(tmp_path / "report_tables" / "step_flags.csv").set_index("step")
    flagged_lines = [json.loads(line) for line in (run / "flagged.jsonl").read_text().splitlines()]
    flagged = pd.Series([line["step"] for line in flagged_lines]).value_counts()
    scored = examples.groupby("step")["flag_score"].count()
    assert list(scored) == [0, 4, 4]  # the window holds 4 examples after step 1
    assert list(flags["scored"]) == list(scored)
    assert list(flags["flagged"]) == [flagged.get(step, 0) for step in (1, 2, 3)]
    assert 0 < flags["flagged"].sum() < 8
    assert np.isnan(flags.loc[1, "flagged_frac"])
    np.testing.assert_allclose(
        flags.loc[[2, 3], "flagged_frac"], flagged.reindex([2, 3], fill_value=0) / 4
    )
    page = html.read_text()
    assert "id='steps'" in page and "nuclear norm over training steps" in page

    for table in ("scores", "flags"):
        rows = pd.read_parquet(run / f"{table}.parquet").set_index("example_index")
        assert len(rows) == 12
        steps = examples.set_index("example_index").loc[rows.index, "step"]
        assert (rows["step"] == steps).all()


def test_online_flag_is_the_robust_z_against_the_window():
    rng = np.random.default_rng(0)
    history = rng.normal(size=(20, 3))
    flagger = OnlineFlagger(window=10, min_window=5, threshold=2.0)
    scores = flagger.score(np.vstack([history, history[:1] + 10.0]))
    window = history[10:20]
    median = np.median(window, axis=0)
    mad = 1.4826 * np.median(np.abs(window - median), axis=0)
    expected = np.mean((history[0] + 10.0 - median) / mad)
    assert np.isnan(scores[:5]).all() and np.isfinite(scores[5:]).all()
    assert scores[-1] == pytest.approx(expected)
    assert flagger.flagged(scores)[-1] and not flagger.flagged(scores)[:5].any()


@pytest.mark.slow
def test_skip_flagged_leaves_flagged_rows_out_of_later_epochs(
    tiny_model, tokenizer, train_dataset, tmp_path
):
    """With a threshold every scored example passes, the examples flagged in epoch 1 are
    left out of epoch 2: exactly the others are trained on (and profiled) there."""
    trainer = Trainer(
        tiny(tiny_model("llama")),
        TrainingArguments(
            output_dir=str(tmp_path / "trainer"),
            per_device_train_batch_size=4,
            num_train_epochs=2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        ),
        train_dataset=train_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    callback = watch(
        trainer,
        tmp_path / "run",
        id_column="example_id",
        skip_flagged=True,
        min_window=1,
        threshold=-1e9,
    )
    trainer.train()
    flagged = [json.loads(line) for line in (tmp_path / "run" / "flagged.jsonl").open()]
    first_epoch = {line["row"] for line in flagged if line["epoch"] <= 1}
    assert 0 < len(first_epoch) < N_EXAMPLES
    examples = pd.read_parquet(tmp_path / "run" / "examples")
    later = examples.loc[examples["epoch"] > 1, "source_line"]
    assert sorted(later) == sorted(set(range(N_EXAMPLES)) - first_epoch)
    assert callback.flagged_rows == {line["row"] for line in flagged}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes(tiny_model, train_dataset, data_file, tmp_path):
    """Each rank profiles its own examples; the gathered rows equal the profile of the
    checkpoint, and every rank logs the same aggregates and makes the same flag decisions."""
    train_dataset.save_to_disk(tmp_path / "data")
    worker = Path(__file__).with_name("monitor_ddp_worker.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(worker),
        str(tiny_model("llama")),
        str(tmp_path / "data"),
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0] == ranks[1]
    assert len(ranks[0]["ids"]) == 4 and "gradspec/attn/nuclear_norm_mean" in ranks[0]["logs"]
    reference = reference_spectra(tmp_path / "checkpoint", data_file, tmp_path / "ref")
    monitored = monitored_spectra(tmp_path / "run")
    assert sorted(monitored.index.get_level_values(0).unique()) == sorted(ranks[0]["ids"])
    assert_same_spectra(monitored, reference)


@pytest.mark.slow
def test_moe_spectra_equal_profile_of_checkpoint(
    tiny_model, tokenizer, train_dataset, data_file, tmp_path
):
    """Qwen3-MoE under the Trainer, two examples a micro-batch (padded): every routed
    expert's spectra and token counts equal `gradspec profile` of the step's checkpoint."""
    options = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    train(tiny(tiny_model("qwen3_moe")), train_dataset, tokenizer, tmp_path, **options)
    key = ["example_id", "param", "module", "expert"]
    columns = [*STAT_COLUMNS, "expert_tokens"]
    profiled = gradspec.profile(tmp_path / "checkpoint", data_file, tmp_path / "ref", device="cpu")
    reference = profiled.spectra.fillna({"expert": -1}).set_index(key)[columns]
    monitored = load_run(tmp_path / "run").spectra.fillna({"expert": -1}).set_index(key)[columns]
    assert monitored.index.get_level_values(0).nunique() == 4
    assert (monitored.index.get_level_values("expert") >= 0).sum() == 4 * 2 * 3 * 8
    expected = reference.loc[monitored.index]
    np.testing.assert_array_equal(monitored["expert_tokens"], expected["expert_tokens"])
    np.testing.assert_allclose(
        monitored[list(STAT_COLUMNS)], expected[list(STAT_COLUMNS)], rtol=1e-4, atol=1e-9
    )
