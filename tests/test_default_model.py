"""The embedded default model: training, held-out split, saving, caching, determinism."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, read_shared
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradspec import default_model
from gradspec.data import encode
from gradspec.default_model import (
    DEFAULT_RECIPE,
    Recipe,
    TrainedModel,
    encode_all,
    ensure_default_model,
    save_trained,
    split_records,
    train_model,
    training_batches,
)
from gradspec.errors import GradspecError
from gradspec.paths import default_model_dir, shared_data_dir

TINY_FILES = (
    "reasoning_cot/correct/gsm8k_with_cot.json",
    "wiki_knowledge/correct/long_tail_wikipedia.json",
)
RECORDS_PER_FILE = 140  # 100 held out, 40 trained on
TINY = Recipe(
    files=TINY_FILES,
    eval_per_file=4,
    vocab_size=400,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    max_positions=256,
    max_length=256,
    steps=40,
    token_budget=1024,
    length_group=32,
    learning_rate=1e-2,
    warmup_steps=4,
    threads=1,
)


@pytest.fixture(scope="module")
def tiny_data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared-data folder holding the first records of two real files."""
    root = tmp_path_factory.mktemp("shared-data")
    for name in TINY_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(read_shared(SHARED_DATA / name, RECORDS_PER_FILE)))
    return root


@pytest.fixture(scope="module")
def trained(tiny_data: Path) -> TrainedModel:
    return train_model(TINY, tiny_data)


def keeps_a_response(tokenizer, record: dict) -> bool:
    """Whether some response token survives truncation (else the example is not used)."""
    _, labels = encode(tokenizer, record, "plain", TINY.max_length)
    return any(label != -100 for label in labels[1:])


def eval_records(tokenizer) -> list[dict]:
    """The held-out records that measure the held-out loss, read directly from the files."""
    return [
        r
        for name in TINY_FILES
        for r in read_shared(SHARED_DATA / name, TINY.eval_per_file)
        if keeps_a_response(tokenizer, r)
    ]


def unbatched_losses(model: torch.nn.Module, tokenizer, records: list[dict]) -> tuple[float, float]:
    """(per-token loss over all tokens, mean per-example response loss), one example at a
    time through the model's own loss, without padding."""
    total = count = 0.0
    response_losses = []
    with torch.no_grad():
        for record in records:
            ids, labels = encode(tokenizer, record, "plain", TINY.max_length)
            ids_t = torch.tensor([ids])
            total += float(model(input_ids=ids_t, labels=ids_t).loss) * (len(ids) - 1)
            count += len(ids) - 1
            response_losses.append(
                float(model(input_ids=ids_t, labels=torch.tensor([labels])).loss)
            )
    return total / count, sum(response_losses) / len(response_losses)


def test_training_lowers_the_held_out_loss(trained: TrainedModel) -> None:
    torch.manual_seed(1234)
    fresh = AutoModelForCausalLM.from_config(trained.model.config).eval()
    records = eval_records(trained.tokenizer)
    initial, _ = unbatched_losses(fresh, trained.tokenizer, records)
    final, final_response = unbatched_losses(trained.model, trained.tokenizer, records)
    report = trained.report
    # A fresh model predicts nearly uniformly: its loss is ln(vocabulary size).
    assert initial == pytest.approx(math.log(len(trained.tokenizer)), abs=0.05)
    assert report["initial_heldout_loss"] == pytest.approx(initial, abs=0.05)
    assert final < initial - 1.0
    assert report["final_train_loss"] < initial - 1.0
    # The reported held-out losses (batched, padded) are the unbatched ones.
    assert report["heldout_loss"] == pytest.approx(final, rel=1e-4)
    assert report["heldout_response_loss"] == pytest.approx(final_response, rel=1e-4)
    assert report["n_eval_examples"] == len(records) > len(TINY_FILES) * TINY.eval_per_file / 2


def test_saved_model_loads_with_auto_classes_and_matches(
    trained: TrainedModel, tmp_path: Path
) -> None:
    save_trained(trained, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = read_shared(SHARED_DATA / TINY_FILES[0], 1)[0]["output"]
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == trained.tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert ids[0, 0] == tokenizer.bos_token_id and len(tokenizer) == len(trained.tokenizer)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained.model(ids).logits)
    assert json.loads((tmp_path / "training.json").read_text()) == trained.report
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        "llama",
        4,
        2,
    )
    assert (
        config["gradspec_recipe_sha256"]
        == hashlib.sha256(json.dumps(TINY.as_json(), sort_keys=True).encode()).hexdigest()
    )
    assert config["gradspec_recipe_sha256"] != replace(TINY, steps=41).sha256()


@pytest.mark.slow
@pytest.mark.usefixtures("shared_data")
def test_held_out_records_are_never_trained_on() -> None:
    train, held_out = split_records(DEFAULT_RECIPE, SHARED_DATA)
    key = lambda record: json.dumps(record, sort_keys=True)  # noqa: E731
    expected_train, expected_held = set(), set()
    for name in DEFAULT_RECIPE.files:
        records = json.loads((SHARED_DATA / name).read_text())
        expected_held |= {key(r) for r in records[:100]}
        expected_train |= {key(r) for r in records[100:]}
    trained_on = {key(ex.record) for ex in train}
    assert trained_on == expected_train
    assert {key(ex.record) for ex in held_out} == expected_held
    assert not trained_on & expected_held
    assert len(DEFAULT_RECIPE.files) == 16


def test_one_epoch_feeds_each_training_example_once(trained: TrainedModel, tiny_data: Path) -> None:
    tokenizer = trained.tokenizer
    expected = sorted(
        encode(tokenizer, r, "plain", TINY.max_length)[0]
        for name in TINY_FILES
        for r in read_shared(tiny_data / name)[100:]
        if keeps_a_response(tokenizer, r)
    )
    assert len(expected) == trained.report["n_train_examples"] > 60
    fed: list[list[int]] = []
    for batch in training_batches(
        encode_all(tokenizer, split_records(TINY, tiny_data)[0], TINY.max_length),
        TINY,
        tokenizer.pad_token_id,
    ):
        fed += [
            row[mask.bool()].tolist()
            for row, mask in zip(batch.input_ids, batch.token_mask, strict=True)
        ]
        if len(fed) >= len(expected):
            break
    assert sorted(fed) == expected


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights(
    trained: TrainedModel, tiny_data: Path, tmp_path: Path
) -> None:
    again = train_model(TINY, tiny_data)
    save_trained(trained, tmp_path / "a")
    save_trained(again, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    other = train_model(replace(TINY, seed=1, steps=2), tiny_data).model.state_dict()
    first = load_file(tmp_path / "a" / "model.safetensors")
    assert not torch.equal(
        first["model.layers.0.self_attn.q_proj.weight"],
        other["model.layers.0.self_attn.q_proj.weight"],
    )


def fake_training(trained: TrainedModel, calls: list[Recipe]):
    """A stand-in for train_model that returns ``trained`` as if trained from the recipe."""

    def train(recipe: Recipe, data_dir: Path, progress=None) -> TrainedModel:
        calls.append(recipe)
        return TrainedModel(
            trained.model, trained.tokenizer, {**trained.report, "recipe": recipe.as_json()}
        )

    return train


def test_ensure_trains_once_and_retrains_for_another_recipe(
    trained: TrainedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Recipe] = []
    monkeypatch.setattr(default_model, "train_model", fake_training(trained, calls))
    path = ensure_default_model(TINY, cache_dir=tmp_path, data_dir=tmp_path)
    weights = (path / "model.safetensors").stat()
    assert path == tmp_path / "default-model" and calls == [TINY]
    assert ensure_default_model(TINY, cache_dir=tmp_path, data_dir=tmp_path) == path
    again = (path / "model.safetensors").stat()
    assert calls == [TINY]
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    longer = replace(TINY, steps=TINY.steps + 1)
    ensure_default_model(longer, cache_dir=tmp_path, data_dir=tmp_path)
    assert calls == [TINY, longer]
    assert json.loads((path / "training.json").read_text())["recipe"]["steps"] == longer.steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default-model", "default-model.lock"]


def test_interrupted_save_leaves_no_model(
    trained: TrainedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(default_model, "train_model", fake_training(trained, []))

    def killed(trained: TrainedModel, directory: Path) -> None:
        trained.model.save_pretrained(directory)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(default_model, "save_trained", killed)
        with pytest.raises(KeyboardInterrupt):
            ensure_default_model(TINY, cache_dir=tmp_path, data_dir=tmp_path)
    assert not (tmp_path / "default-model").exists()
    path = ensure_default_model(TINY, cache_dir=tmp_path, data_dir=tmp_path)
    assert (path / "training.json").is_file() and (path / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default-model", "default-model.lock"]


@pytest.mark.usefixtures("shared_data")
def test_locations_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GRADSPEC_SHARED_DATA", str(tmp_path / "missing"))
    assert default_model_dir() == tmp_path / "cache" / "default-model"
    with pytest.raises(GradspecError, match="GRADSPEC_SHARED_DATA"):
        shared_data_dir()
    with pytest.raises(GradspecError, match="shared data not found"):
        ensure_default_model(TINY)
    monkeypatch.setenv("GRADSPEC_SHARED_DATA", str(SHARED_DATA))
    assert shared_data_dir() == SHARED_DATA
