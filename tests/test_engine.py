"""The engine against explicitly built per-example weight gradients, across architectures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import GSM8K, SHARED_DATA, read_shared
from transformers import AutoModelForCausalLM, AutoTokenizer

import gradspec
from gradspec.adapters import find_decoder_layers
from gradspec.batching import collate, per_example_losses, plan_batches, response_logits
from gradspec.capture import SpectraCapture
from gradspec.data import encode_example, load_examples
from gradspec.shared_data import reasoning_file, wiki_file
from gradspec.tuning import RouteChooser

WIKI = SHARED_DATA / wiki_file("popular_wikipedia_100")
STATS = ["nuclear_norm", "spectral_norm", "frobenius_norm", "effective_rank", "stable_rank"]


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The routes the spectra of the test actually took."""
    taken: set[str] = set()
    prepare = RouteChooser.prepare

    def recording(self: RouteChooser, *args: Any) -> tuple[str, Any]:
        route, solve = prepare(self, *args)
        taken.add(route)
        return route, solve

    monkeypatch.setattr(RouteChooser, "prepare", recording)
    return taken


def explicit_gradient_statistics(
    model_dir: Path, records: list[dict], max_length: int | None
) -> pd.DataFrame:
    """Per example: HF loss with labels, autograd weight gradients, float64 SVD of each."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layers_name, _ = find_decoder_layers(model)
    matrices = {
        name: p
        for name, p in model.named_parameters()
        if name.startswith(layers_name + ".") and p.ndim == 2
    }
    return explicit_statistics(model, tokenizer, matrices, records, max_length)


def explicit_statistics(
    model: torch.nn.Module,
    tokenizer: Any,
    matrices: dict[str, torch.nn.Parameter],
    records: list[dict],
    max_length: int | None,
) -> pd.DataFrame:
    """Per example and matrix of ``matrices``: the statistics of the float64 SVD of the
    autograd gradient of the example's loss."""
    rows = []
    for index, record in enumerate(records):
        ids, labels = gradspec.encode(tokenizer, record, max_length=max_length)
        model.zero_grad()
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        loss.backward()
        for name, weight in matrices.items():
            grad = weight.grad.numpy()
            s = np.linalg.svd(grad, compute_uv=False)
            kept = s[s > s[0] * 1e-7]
            p = kept / kept.sum()
            rows.append(
                {
                    "example_index": index,
                    "param": name,
                    "loss": loss.item(),
                    "nuclear_norm": s.sum(),
                    "spectral_norm": s[0],
                    "frobenius_norm": np.linalg.norm(grad),
                    "effective_rank": np.exp(-(p * np.log(p)).sum()),
                    "stable_rank": np.linalg.norm(grad) ** 2 / s[0] ** 2,
                }
            )
    return pd.DataFrame(rows)


def assert_statistics_close(
    ours: pd.DataFrame, expected: pd.DataFrame, rtol: float, rank_rtol: float
) -> None:
    merged = expected.merge(
        ours, on=["example_index", "param"], suffixes=("_x", ""), how="outer", indicator=True
    )
    assert (merged["_merge"] == "both").all(), "the engine must cover exactly the 2-D matrices"
    for stat in STATS:
        tolerance = rank_rtol if stat.endswith("_rank") else rtol
        np.testing.assert_allclose(merged[stat], merged[stat + "_x"], rtol=tolerance, err_msg=stat)


@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma2", "mistral", "phi", "gemma", "phi3"]
)
@pytest.mark.parametrize(
    ("data", "max_length", "route"),
    [(WIKI, 40, "factor"), (GSM8K, None, "full")],
    ids=["factor-route", "full-route"],
)
def test_fast_method_equals_explicit_float64_svd(
    arch, data, max_length, route, tiny_model, tmp_path, routes
):
    # Short "Tell me about X." prompts cut at 40 tokens keep T below the 48-wide matrices,
    # where the factor route shrinks them; long GSM8K answers are where the full gradient
    # is cheapest (the cost model's choices). Each route is forced.
    records = read_shared(data, 4)
    tables = gradspec.profile(
        tiny_model(arch),
        data,
        tmp_path / "run",
        device="cpu",
        limit=4,
        batch_size=4,
        dtype="float64",
        max_length=max_length,
        route=route,
    )
    expected = explicit_gradient_statistics(tiny_model(arch), records, max_length)
    assert_statistics_close(tables.spectra, expected, rtol=1e-4, rank_rtol=1e-3)
    assert routes == {route}
    assert tables.manifest["sessions"][-1]["routes"] == {"route": route, "measured": []}
    losses = expected.groupby("example_index")["loss"].first()
    # Both take the cross-entropy in float32 (as HF does, float64 models too), of logits
    # computed at different sets of positions: equal up to float32 rounding.
    np.testing.assert_allclose(tables.examples["loss"], losses, rtol=1e-6)
    assert (tables.examples["status"] == "ok").all()


@pytest.mark.parametrize(
    ("data", "max_length", "route"),
    [(WIKI, 40, "factor"), (GSM8K, None, "full")],
    ids=["factor-route", "full-route"],
)
@pytest.mark.parametrize("spectra_dtype", ["float32", "float64"])
def test_float32_model_matches_float64_explicit_gradients(
    data, max_length, route, spectra_dtype, tiny_model, tmp_path, routes
):
    tables = gradspec.profile(
        tiny_model("llama"),
        data,
        tmp_path / "run",
        device="cpu",
        limit=3,
        dtype="float32",
        spectra_dtype=spectra_dtype,
        max_length=max_length,
        route=route,
    )
    assert tables.manifest["options"]["spectra_dtype"] == spectra_dtype
    expected = explicit_gradient_statistics(tiny_model("llama"), read_shared(data, 3), max_length)
    assert_statistics_close(tables.spectra, expected, rtol=1e-4, rank_rtol=1e-3)
    assert routes == {route}


def _profile_variant(model_dir: Path, out: Path, **options) -> pd.DataFrame:
    data = SHARED_DATA / reasoning_file("gsm8k", "no_cot")
    tables = gradspec.profile(model_dir, data, out, device="cpu", limit=8, **options)
    return tables.spectra.set_index(["example_index", "param"])[STATS].sort_index()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_batch_size_and_padding_side_do_not_change_results(arch, tiny_model, tmp_path):
    model_dir = tiny_model(arch)
    single = _profile_variant(model_dir, tmp_path / "b1", batch_size=1)
    right = _profile_variant(model_dir, tmp_path / "b8r", batch_size=8, padding_side="right")
    left = _profile_variant(model_dir, tmp_path / "b8l", batch_size=8, padding_side="left")
    assert len(single) == 8 * 2 * (4 if arch == "gpt2" else 7)
    for other in (right, left):
        np.testing.assert_allclose(other[STATS[:3]], single[STATS[:3]], rtol=1e-4)
        np.testing.assert_allclose(other["effective_rank"], single["effective_rank"], rtol=1e-3)


def test_reference_method_agrees_with_fast_method(tiny_model, tmp_path):
    model_dir = tiny_model("qwen2")
    fast = _profile_variant(model_dir, tmp_path / "fast", dtype="float64")
    reference = _profile_variant(model_dir, tmp_path / "ref", dtype="float64", method="reference")
    np.testing.assert_allclose(reference.to_numpy(), fast.to_numpy(), rtol=1e-8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_module_subsets_equal_the_full_run(arch, tiny_model, tmp_path):
    # The backward starts at the first selected matrices' outputs: layer 0's attention is
    # not differentiated for "mlp", nor layer 0 at all for the last-layer regex.
    model_dir = tiny_model(arch)
    full = _profile_variant(model_dir, tmp_path / "all", dtype="float64")
    for modules in ("mlp", r"layers\.1\.|h\.1\."):
        subset = _profile_variant(
            model_dir, tmp_path / modules.replace("\\", ""), dtype="float64", modules=modules
        )
        assert 0 < len(subset) < len(full)
        np.testing.assert_allclose(subset.to_numpy(), full.loc[subset.index].to_numpy(), rtol=1e-10)


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (as older or remote-code ones)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
        )


def test_response_logits_without_logits_to_keep(tiny_model):
    model_dir = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = [encode_example(tokenizer, ex) for ex in load_examples(GSM8K)[:3]]
    batch = collate([0, 1, 2], encoded, tokenizer.pad_token_id, "right", torch.device("cpu"))
    with torch.no_grad():
        kept, kept_targets = response_logits(model, batch)
        every, every_targets = response_logits(WithoutLogitsToKeep(model), batch)
        full = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    shortest_prompt = min(enc.n_prompt_tokens for enc in encoded)
    assert kept.shape[1] == batch.input_ids.shape[1] - shortest_prompt
    torch.testing.assert_close(kept, every, rtol=1e-12, atol=1e-12)
    assert torch.equal(kept_targets, every_targets)
    np.testing.assert_allclose(
        per_example_losses(kept, kept_targets),  # float32 losses
        per_example_losses(full[:, :-1], batch.labels[:, 1:]),
        rtol=1e-6,
    )


def test_top_k_and_module_selection(tiny_model, tmp_path):
    tables = gradspec.profile(
        tiny_model("llama"),
        GSM8K,
        tmp_path / "run",
        device="cpu",
        limit=2,
        modules="mlp",
        top_k=3,
        dtype="float64",
    )
    assert set(tables.spectra["module"]) == {"gate_proj", "up_proj", "down_proj"}
    assert set(tables.spectra["kind"]) == {"mlp"}
    for row in tables.spectra.itertuples():
        top = list(row.top_singular_values)
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert top[0] == pytest.approx(row.spectral_norm)
        assert sum(top) <= row.nuclear_norm * (1 + 1e-12)
    regex = gradspec.profile(
        tiny_model("llama"),
        GSM8K,
        tmp_path / "regex",
        device="cpu",
        limit=1,
        modules=r"layers\.1\.self_attn\.(q|v)_proj",
    )
    assert sorted(regex.spectra["param"]) == [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]


def test_ifd_is_conditioned_over_response_only_loss(tiny_model, tmp_path):
    model_dir = tiny_model("llama")
    tables = gradspec.profile(
        model_dir,
        GSM8K,
        tmp_path / "run",
        device="cpu",
        limit=3,
        ifd=True,
        dtype="float64",
        batch_size=2,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for record, row in zip(read_shared(GSM8K, 3), tables.examples.itertuples(), strict=True):
        ids = tokenizer(record["output"])["input_ids"] + [tokenizer.eos_token_id]
        labels = [-100, *ids[1:]]
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        assert row.response_only_loss == pytest.approx(alone.item(), rel=1e-8)
        assert row.ifd == pytest.approx(row.loss / alone.item(), rel=1e-8)


def test_automatic_batches_respect_budget_and_padding():
    lengths = [600, 528, 461, 441, 407, 388, 385, 370, 100, 95, 94, 93, 92]
    batches = plan_batches(lengths, None, token_budget=400)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest
        assert len(batch) == 1 or len(batch) * longest <= 400
        assert all(lengths[i] >= 0.9 * longest for i in batch)
    assert plan_batches(lengths, None, token_budget=4096) == [
        [0],
        [1],
        [2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11, 12],
    ]
    assert plan_batches(lengths, 4, token_budget=1) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12],
    ]


def test_capture_zeroes_padding_and_flags_only_nonfinite_examples():
    capture = SpectraCapture([], torch.float64)
    capture.start_batch(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]))
    tensor = torch.randn(9, 4)
    tensor[2] = torch.nan  # padding of example 0: ignored
    tensor[4, 1] = torch.inf  # a real token of example 1
    rows, finite = capture._real_rows(tensor)
    assert finite.tolist() == [True, False, True]
    expected = tensor.double().reshape(3, 3, 4).clone()
    expected[0, 2] = expected[1] = expected[2, 1:] = 0.0
    assert rows.dtype == torch.float64 and torch.equal(rows, expected)
