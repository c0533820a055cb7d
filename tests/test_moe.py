"""Mixtures of experts: every routed expert's spectra against autograd's fused gradients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import GSM8K, SHARED_DATA, TINY_MOE_CONFIGS, read_shared
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import gradspec
from gradspec import expert_capture
from gradspec.adapters import find_decoder_layers
from gradspec.analysis import pool_experts
from gradspec.quality import example_scores
from gradspec.report import write_report
from gradspec.runs import load_runs

WIKI = SHARED_DATA / "wiki_knowledge" / "correct" / "popular_wikipedia_100.json"
STATS = ["nuclear_norm", "spectral_norm", "frobenius_norm", "effective_rank", "stable_rank"]
KEY = ["example_index", "param", "module", "expert"]


def split_fused(name: str, grad: torch.Tensor, arch: str) -> dict[tuple[str, int], torch.Tensor]:
    """Each expert's matrices (out x in) in a fused expert gradient, as the families lay
    them out: gate rows then up rows, GPT-OSS transposed with gate/up columns interleaved."""
    transposed = arch == "gpt_oss"
    matrices = {}
    for expert, fused in enumerate(grad):
        matrix = fused.T if transposed else fused
        if name.endswith("down_proj"):
            matrices["down_proj", expert] = matrix
        elif transposed:
            matrices["gate_proj", expert] = matrix[0::2]
            matrices["up_proj", expert] = matrix[1::2]
        else:
            half = matrix.shape[0] // 2
            matrices["gate_proj", expert] = matrix[:half]
            matrices["up_proj", expert] = matrix[half:]
    return matrices


def statistics(grad: np.ndarray) -> dict[str, float]:
    """Every statistic of one matrix from its float64 SVD; zeros for a zero matrix."""
    s = np.linalg.svd(grad, compute_uv=False)
    if s[0] == 0:
        return dict.fromkeys(STATS, 0.0)
    kept = s[s > s[0] * 1e-7]
    p = kept / kept.sum()
    return {
        "nuclear_norm": s.sum(),
        "spectral_norm": s[0],
        "frobenius_norm": np.linalg.norm(grad),
        "effective_rank": np.exp(-(p * np.log(p)).sum()),
        "stable_rank": np.linalg.norm(grad) ** 2 / s[0] ** 2,
    }


def routed_tokens(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Hooks recording each router's chosen experts (tokens x k), by experts parameter
    prefix; the hooks' handles."""
    chosen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or not hasattr(experts, "down_proj"):
            continue
        router = module.router if hasattr(module, "router") else module.gate

        def keep(_module, _inputs, output, prefix=f"{name}.experts."):
            chosen[prefix] = output[2]

        handles.append(router.register_forward_hook(keep))
    return chosen, handles


def explicit_expert_statistics(
    model_dir: Path, arch: str, records: list[dict], max_length: int | None
) -> pd.DataFrame:
    """Per example (a batch of one): autograd's gradient of every decoder-layer weight,
    fused experts split per expert, and a float64 SVD of each matrix; with each expert's
    token count from the router's choices."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, experts_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layers_name, _ = find_decoder_layers(model)
    weights = {
        name: p
        for name, p in model.named_parameters()
        if name.startswith(layers_name + ".") and p.ndim >= 2 and not name.endswith("bias")
    }
    chosen, handles = routed_tokens(model)
    rows = []
    for index, record in enumerate(records):
        ids, labels = gradspec.encode(tokenizer, record, max_length=max_length)
        model.zero_grad()
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
        for name, weight in weights.items():
            base = {"example_index": index, "param": name}
            if weight.ndim == 2:
                rows.append({**base, "expert": None, **statistics(weight.grad.numpy())})
                continue
            prefix = name.rsplit(".", 1)[0] + "."
            counts = torch.bincount(chosen[prefix].reshape(-1), minlength=weight.shape[0])
            for (matrix, expert), grad in split_fused(name, weight.grad, arch).items():
                if counts[expert] == 0:
                    assert not grad.any(), "an expert without tokens has a zero gradient"
                rows.append(
                    {
                        **base,
                        "module": matrix,
                        "expert": expert,
                        "tokens": int(counts[expert]),
                        **statistics(grad.numpy()),
                    }
                )
    for handle in handles:
        handle.remove()
    return pd.DataFrame(rows)


def assert_experts_match(ours: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Every matrix of every expert is present once and equals its explicit statistics."""
    ours = ours.assign(expert=ours["expert"].astype("Int64"))
    expected = expected.assign(expert=expected["expert"].astype("Int64"))
    dense = expected[expected["expert"].isna()].drop(columns=["module", "tokens"])
    routed = expected[expected["expert"].notna()]
    merged_dense = dense.merge(ours, on=["example_index", "param"], suffixes=("_x", ""))
    merged_routed = routed.merge(ours, on=KEY, suffixes=("_x", ""))
    assert len(merged_dense) + len(merged_routed) == len(ours) == len(expected)
    np.testing.assert_array_equal(merged_routed["expert_tokens"], merged_routed["tokens"])
    assert merged_dense["expert_tokens"].isna().all()
    merged = pd.concat([merged_dense, merged_routed])
    for stat in STATS:
        tolerance = 1e-3 if stat.endswith("_rank") else 1e-4
        np.testing.assert_allclose(
            merged[stat], merged[stat + "_x"], rtol=tolerance, atol=1e-12, err_msg=stat
        )


@pytest.mark.parametrize("arch", sorted(TINY_MOE_CONFIGS))
@pytest.mark.parametrize(
    ("data", "max_length", "batch_size"),
    [(WIKI, 24, 1), (GSM8K, None, 3)],
    ids=["one-short", "padded-batch"],
)
def test_every_expert_equals_explicit_float64_svd(
    arch, data, max_length, batch_size, tiny_model, tmp_path
):
    records = read_shared(data, 3)
    tables = gradspec.profile(
        tiny_model(arch),
        data,
        tmp_path / "run",
        device="cpu",
        limit=3,
        batch_size=batch_size,
        dtype="float64",
        max_length=max_length,
    )
    expected = explicit_expert_statistics(tiny_model(arch), arch, records, max_length)
    assert_experts_match(tables.spectra, expected)
    assert not tables.manifest["coverage"]["left_out"]


def test_experts_without_tokens_are_recorded_unsolved(tokenizer, tmp_path, monkeypatch):
    """32 experts, 2 per token, 24 tokens: some expert gets no token of an example; its
    row holds a token count of 0 and zero statistics, and nothing is solved for it."""
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TINY_MOE_CONFIGS["qwen3_moe"], "num_experts": 32},
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    solved: list[int] = []
    prepare = expert_capture.prepare_spectra

    def counting(g: torch.Tensor, *args: object) -> Callable[[], torch.Tensor]:
        solved.append(g.shape[0] if g.ndim == 3 else 1)
        return prepare(g, *args)

    monkeypatch.setattr(expert_capture, "prepare_spectra", counting)
    options = dict(device="cpu", limit=2, batch_size=2, dtype="float64", max_length=24)
    tables = gradspec.profile(tmp_path / "model", WIKI, tmp_path / "run", **options)
    routed = tables.spectra[tables.spectra["expert"].notna()]
    idle = routed[routed["expert_tokens"] == 0]
    assert len(idle) and (idle[STATS] == 0).all().all()
    assert sum(solved) == (routed["expert_tokens"] > 0).sum(), "one solve per pair with tokens"
    expected = explicit_expert_statistics(tmp_path / "model", "qwen3_moe", read_shared(WIKI, 2), 24)
    assert_experts_match(tables.spectra, expected)


def pooled_by_hand(spectra: pd.DataFrame) -> pd.DataFrame:
    """Each (example, param, module) of the experts: the mean of each statistic over the
    experts with tokens, computed row by row."""
    rows = []
    experts = spectra[spectra["expert"].notna()]
    for (example, param, module), group in experts.groupby(["example_index", "param", "module"]):
        active = [row for _, row in group.iterrows() if row["expert_tokens"] > 0]
        values = {s: sum(r[s] for r in active) / len(active) if active else 0.0 for s in STATS}
        tokens = int(group["expert_tokens"].sum())
        rows.append(
            {"example_index": example, "param": param, "module": module, "tokens": tokens} | values
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def moe_run(tiny_model, tmp_path_factory) -> Path:
    """A float32 run of the tiny Qwen3-MoE on four GSM8K examples, batches of two, with
    the IFD forward passes (which go through the captured experts without a batch)."""
    out = tmp_path_factory.mktemp("moe") / "run"
    options = dict(device="cpu", limit=4, batch_size=2, ifd=True)
    gradspec.profile(tiny_model("qwen3_moe"), GSM8K, out, **options)
    return out


def test_pooled_values_feed_analyses_and_scores(moe_run):
    tables = gradspec.load_run(moe_run)
    expected = pooled_by_hand(tables.spectra)
    pooled = pool_experts(tables.spectra)
    routed_modules = pooled[pooled["module"].isin(["gate_proj", "up_proj", "down_proj"])]
    merged = expected.merge(
        routed_modules, on=["example_index", "param", "module"], suffixes=("_x", "")
    )
    assert len(merged) == len(expected) == len(routed_modules)
    np.testing.assert_array_equal(merged["expert_tokens"], merged["tokens"])
    for stat in STATS:
        np.testing.assert_allclose(merged[stat + "_x"], merged[stat], rtol=1e-12)
    # The layer curves and the quality scores read the pooled values.
    run = load_runs([moe_run])[0]
    gate = run.values("gate_proj", "nuclear_norm")
    by_hand = expected[expected["module"] == "gate_proj"].pivot(
        index="example_index", columns="param", values="nuclear_norm"
    )
    np.testing.assert_allclose(gate.values, by_hand.to_numpy(), rtol=1e-12)
    scores = example_scores(tables)
    sums = pooled.groupby("example_index")["nuclear_norm"].sum()
    np.testing.assert_allclose(scores["nuclear_norm"], sums.to_numpy(), rtol=1e-12)


def test_report_shows_each_expert(moe_run, tmp_path):
    path = write_report([moe_run], tmp_path / "report.html", n_boot=20)
    experts = pd.read_csv(tmp_path / "report_tables" / "experts.csv")
    spectra = gradspec.load_run(moe_run).spectra
    for (layer, module, expert), row in experts.set_index(["layer", "module", "expert"]).iterrows():
        rows = spectra[
            (spectra["layer"] == layer)
            & (spectra["module"] == module)
            & (spectra["expert"] == expert)
        ]
        routed = rows[rows["expert_tokens"] > 0]
        assert row["tokens"] == pytest.approx(rows["expert_tokens"].mean())
        assert row["share"] == pytest.approx(len(routed) / len(rows))
        if len(routed):
            assert row["mean"] == pytest.approx(routed["nuclear_norm"].mean())
    assert len(experts) == 2 * 3 * 8  # layers x matrices x experts
    page = path.read_text()
    assert "id='experts'" in page and page.count('"layer %{y}, expert %{x}') == 3
