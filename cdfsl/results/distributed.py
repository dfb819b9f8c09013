"""torch.distributed for episodic runs: the launcher's ranks, one process group, rank-0 decisions.

``torchrun`` (or torch's elastic launcher) sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE
> 1 a run joins one process group (nccl when CUDA is present, gloo otherwise) and each rank
evaluates its share of the episodes (see ``cdfsl.results.shards``). The group carries only
small decisions (rank 0's resume scan, its summary) and barriers, always over gloo on the CPU
(a gloo side group when the default is nccl); rows travel through files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cdfsl.errors import CdfslError
from cdfsl.plumbing import cuda_index
from cdfsl.results.shards import Shard

T = TypeVar("T")

# Ranks wait at the end of a run for the slowest one, and after a resume one rank may hold all
# the episodes left, for hours; torch's default of 30 minutes would end such a run. A rank that
# dies is noticed by torchrun, which stops the others, so a long wait does not hang a job.
_TIMEOUT = timedelta(days=7)

# The gloo group of the current default group when that one is not gloo (created on first use,
# by every rank at the same call).
_SIDE: dict[str, Any] = {}


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launcher's group: global rank, world size, rank on its node."""

    rank: int
    world: int
    local_rank: int


def launched_ranks() -> Ranks | None:
    """The ranks a launcher set in the environment, or None for a process alone (WORLD_SIZE 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except (KeyError, ValueError) as err:
        raise CdfslError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} with RANK/LOCAL_RANK missing or not "
            f"integers ({err}); expected the values torchrun sets; fix: unset WORLD_SIZE or "
            "start the command with torchrun"
        ) from None
    if not 0 <= rank < world or local_rank < 0:
        raise CdfslError(
            f"RANK={rank}, LOCAL_RANK={local_rank} with WORLD_SIZE={world}; expected "
            "0 <= RANK < WORLD_SIZE; fix: start the command with torchrun"
        )
    return Ranks(rank, world, local_rank)


def is_grouped() -> bool:
    """Whether this process is one of several in an initialised torch.distributed group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranked_shard() -> Shard | None:
    """This rank's share of the episodes in the initialised group; None outside a group."""
    if not is_grouped():
        return None
    return Shard(dist.get_rank(), dist.get_world_size(), ranked=True)


@contextmanager
def process_group(backend: str | None = None) -> Iterator[Ranks | None]:
    """Join the launcher's process group for the duration; yields the ranks (None when alone).

    ``backend`` None: nccl with CUDA, else gloo. A group initialised by the caller is used as it
    is and left open.
    """
    ranks = launched_ranks()
    if ranks is None or dist.is_initialized():
        yield ranks
        return
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(cuda_index())
    dist.init_process_group(backend, timeout=_TIMEOUT)
    try:
        yield ranks
    finally:
        _SIDE.clear()
        dist.destroy_process_group()


def _cpu_group() -> Any:
    """The group for our messages: small Python objects on the CPU, so gloo."""
    if dist.get_backend() == "gloo":
        return None  # the default group
    if "group" not in _SIDE:
        _SIDE["group"] = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    return _SIDE["group"]


def barrier() -> None:
    """Wait for every rank of the group; a no-op for a process alone."""
    if is_grouped():
        dist.barrier(group=_cpu_group())


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises its error.

    A CdfslError reaches every rank as it is; any other error is re-raised on rank 0 and named
    on the others, so that no rank is left waiting for a rank 0 that has failed.
    """
    if not is_grouped():
        return fn()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except CdfslError as err:
            payload = [("error", str(err))]
        except Exception as err:
            failure = err
            payload = [("failed", f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(payload, src=0, group=_cpu_group())
    kind, value = payload[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise CdfslError(value)
    if kind == "failed":
        raise CdfslError(
            f"rank 0 failed ({value}); expected it to finish; fix: see rank 0's error above"
        )
    return value
