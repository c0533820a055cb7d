"""Models and data sets named as Hugging Face users name them: ``org/name`` on the Hub.

A model id is resolved by ``huggingface_hub.snapshot_download``: it downloads when online
and, under ``HF_HUB_OFFLINE=1``, finds the snapshot in the cache (``HF_HOME`` /
``HF_HUB_CACHE``) as ``from_pretrained`` would. A data set id is loaded by
``datasets.load_dataset`` (its own cache under ``HF_DATASETS_OFFLINE=1``), and one split
is saved once as a ``save_to_disk`` folder in gradspec's cache, keyed by the loaded data's
fingerprint, so every later step (hashing, the examples' positions, ``select``) reads it
as a local datasets folder. A local path always wins over an id of the same spelling.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import GradspecError
from .paths import build_atomically, cache_root

REVISION_SEPARATOR = "@"
# What a checkpoint needs; weights are fetched as safetensors, as .bin only without them.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
LEGACY_WEIGHT_PATTERNS = ["*.bin"]
REMOTE_CODE_PATTERNS = ["*.py"]
DATASETS_SUBDIR = "hub-datasets"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")  # a missing file of these is no Hub id
DATASET_MARKER = "dataset_info.json"  # save_to_disk writes it; present once a copy is whole


@dataclass(frozen=True)
class HubSnapshot:
    """A model repository resolved to one commit, and the folder holding its files."""

    repo_id: str
    revision: str | None  # as asked; None is the default branch
    commit: str
    directory: Path

    def record(self) -> dict[str, Any]:
        """What the manifest records: the id, the revision asked for, the commit resolved."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


@dataclass(frozen=True)
class HubDataset:
    """One split of a Hub data set, and the local datasets folder it was saved to."""

    repo_id: str
    config: str | None
    split: str
    commit: str | None  # the cache folder's revision, where datasets records one
    fingerprint: str
    directory: Path

    def record(self) -> dict[str, Any]:
        """What the manifest records about the data set."""
        return {k: v for k, v in asdict(self).items() if k != "directory"}


def is_hub_id(name: str) -> bool:
    """Whether ``name`` (with an optional ``@revision``) is spelled as a Hub repository id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = name.partition(REVISION_SEPARATOR)[0]
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def split_revision(
    name: str, revision: str | None, option: str = "--model"
) -> tuple[str, str | None]:
    """(repo id, revision) of ``org/name@rev`` or of ``org/name`` with ``revision``."""
    repo_id, sep, suffix = name.partition(REVISION_SEPARATOR)
    if sep and revision and suffix != revision:
        raise GradspecError(f"{option} {name}: names revision {suffix}, but --revision {revision}")
    return repo_id, (suffix if sep else revision)


def model_snapshot(name: str, revision: str | None, trust_remote_code: bool) -> HubSnapshot:
    """Download (or find in the cache, offline) the checkpoint files of a model id.

    Python files are fetched only with ``trust_remote_code``; ``.bin`` weights only for a
    repository that has no safetensors.
    """
    repo_id, revision = split_revision(name, revision)
    patterns = CHECKPOINT_PATTERNS + (REMOTE_CODE_PATTERNS if trust_remote_code else [])
    directory = _snapshot(repo_id, revision, patterns)
    if not any(directory.glob("*.safetensors")):
        directory = _snapshot(repo_id, revision, patterns + LEGACY_WEIGHT_PATTERNS)
    return HubSnapshot(repo_id, revision, directory.name, directory)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download``'s folder (named by the commit), errors as one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # gradspec shows its own progress
    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise GradspecError(
            f"--model {at}: not a local path, and not in the Hugging Face cache "
            f"({_hub_cache()}){_offline_hint(_download_command(repo_id, revision))}"
        ) from None
    except RevisionNotFoundError:
        raise GradspecError(f"--model {at}: the Hub has no revision '{revision}'") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise GradspecError(
            f"--model {at}: not a local path, and the Hub refused it ({type(exc).__name__}: "
            "no such model, or it is private or gated: log in with `hf auth login`)"
        ) from None


def _download_command(repo_id: str, revision: str | None) -> str:
    """The ``hf`` command that puts a model's snapshot in the cache."""
    at = f" --revision {revision}" if revision else ""
    return f"download it with `hf download {repo_id}{at}`"


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline_hint(download: str) -> str:
    """What to do when a Hub id is not cached (``download``: how to fetch it once online);
    depends on whether offline mode is on."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return f"; HF_HUB_OFFLINE is set: {download} once online"
    return "; the Hub could not be reached: check the network, or download it elsewhere"


# ---------------------------------------------------------------- data sets


def dataset_split(
    name: str, split: str | None, config: str | None, cache_dir: Path | None = None
) -> HubDataset:
    """One split of a Hub data set as a local datasets folder (saved once, then reused)."""
    repo_id, revision = split_revision(name, None, "--data")
    split = split or "train"
    dataset = _load_dataset(repo_id, revision, config, split)
    where = (cache_dir or cache_root()) / DATASETS_SUBDIR / repo_id.replace("/", "--")
    target = where / f"{config or 'default'}-{split}-{dataset._fingerprint}"
    build_atomically(
        target,
        lambda folder: (folder / DATASET_MARKER).is_file(),
        lambda staging: dataset.save_to_disk(str(staging)),
    )
    return HubDataset(
        repo_id,
        dataset.info.config_name or config,
        split,
        _cached_revision(dataset),
        dataset._fingerprint,
        target,
    )


def _load_dataset(repo_id: str, revision: str | None, config: str | None, split: str) -> Any:
    """``datasets.load_dataset(repo_id, config, split=split)``, errors as one line."""
    try:
        import datasets
    except ImportError:
        raise GradspecError(
            f"--data {repo_id}: loading a Hub data set needs the 'datasets' package: "
            "pip install 'gradspec[datasets]'"
        ) from None
    datasets.disable_progress_bars()
    at = f"--data {repo_id}" + (f" --data-config {config}" if config else "")
    try:
        return datasets.load_dataset(repo_id, config, split=split, revision=revision)
    except ConnectionError:
        raise GradspecError(
            f"{at}: not a local path, and not in the datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE})"
            f"{_offline_hint('run the same command (it loads the data set into this cache)')}"
        ) from None
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        reason = " ".join(str(exc).split())  # datasets' messages span lines
        raise GradspecError(f"{at} --split {split}: {reason}") from None


def _cached_revision(dataset: Any) -> str | None:
    """The commit a Hub load caches its Arrow files under (``.../<version>/<commit>/``)."""
    files = dataset.cache_files
    folder = Path(files[0]["filename"]).parent.name if files else ""
    return folder if re.fullmatch(r"[0-9a-f]{40}", folder) else None


def hub_dataset_name(data: str | os.PathLike) -> str | None:
    """``data`` as a Hub data set id when it is spelled as one and is no local path."""
    text = os.fspath(data)
    path = Path(text)
    if path.exists() or path.suffix in DATA_SUFFIXES or any(ch in text for ch in "*?["):
        return None
    return text if is_hub_id(text) else None
