"""Running under ``torchrun``: which share of the inputs this process certifies.

``torchrun --nproc_per_node=K -m certify ...`` starts K processes with RANK, WORLD_SIZE and
LOCAL_RANK in their environment. Each behaves as ``--shard RANK/WORLD_SIZE`` on its own
device (cuda:LOCAL_RANK, or the CPU), then waits at a barrier so that rank 0 can merge the
shards. The process group (gloo, which serves the barrier on CPUs and GPUs alike) exists
only when WORLD_SIZE > 1; no tensors are exchanged.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch.distributed as dist

from ancer.errors import ArgumentError

#: how long a rank that finished waits at the barrier for the others (their shards may
#: take hours longer)
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes of one run (0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Launch:
    """The launch torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (0 of 1 if unset)."""
    try:
        launch = Launch(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ArgumentError("RANK, WORLD_SIZE and LOCAL_RANK must be integers: launch with "
                            "torchrun, or unset them") from None
    if not 0 <= launch.rank < launch.world_size:
        raise ArgumentError(f"RANK={launch.rank} is outside WORLD_SIZE={launch.world_size}: "
                            "launch with torchrun, or unset them")
    return launch


@contextmanager
def process_group(launch: Launch) -> Iterator[None]:
    """The gloo process group of a distributed launch, destroyed on exit (nothing otherwise)."""
    if not launch.distributed:
        yield
        return
    dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size,
                            timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(launch: Launch) -> None:
    """Wait until every rank of a distributed launch gets here."""
    if launch.distributed:
        dist.barrier()
