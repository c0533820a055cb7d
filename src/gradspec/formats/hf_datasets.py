"""Hugging Face ``datasets`` folders (``Dataset.save_to_disk``, Arrow files).

The ``datasets`` library is imported only when such a folder is read or written, so the
other formats work without it (``pip install 'gradspec[datasets]'`` adds it).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, GradspecError
from ..paths import move_into_place
from .base import SourceRecord
from .table import table_records

MARKERS = ("state.json", "dataset_info.json")  # what save_to_disk writes beside the Arrow files
DICT_MARKER = "dataset_dict.json"


class HfDatasetFolder:
    """A folder written by ``datasets.Dataset.save_to_disk``."""

    name = "hf_datasets"

    def detect(self, path: Path) -> bool:
        """A folder holding save_to_disk's state.json and dataset_info.json."""
        return path.is_dir() and all((path / marker).is_file() for marker in MARKERS)

    def read(self, path: Path) -> list[SourceRecord]:
        """Every row as a record, numbered from 0 as ``dataset[i]`` is."""
        return table_records(load_dataset_folder(path).to_list())

    def write(self, path: Path, rows: Sequence[int], like: Path) -> None:
        """``like``'s rows at ``rows`` as a new folder, same features; replaces an old output."""
        if path.exists() and not self.detect(path):
            raise GradspecError(
                f"--out {path} exists and is not a datasets folder; choose a new path"
            )
        staging = path.with_name(f".{path.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        load_dataset_folder(like).select(rows).save_to_disk(str(staging))
        move_into_place(staging, path)


def is_dataset_dict(path: Path) -> bool:
    """A folder written by ``DatasetDict.save_to_disk`` (one subfolder per split)."""
    return path.is_dir() and (path / DICT_MARKER).is_file()


def load_dataset_folder(path: Path) -> Any:
    """``datasets.load_from_disk(path)``, with clear errors when it is missing or fails."""
    try:
        import datasets
    except ImportError:
        raise GradspecError(
            f"{path}: reading a datasets folder needs the 'datasets' package: "
            "pip install 'gradspec[datasets]'"
        ) from None
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(str(path), None, f"not a readable datasets folder ({exc})") from None
