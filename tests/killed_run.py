"""Test helper: a run that exits hard (as a kill would) after writing some chunks.

The subprocesses of the resume and distributed tests call ``stop_if_asked`` before
profiling: with ``GRADSPEC_TEST_STOP_AFTER_CHUNKS`` set, the store's ``write_chunk`` is
patched to exit after that many chunks of this process (only on rank
``GRADSPEC_TEST_STOP_RANK`` if set), with no cleanup and no manifest update.
"""

from __future__ import annotations

import os
from typing import Any

from gradspec.store import RunStore

STOP_AFTER_CHUNKS = "GRADSPEC_TEST_STOP_AFTER_CHUNKS"
STOP_RANK = "GRADSPEC_TEST_STOP_RANK"
STOPPED_EXIT_CODE = 75


def stop_if_asked() -> None:
    """Patch ``RunStore.write_chunk`` to exit hard where the environment says."""
    chunks = os.environ.get(STOP_AFTER_CHUNKS)
    rank = os.environ.get("RANK", "0")
    if chunks is None or os.environ.get(STOP_RANK, rank) != rank:
        return
    write_chunk = RunStore.write_chunk
    written = [0]

    def write_then_stop(self: RunStore, *args: Any, **kwargs: Any) -> None:
        write_chunk(self, *args, **kwargs)
        written[0] += 1
        if written[0] == int(chunks):
            os._exit(STOPPED_EXIT_CODE)

    RunStore.write_chunk = write_then_stop  # type: ignore[method-assign]
