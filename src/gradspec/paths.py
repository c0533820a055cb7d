"""Where gradspec keeps what it builds, and how it builds a cached folder safely.

The project root, the cache (``<project>/.cache`` or ``$GRADSPEC_CACHE``), and
:func:`build_atomically`: a cached folder is written into a staging directory beside its
final place and renamed there only when complete, under an exclusive lock, so a killed
build leaves nothing a later run would trust and a concurrent build waits instead of
writing the same folder twice. (The shared data's folder and layout: ``shared_data.py``.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .files import exclusive_lock

CACHE_ENV = "GRADSPEC_CACHE"


def project_root() -> Path:
    """The checkout gradspec runs from (editable install), else the working directory."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def cache_root() -> Path:
    """Where gradspec caches what it builds: $GRADSPEC_CACHE, else ``<project>/.cache``."""
    return Path(os.environ.get(CACHE_ENV) or project_root() / ".cache")


def build_atomically(
    target: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None]
) -> Path:
    """``target``, made first by ``build(staging)`` unless ``is_complete(target)``.

    Concurrent callers wait on ``<target>.lock`` and find the folder complete when they get
    it. A build that raises leaves no staging folder behind; one that was killed leaves a
    hidden ``.<name>-*`` folder, removed by the next build.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f"{target.name}.lock"):
        if is_complete(target):
            return target
        remove_leftovers(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is for everyone
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        move_into_place(staging, target)
    return target


def remove_leftovers(target: Path) -> None:
    """Delete staging folders of builds of ``target`` that were killed (caller holds the lock)."""
    for leftover in target.parent.glob(f".{target.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, first moving a stale ``target`` aside."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        os.replace(target, stale / target.name)
        os.replace(staging, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staging, target)
