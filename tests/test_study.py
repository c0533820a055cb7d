"""Study files and the study runner: resume without recomputing, and clear errors."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import REPO, SHARED_DATA
from typer.testing import CliRunner

from gradspec import data, modeling
from gradspec import study as study_module
from gradspec.cli import app
from gradspec.errors import GradspecError
from gradspec.shared_data import reasoning_file
from gradspec.store import load_run
from gradspec.study import load_study, run_study


def write_study(path: Path, model: Path, extra: str = "", limit: int = 3) -> Path:
    """A two-cell study: no and detailed CoT on GSM8K, correct responses."""
    path.write_text(f"""
title = "tiny"
[profile]
limit = {limit}
device = "cpu"
max_length = 160

[[models]]
label = "tiny"
path = "{model}"

[[datasets]]
path = "{SHARED_DATA / reasoning_file("gsm8k", "no_cot")}"
task = "gsm8k"
style = "none"
correctness = "correct"

[[datasets]]
path = "{SHARED_DATA / reasoning_file("gsm8k", "with_cot_gpt4o")}"
task = "gsm8k"
style = "detailed"
correctness = "correct"
{extra}""")
    return path


def part_times(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(run.rglob("*.parquet"))}


@pytest.mark.slow
def test_interrupted_study_resumes_without_recomputing(
    tiny_model: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    spec = load_study(write_study(tmp_path / "study.toml", tiny_model("llama")))
    real_profile = study_module.profile_on
    calls: list[Path] = []

    def interrupted_profile(ranks, model, data, out, **kwargs):
        calls.append(Path(out))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_profile(ranks, model, data, out, **kwargs)

    monkeypatch.setattr(study_module, "profile_on", interrupted_profile)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, out)
    record = json.loads((out / "study.json").read_text())["cells"]
    assert [cell["name"] for cell in record] == [
        "tiny/gsm8k-none-correct",
        "tiny/gsm8k-detailed-correct",
    ]
    assert record[0]["inputs"] is not None and record[1]["inputs"] is None
    assert record[1]["labels"] == {
        "name": "tiny/gsm8k-detailed-correct",
        "model": "tiny",
        "task": "gsm8k",
        "style": "detailed",
        "correctness": "correct",
        "domain": "reasoning",
    }
    first = out / "runs" / "tiny" / "gsm8k-none-correct"
    before = part_times(first)

    calls.clear()
    result = CliRunner().invoke(
        app, ["study", str(tmp_path / "study.toml"), "--out", str(out), "--bootstrap", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "1 cells; 1 already done" in result.output
    assert calls == [out / "runs" / "tiny" / "gsm8k-detailed-correct"]
    assert part_times(first) == before
    assert len(load_run(first).manifest["sessions"]) == 1
    assert (out / "report.html").stat().st_size > 1_000_000  # plotly.js inlined

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(study_module, "profile_on", real_profile)
    run_study(spec, fresh)
    for cell in spec.cells():
        resumed, uninterrupted = load_run(out / cell.run), load_run(fresh / cell.run)
        pd.testing.assert_frame_equal(resumed.spectra, uninterrupted.spectra)
        pd.testing.assert_frame_equal(resumed.examples, uninterrupted.examples)
        assert len(resumed.examples) == 3

    ran = run_study(spec, out, limit=4)  # a larger limit extends every cell
    assert [was_run for _, was_run in ran] == [True, True]
    assert len(load_run(first).examples) == 4


BAD_STUDIES = [
    (
        "[modles]",
        "unknown key modles (allowed: title, data_dir, profile, models, datasets, findings)",
    ),
    ("[[datasets]]\npath = '{data}'\ntask = 'x'\nstyel = 'none'", "datasets[2]: unknown key styel"),
    (
        "[[datasets]]\npath = '{data}'\ntask = 'x'\nstyle = 'slow'",
        "datasets[2]: style 'slow' is not one of none, simplified, detailed",
    ),
    (
        "[[datasets]]\npath = '/no/such/file.json'\ntask = 'x'",
        "datasets[2]: data path /no/such/file.json does not exist",
    ),
    (
        "[[datasets]]\npath = '{data}'\nstyle = 'none'",
        "datasets[2]: 'task' must be a non-empty string",
    ),
    (
        "[[datasets]]\npath = '{data}'\ntask = 'gsm8k'\nstyle = 'none'\ncorrectness = 'correct'",
        "dataset label gsm8k-none-correct is used twice",
    ),
    (
        "[[models]]\nlabel = 'other'\npath = '/no/model'",
        "models[1]: model 'other': /no/model is not a local checkpoint directory",
    ),
    ("[[models]]\nlabel = 'a b'\npath = '{model}'", "label 'a b' may hold only letters"),
    (
        "[[models]]\nlabel = 'c'\npath = '{model}'\ntemplate = 'alpaca'",
        "template 'alpaca' is not plain or chat",
    ),
]


@pytest.mark.parametrize("extra,message", BAD_STUDIES)
def test_bad_study_files_give_clear_errors(tiny_model, tmp_path: Path, extra: str, message: str):
    model = tiny_model("llama")
    data = SHARED_DATA / reasoning_file("aqua", "no_cot")
    path = write_study(tmp_path / "study.toml", model, extra.format(data=data, model=model))
    with pytest.raises(GradspecError) as caught:
        load_study(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_dataset_paths_are_relative_to_data_dir(tiny_model, tmp_path: Path):
    study = tmp_path / "studies" / "s.toml"
    study.parent.mkdir()
    relative = os.path.relpath(SHARED_DATA, study.parent)
    study.write_text(f"""title = "t"
data_dir = "{relative}"
[[models]]
label = "tiny"
path = "{tiny_model("llama")}"
[[datasets]]
path = "reasoning_cot/correct/gsm8k_no_cot.json"
task = "gsm8k"
style = "none"
""")
    name = Path("reasoning_cot", "correct", "gsm8k_no_cot.json")
    assert load_study(study).datasets[0].path.resolve() == (SHARED_DATA / name).resolve()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / name).parent.mkdir(parents=True)
    shutil.copyfile(SHARED_DATA / name, elsewhere / name)
    assert load_study(study, data_dir=elsewhere).datasets[0].path == elsewhere / name
    with pytest.raises(GradspecError, match=r"datasets\[0\]: data path .* --data-dir"):
        load_study(study, data_dir=tmp_path / "nowhere")


def test_bad_profile_options_and_toml(tiny_model, tmp_path: Path):
    model = tiny_model("llama")
    for limit, message in (("0", "--limit must be at least 1"), ("'x'", "[profile]")):
        with pytest.raises(GradspecError, match=message.replace("[", r"\[")):
            load_study(write_study(tmp_path / "s.toml", model, limit=limit))
    broken = tmp_path / "broken.toml"
    broken.write_text("[[models]\n")
    result = CliRunner().invoke(app, ["study", str(broken), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"{broken}: not valid TOML" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(app, ["study", str(tmp_path / "none.toml"), "--out", "o"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_study_out_must_be_empty_or_a_study(tiny_model, tmp_path: Path):
    spec = load_study(write_study(tmp_path / "study.toml", tiny_model("llama")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(GradspecError, match=r"has no study\.json"):
        run_study(spec, tmp_path / "busy")


def test_shipped_fast_slow_study_covers_the_published_design(tiny_model):
    spec = load_study(
        REPO / "studies" / "fast_slow.toml",
        models={"tiny": str(tiny_model("llama"))},
        data_dir=SHARED_DATA,
    )
    assert [m.label for m in spec.models] == ["tiny"]
    assert spec.profile["limit"] == 50
    # the paper's protocol: response tokens only, its system message, q/k/v/o, 1024 tokens
    assert {k: spec.profile[k] for k in ("loss_tokens", "system", "modules", "max_length")} == {
        "loss_tokens": "response",
        "system": "paper",
        "modules": "attn",
        "max_length": 1024,
    }
    labels = pd.DataFrame([d.labels for d in spec.datasets])
    reasoning = labels[labels["domain"] == "reasoning"]
    cot = reasoning[~reasoning["task"].str.startswith("math_")]
    assert len(cot) == 4 * 3 * 2
    assert set(cot["task"]) == {"gsm8k", "aqua", "ecqa", "strategyqa"}
    assert cot.groupby(["style", "correctness"]).size().tolist() == [4] * 6
    math = reasoning[reasoning["task"].str.startswith("math_")]
    assert set(math["task"]) == {"math_algebra", "math_counting_probability", "math_geometry"}
    assert math.groupby(["style", "correctness"]).size().to_dict() == {
        (s, c): 3 for s in ("detailed", "simplified") for c in ("correct", "irrelevant")
    }
    knowledge = labels[labels["domain"] == "knowledge"]
    assert sorted(knowledge["length"].dropna().astype(int).unique()) == [100, 500, 1000]
    assert len(knowledge) == 8
    for dataset in spec.datasets:  # paths resolve against the data folder
        assert dataset.path.resolve().is_relative_to(SHARED_DATA.resolve())
        assert dataset.labels["correctness"] in dataset.path.as_posix()


def test_a_base_instruct_pair_gets_finding_4(tiny_model, tokenizer, tmp_path):
    """Two models named as a pair: their cells carry family and pair labels, and finding 4
    compares them on the same instructions (values checked against the runs' tables)."""
    import numpy as np
    from conftest import build_tiny_model

    from gradspec.findings import evaluate_findings
    from gradspec.runs import load_runs, recorded_finding_modules

    instruct = build_tiny_model("llama", tokenizer, tmp_path / "instruct", seed=1)
    irrelevant = f"""
[[datasets]]
path = "{SHARED_DATA / reasoning_file("gsm8k", "with_cot_gpt4o", "irrelevant")}"
task = "gsm8k"
style = "detailed"
correctness = "irrelevant"
"""
    study_file = write_study(tmp_path / "study.toml", tiny_model("llama"), irrelevant, limit=4)
    text = study_file.read_text().replace(
        'label = "tiny"\n', 'label = "tiny-base"\npair = "base"\nfamily = "tiny"\n'
    )
    text = text.replace(
        "[[datasets]]",
        f'[[models]]\nlabel = "tiny-instruct"\npath = "{instruct}"\npair = "instruct"\n'
        'family = "tiny"\n\n[[datasets]]',
        1,
    )
    text = 'title = "pair"\n[findings]\nmodules = ["q_proj", "o_proj"]\n' + text.replace(
        'title = "tiny"\n', ""
    )
    study_file.write_text(text)
    out = tmp_path / "out"
    run_study(load_study(study_file), out)
    assert recorded_finding_modules([out]) == ("q_proj", "o_proj")
    runs = load_runs([out])
    assert {(r.labels["model"], r.labels["pair"], r.labels["family"]) for r in runs} == {
        ("tiny-base", "base", "tiny"),
        ("tiny-instruct", "instruct", "tiny"),
    }
    fourth = evaluate_findings(runs, n_boot=200)[3]
    row = fourth.deciding_rows().iloc[0]
    assert (row["family"], row["base"], row["instruct"]) == ("tiny", "tiny-base", "tiny-instruct")

    def level(model: str, style: str) -> float:
        run = next(
            r
            for r in runs
            if r.labels["model"] == model
            and r.labels["style"] == style
            and r.labels["correctness"] == "correct"
        )
        modules = ("q_proj", "k_proj", "v_proj", "o_proj")
        return float(np.mean([run.values(m, "nuclear_norm").values.mean() for m in modules]))

    effect = {m: level(m, "none") / level(m, "detailed") for m in ("tiny-base", "tiny-instruct")}
    assert row["fast_effect_base"] == pytest.approx(effect["tiny-base"])
    assert row["effect_gap"] == pytest.approx(effect["tiny-instruct"] - effect["tiny-base"])
    with pytest.raises(GradspecError, match="pair 'chat' is not one of base, instruct"):
        study_file.write_text(text.replace('pair = "instruct"', 'pair = "chat"'))
        load_study(study_file)


def test_a_study_resolves_each_model_and_dataset_once(
    tiny_model: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Planning and profiling two cells of one model: the model's signature is computed
    once, each dataset is found when the study is read and hashed once."""
    spec = load_study(write_study(tmp_path / "study.toml", tiny_model("llama"), limit=1))
    calls: Counter[str] = Counter()

    def count(module: Any, name: str) -> None:
        real = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    count(modeling, "model_signature")
    count(data, "data_sha256")
    count(data, "resolve_data_files")
    assert [ran for _, ran in run_study(spec, tmp_path / "out")] == [True, True]
    assert calls == {"model_signature": 1, "data_sha256": 2}


def test_a_second_study_into_the_same_folder_is_refused(tiny_model, tmp_path):
    """While one study holds its folder, another into it fails at once and writes nothing
    (two would rewrite study.json over each other); once free, it runs."""
    spec = load_study(write_study(tmp_path / "study.toml", tiny_model("llama"), limit=1))
    out = tmp_path / "out"
    out.mkdir()
    with (out / ".lock").open("a") as held:  # the first study's lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(GradspecError, match=f"{out} is being written by another gradspec"):
            run_study(spec, out)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert all(ran for _, ran in run_study(spec, out))
