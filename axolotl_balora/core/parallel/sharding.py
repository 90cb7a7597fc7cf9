"""Is a tensor sharded, and by which engine; the one spelling of each question.

DeepSpeed ZeRO-3 marks its partitioned parameters with `ds_id` (the local tensor is
empty, the real shape in `ds_shape`); FSDP2 makes them `DTensor` shards. Everything
else in the package asks here, so a new engine (or a renamed attribute) is one edit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: nothing is ever a DTensor
    DTensor = None


def is_dtensor(tensor: torch.Tensor) -> bool:
    """An FSDP2 (or tensor-parallel) DTensor."""
    return DTensor is not None and isinstance(tensor, DTensor)


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its local data is a partition, often empty)."""
    return hasattr(tensor, "ds_id")


def sharding_engine(tensor: torch.Tensor) -> str | None:
    """"ZeRO-3", "FSDP2" (a DTensor), or None for a whole tensor."""
    if is_zero3_partitioned(tensor):
        return "ZeRO-3"
    if is_dtensor(tensor):
        return "FSDP2"
    return None


def is_sharded(tensor: torch.Tensor) -> bool:
    return sharding_engine(tensor) is not None


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it); else itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@contextlib.contextmanager
def gathered_zero3(weights: list[torch.Tensor]) -> Iterator[None]:
    """The full values of ZeRO-3 partitioned weights, read-only, for the block; else nothing.

    A collective: every rank gathers the same weights (no modifier rank), so all ranks
    see identical values and the extra memory is these weights only; they are
    partitioned again on exit.
    """
    if not any(is_zero3_partitioned(weight) for weight in weights):
        yield
        return
    import deepspeed  # only reachable for a ZeRO-3 partitioned parameter

    with deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
        yield
