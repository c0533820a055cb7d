"""Data parallelism on torch.distributed: the process group, the split of work, agreement.

``torchrun``, ``accelerate launch`` and SLURM's ``srun torchrun`` set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; from them gradspec joins
a process group (gloo on CPU, NCCL with one GPU per rank), unless the caller already set one
up, whose ranks it then uses. There is no scheduler of our own: the work (a run's missing
chunks, or a study's cells) is split the same way on every rank from the same inputs, each
rank writes its own files, and rank 0 alone writes what is shared.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import GradspecError

T = TypeVar("T")
# How long a rank waits at a barrier for the slowest one: the split is balanced to within
# about one chunk, so this only needs to exceed the time one chunk takes.
WAIT_FOR_SLOWEST_RANK = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: its rank and the number of ranks."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


LOCAL = Ranks()


def is_main_process() -> bool:
    """Rank 0 of the process group if one is initialised, else of the launcher (``RANK``),
    or a process started alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def current_ranks() -> Ranks:
    """This process's ranks in the process group a caller (such as the Trainer) set up;
    ``LOCAL`` without one."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return LOCAL


def launched_world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``, else the rank modulo the GPUs)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank % max(torch.cuda.device_count(), 1)


def rank_device(device: str) -> str:
    """One GPU per rank: under a launcher or process group, 'auto' and 'cuda' mean
    ``cuda:LOCAL_RANK``; any other device (cpu, an explicit cuda:N) is kept."""
    in_group = launched_world_size() > 1 or (dist.is_available() and dist.is_initialized())
    if in_group and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return device


@contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """The ranks of this process: the caller's process group if one is initialised; else
    one joined from the launcher's environment (left again on exit); else a single process."""
    if dist.is_available() and dist.is_initialized():
        yield current_ranks()
        return
    if launched_world_size() <= 1:
        yield LOCAL
        return
    on_gpu = rank_device(device).startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=WAIT_FOR_SLOWEST_RANK)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def agree(ranks: Ranks, work: Callable[[], T]) -> T:
    """Run ``work`` on every rank; if it fails on any rank, fail on all of them.

    A GradspecError is raised again on every rank with the message of the lowest failing
    rank, so each prints the same one line. Any other exception is raised as it is on its
    own rank, and as a GradspecError naming it on the others, which would otherwise wait.
    """
    result: Any = None
    failure: BaseException | None = None
    try:
        result = work()
    except Exception as exc:
        failure = exc
    if not ranks.distributed:
        if failure is not None:
            raise failure
        return result
    messages: list[str | None] = [None] * ranks.size
    dist.all_gather_object(messages, _failure_message(ranks, failure))
    first = next((m for m in messages if m is not None), None)
    if failure is not None and not isinstance(failure, GradspecError):
        raise failure
    if first is not None:
        raise GradspecError(first)
    return result


def _failure_message(ranks: Ranks, failure: BaseException | None) -> str | None:
    if failure is None or isinstance(failure, GradspecError):
        return None if failure is None else str(failure)
    return f"rank {ranks.rank} failed: {type(failure).__name__}: {failure}"


def from_main(ranks: Ranks, value: T) -> T:
    """Rank 0's ``value`` on every rank (so all act on one view of the file system)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(ranks: Ranks, value: T) -> list[T]:
    """Every rank's ``value``, in rank order."""
    if not ranks.distributed:
        return [value]
    values: list[T | None] = [None] * ranks.size
    dist.all_gather_object(values, value)
    return values  # type: ignore[return-value]


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here."""
    if ranks.distributed:
        dist.barrier()


def split_by_weight(weights: Sequence[int], n_ranks: int) -> list[list[int]]:
    """Indices of ``weights`` for each rank, balancing the sums: greedy longest first (the
    heaviest item goes to the least loaded rank; ties by index, then by rank), each rank's
    indices in increasing order. The same weights always give the same split."""
    loads = [0] * n_ranks
    shares: list[list[int]] = [[] for _ in range(n_ranks)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min(range(n_ranks), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += weights[index]
    return [sorted(share) for share in shares]


class Lockstep:
    """Runs passes so that every rank runs the same sequence of kinds of pass, as FSDP's
    collectives need: before each pass the ranks exchange the kind of their next one; the
    least kind wins (by name), ranks with another kind or none left run it on ``idle``,
    whose results are dropped. On one rank (or ``LOCAL``) a pass simply runs."""

    def __init__(self, ranks: Ranks, passes: dict[str, Callable[[Any], Any]], idle: Any):
        self.ranks, self.passes, self.idle = ranks, passes, idle

    def run(self, kind: str, work: Any) -> Any:
        """``passes[kind](work)``, after the passes other ranks need first."""
        while (agreed := self._agreed_kind(kind)) != kind:
            self.passes[agreed](self.idle)
        return self.passes[kind](work)

    def finish(self) -> None:
        """Run idle passes until every rank has run its last pass."""
        while (agreed := self._agreed_kind(None)) is not None:
            self.passes[agreed](self.idle)

    def _agreed_kind(self, kind: str | None) -> str | None:
        pending = [k for k in all_gather(self.ranks, kind) if k is not None]
        return min(pending, default=None)
