"""gradspec: exact per-example, per-layer gradient spectra for Hugging Face causal LMs.

The public names are imported on first access (PEP 562), so ``import gradspec`` and the
CLI's ``--help`` do not load torch or transformers.
"""

import importlib
import os
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while waiting make LAPACK calls (the QR and SVD of the spectra)
# up to two orders of magnitude slower when other jobs share the CPU; sleeping threads cost
# next to nothing on an idle machine. Must be set before torch loads; a user's own setting
# wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = version("gradspec")

# Public name -> the submodule that defines it.
_PUBLIC = {
    "DataError": "errors",
    "GradspecError": "errors",
    "encode": "data",
    "learn_flags": "detector",
    "load_examples": "data",
    "load_run": "store",
    "profile": "engine",
}

__all__ = [  # noqa: RUF022 - the version first, then _PUBLIC's names
    "__version__",
    "DataError",
    "GradspecError",
    "encode",
    "learn_flags",
    "load_examples",
    "load_run",
    "profile",
]

if TYPE_CHECKING:
    from .data import encode, load_examples
    from .detector import learn_flags
    from .engine import profile
    from .errors import DataError, GradspecError
    from .store import load_run


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
