"""GGUF checkpoints (llama.cpp, Ollama, LM Studio): dequantised once into a cached HF folder.

``--model`` may name a ``.gguf`` file, or a folder without a ``config.json`` that holds
exactly one. gradspec reads the file's header first (a truncated or non-GGUF file, an
architecture transformers' GGUF loader does not know, or a tensor type the ``gguf``
package cannot dequantise is refused before anything is written), then has transformers
dequantise it to float32 and saves a plain Hugging Face checkpoint under
``<cache>/gguf/<sha256 of the file>/``. The folder is built in a staging directory under a
lock and renamed into place when complete (:func:`gradspec.paths.build_atomically`), so a
second process converting the same file waits and then reuses it, and a killed conversion
leaves nothing a later run trusts. ``gguf.json`` in the folder records the source file,
its SHA-256, architecture and tensor quantisation types; it is part of the model's
fingerprint, so runs of two different GGUF files are never mixed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import GradspecError
from .paths import build_atomically, cache_root

GGUF_SUFFIX = ".gguf"
CACHE_SUBDIR = "gguf"
MANIFEST = "gguf.json"
READ_ERRORS = (ValueError, IndexError, OSError)  # what GGUFReader raises on a bad file


@dataclass(frozen=True)
class GgufFile:
    """A checked GGUF file: what the run manifest records about it."""

    path: str
    sha256: str
    architecture: str
    tensor_types: dict[str, int]  # quantisation type name -> number of tensors

    def record(self) -> dict[str, Any]:
        return asdict(self)


def find_gguf(model: str | os.PathLike) -> Path | None:
    """The GGUF file ``model`` names, or None for an ordinary checkpoint folder.

    A ``.gguf`` file, or a folder without ``config.json`` holding exactly one ``.gguf``.
    """
    path = Path(model)
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise GradspecError(f"--model {path}: holds {len(found)} GGUF files ({names}); name one")
    return found[0] if found else None


def converted_checkpoint(gguf_path: Path, cache_dir: Path | None = None) -> tuple[Path, GgufFile]:
    """(the cached float32 HF folder of ``gguf_path``, its description with this path).

    Converts on first use, after checking the file; later calls (and concurrent ones, after
    waiting) find the folder by the file's SHA-256 and reuse it.
    """
    target = (cache_dir or cache_root()) / CACHE_SUBDIR / file_sha256(gguf_path)
    if not is_converted(target):
        described = describe_gguf(gguf_path)  # a bad file is refused before any writing
        build_atomically(
            target, is_converted, functools.partial(_convert, gguf_path, described=described)
        )
    recorded = json.loads((target / MANIFEST).read_text())
    return target, GgufFile(**{**recorded, "path": str(gguf_path.resolve())})


def is_converted(directory: Path) -> bool:
    """Whether ``directory`` holds a complete conversion (its manifest is written last)."""
    return (directory / MANIFEST).is_file()


def describe_gguf(path: Path) -> GgufFile:
    """Read and check the file's header: architecture and tensor types (no tensor data).

    Raises a one-line GradspecError naming the file for anything that would fail later.
    """
    gguf = _gguf_package()
    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise GradspecError(f"{path}: GGUF file without general.architecture") from None
    except READ_ERRORS as exc:
        raise GradspecError(f"{path}: not a valid GGUF file or truncated ({exc})") from None
    _check_architecture(path, architecture)
    types = Counter(tensor.tensor_type for tensor in reader.tensors)
    dequantisable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    dequantisable |= set(gguf.quants._type_traits)
    missing = sorted(t.name for t in types if t not in dequantisable)
    if missing:
        raise GradspecError(
            f"{path}: tensor type {', '.join(missing)} cannot be dequantised by "
            "the installed gguf package"
        )
    return GgufFile(
        str(path.resolve()),
        file_sha256(path),
        architecture,
        {t.name: n for t, n in sorted(types.items(), key=lambda item: item[0].name)},
    )


def _check_architecture(path: Path, architecture: str) -> None:
    """Refuse an architecture transformers' GGUF loader does not know, naming it."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as exc:
        if "not supported" not in str(exc):
            raise GradspecError(f"{path}: {exc}") from None
        raise GradspecError(
            f"{path}: architecture '{architecture}' is not supported by transformers' "
            "GGUF loader (convert the model to a Hugging Face checkpoint folder instead)"
        ) from None


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) within a process."""
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _convert(gguf_path: Path, staging: Path, described: GgufFile) -> None:
    """Dequantise ``gguf_path`` to float32 and save a plain checkpoint into ``staging``.

    A model loaded from a GGUF keeps a quantisation config and refuses ``save_pretrained``,
    so a plain model of the same class is built from the config and given the weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = gguf_path.parent, gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (NotImplementedError, ValueError) as exc:
        raise GradspecError(f"{gguf_path}: transformers cannot load it: {exc}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / MANIFEST).write_text(json.dumps(described.record(), indent=2) + "\n")


def _gguf_package() -> Any:
    try:
        import gguf
    except ImportError:
        raise GradspecError(
            "reading GGUF files needs the gguf package: pip install 'gradspec[gguf]'"
        ) from None
    return gguf
