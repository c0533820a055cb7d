"""Hub model ids resolved offline from a Hugging Face cache built here (tests/hub_cache.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import GSM8K, build_tiny_model
from hub_cache import cache_repo, gradspec_cli, offline_env

import gradspec
from gradspec.errors import GradspecError
from gradspec.modeling import resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
STATS = ["nuclear_norm", "spectral_norm", "frobenius_norm", "effective_rank"]


@pytest.fixture
def hub_model(tiny_model, tmp_path) -> tuple[Path, Path]:
    """(HF_HOME holding model acme/tiny-llama at COMMIT as refs/main, the model's folder)."""
    hf_home = tmp_path / "hf"
    cache_repo(tiny_model("llama"), hf_home, "acme/tiny-llama", COMMIT)
    return hf_home, tiny_model("llama")


def profile_args(model: str, out: Path, *extra: str) -> list[str]:
    data = str(GSM8K)
    common = ["--limit", "3", "--device", "cpu", "--dtype", "float64"]
    return ["profile", "--model", model, "--data", data, "--out", str(out), *common, *extra]


def spectra(run: Path) -> pd.DataFrame:
    tables = gradspec.load_run(run)
    return tables.spectra.set_index(["example_index", "param"])[STATS].sort_index()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("acme/tiny-llama", ()),
        (f"acme/tiny-llama@{COMMIT}", ()),
        ("acme/tiny-llama", ("--revision", "main")),
    ],
    ids=["id", "id@commit", "id --revision main"],
)
def test_a_hub_id_profiles_offline_as_its_folder_does(hub_model, model, extra, tmp_path):
    hf_home, folder = hub_model
    result = gradspec_cli(*profile_args(model, tmp_path / "hub", *extra), env=offline_env(hf_home))
    assert result.returncode == 0, result.stderr
    gradspec.profile(folder, GSM8K, tmp_path / "local", device="cpu", limit=3, dtype="float64")
    pd.testing.assert_frame_equal(spectra(tmp_path / "hub"), spectra(tmp_path / "local"))
    manifest = json.loads((tmp_path / "hub" / "manifest.json").read_text())
    revision = dict(zip(extra[::2], extra[1::2], strict=True)).get("--revision")
    revision = revision or (COMMIT if "@" in model else None)
    expected = {"repo_id": "acme/tiny-llama", "revision": revision, "commit": COMMIT}
    assert manifest["model"]["hub"] == expected
    assert manifest["fingerprint"]["model"]["hub"] == {
        "repo_id": "acme/tiny-llama",
        "commit": COMMIT,
    }
    assert Path(manifest["model"]["path"]).name == COMMIT


@pytest.mark.slow
def test_offline_and_not_cached_is_one_line_exit_2_and_nothing_written(hub_model, tmp_path):
    hf_home, _ = hub_model
    out = tmp_path / "run"
    result = gradspec_cli(*profile_args("acme/missing", out), env=offline_env(hf_home))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "acme/missing" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "download it with `hf download acme/missing` once online" in lines[0]
    assert not out.exists()
    unknown = gradspec_cli(*profile_args("acme/tiny-llama@v9", out), env=offline_env(hf_home))
    assert unknown.returncode == 2 and "acme/tiny-llama@v9" in unknown.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(hub_model, tokenizer, tmp_path):
    hf_home, _ = hub_model
    local = build_tiny_model("llama", tokenizer, tmp_path / "acme" / "tiny-llama", seed=1)
    result = gradspec_cli(
        *profile_args("acme/tiny-llama", tmp_path / "run"), env=offline_env(hf_home), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "hub" not in manifest["model"]
    assert Path(manifest["model"]["path"]) == local.resolve()


def test_revision_is_refused_for_a_local_path(tiny_model):
    with pytest.raises(GradspecError, match="--revision v1: only for a Hub model id"):
        resolve_checkpoint(tiny_model("llama"), revision="v1")


def test_conflicting_revisions_are_refused(tmp_path):
    with pytest.raises(GradspecError, match="names revision a, but --revision b"):
        resolve_checkpoint("acme/none@a", revision="b")


REMOTE_CONFIG = """from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


@pytest.mark.slow
def test_code_in_the_repository_runs_only_with_trust_remote_code(tiny_model, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tiny_remote",
        architectures=["TinyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny.py").write_text(REMOTE_MODEL)
    hf_home = tmp_path / "hf"
    cache_repo(folder, hf_home, "acme/remote", COMMIT)
    refused = gradspec_cli(*profile_args("acme/remote", tmp_path / "no"), env=offline_env(hf_home))
    assert refused.returncode == 2, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("with --trust-remote-code")
    assert not (tmp_path / "no").exists()
    trusted = gradspec_cli(
        *profile_args("acme/remote", tmp_path / "yes", "--trust-remote-code"),
        env=offline_env(hf_home),
    )
    assert trusted.returncode == 0, trusted.stderr
    gradspec.profile(
        tiny_model("llama"), GSM8K, tmp_path / "local", device="cpu", limit=3, dtype="float64"
    )
    pd.testing.assert_frame_equal(spectra(tmp_path / "yes"), spectra(tmp_path / "local"))
