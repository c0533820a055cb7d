"""gradspec: exact per-example, per-layer gradient spectra for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .data import encode, load_examples
from .engine import profile
from .errors import DataError, GradspecError
from .store import load_run

__all__ = ["DataError", "GradspecError", "__version__", "encode", "load_examples", "load_run",
           "profile"]
