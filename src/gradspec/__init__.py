"""gradspec: exact per-example, per-layer gradient spectra for Hugging Face causal LMs."""

import os

# OpenMP threads that spin while waiting make LAPACK calls (the QR and SVD of the spectra)
# up to two orders of magnitude slower when other jobs share the CPU; sleeping threads cost
# next to nothing on an idle machine. Must be set before torch loads; a user's own setting
# wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from .data import encode, load_examples
from .engine import profile
from .errors import DataError, GradspecError
from .store import load_run

__all__ = [
    "DataError",
    "GradspecError",
    "__version__",
    "encode",
    "load_examples",
    "load_run",
    "profile",
]
