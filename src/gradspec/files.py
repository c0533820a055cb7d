"""Writing files safely: atomic replacement, outputs that cannot clobber inputs, and locks.

Every file gradspec writes goes through :func:`atomic_path`: it is written under a hidden
temporary name in its own folder and renamed over its final name only when complete, so
a killed or failed write leaves the old file (or none), never half of one, and a hard
link to the old file keeps the old bytes. :func:`refuse_unsafe_output` refuses an output
that is an input (the same file, a hard or a symbolic link to it) or lies inside a run
directory; :func:`exclusive_lock` and :class:`RunLock` give a folder one writer at a time.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import GradspecError

TMP_SUFFIX = ".tmp"
RUN_MANIFEST = "manifest.json"  # the file that makes a folder a run directory
RUN_LOCK = ".lock"  # in a run directory: held by the one process writing it


def cannot_write(path: Path, exc: OSError) -> GradspecError:
    """A one-line error for a failed write: the path and the system's reason."""
    return GradspecError(f"cannot write {path}: {exc.strerror or exc}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` if the block
    succeeds, removed if it fails. A system error (permissions, a full disk, a file where
    a folder should be) becomes a GradspecError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, newline: str | None = None) -> None:
    """Write UTF-8 text (with ``newline`` for each "\\n", if given) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline=newline)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write indented, key-sorted JSON atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, **options: Any) -> None:
    """Write a Parquet file atomically (``options`` go to ``pq.write_table``)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **options)


# ---------------------------------------------------------------- outputs and inputs


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (same device and inode): a hard or symbolic link."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def enclosing_run(path: Path) -> Path | None:
    """The run directory ``path`` is in or is (a folder holding manifest.json), if any."""
    resolved = path.resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / RUN_MANIFEST).is_file():
            return folder
    return None


def refuse_unsafe_output(
    out: str | os.PathLike,
    inputs: Iterable[Path],
    option: str,
    allowed_in_run: Iterable[str] = (),
) -> Path:
    """``out``, unless it is one of ``inputs`` (or a link to one) or inside a run directory.

    ``allowed_in_run`` names the files a command may write at the top of a run directory
    (its own derived tables, such as ``scores.parquet``).
    """
    out = Path(out)
    for source in inputs:
        if out.resolve() == source.resolve() or same_file(out, source):
            raise GradspecError(
                f"{option} {out} is an input data file ({source}, or a link to it); "
                "choose another path"
            )
    run = enclosing_run(out)
    if run is not None and not (out.resolve().parent == run and out.name in allowed_in_run):
        raise GradspecError(
            f"{option} {out} is inside the run directory {run}, whose files gradspec "
            "owns; choose a path outside it"
        )
    return out


# ---------------------------------------------------------------- locks


@contextmanager
def exclusive_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing); other holders wait,
    or, with ``wait=False``, get a GradspecError at once."""
    try:
        handle = path.open("a")
    except OSError as exc:
        raise cannot_write(path, exc) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise GradspecError(
                f"{path.parent} is being written by another gradspec process (profile, a "
                "study or the training monitor); wait until it ends, or use another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunLock:
    """The lock of one run directory, held from the first write to the last.

    A second writer fails at once rather than waiting: the first may run for hours, and
    when it ends the second would find the run finished or made with other inputs.
    """

    def __init__(self, root: Path):
        self.root = root
        self._stack: ExitStack | None = None

    def acquire(self) -> None:
        """Take the lock (the run directory must exist); a no-op if this object holds it."""
        if self._stack is None:
            stack = ExitStack()
            stack.enter_context(exclusive_lock(self.root / RUN_LOCK, wait=False))
            self._stack = stack

    def release(self) -> None:
        """Let another writer in."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()
