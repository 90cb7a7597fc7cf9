"""Is torch.distributed running, and which rank is this; the one spelling of each question."""

from __future__ import annotations

from torch import distributed as dist


def distributed_running() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if distributed_running():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_rank() -> bool:
    return world()[0] == 0


def several_ranks() -> bool:
    """More than one process takes part: collectives are needed to agree."""
    return world()[1] > 1
