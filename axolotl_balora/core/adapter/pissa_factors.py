"""Every layer's PiSSA factors, computed once: split across ranks, on the accelerator, cached.

Decomposing each target weight is the slow part of the init (an exact SVD of a
4096 x 11008 matrix takes minutes on a CPU). Three things keep it short:

* ranks split the layers (balanced by matrix size), decompose their own, then every
  rank receives each layer's factors from its owner, so all ranks hold the owner's
  bits exactly;
* a weight is decomposed on the local accelerator when there is one (moved there
  one at a time, the factors come back to the layer's device);
* factors are cached on disk under a key that hashes the weight's bytes with the
  rank, scaling and method, so a restart, a resume or the next run with the same
  base loads them; a changed weight has another key, so a stale entry is never used,
  and an unreadable entry is recomputed and replaced.

Under ZeRO-3 gathering a weight is a collective, so the split follows the gathers
there: all ranks gather `world size` consecutive weights together and each decomposes one
of them (`pissa_init.attach_frozen_factors`). When only rank 0 holds real weights (FSDP's
rank-0 loading), rank 0 decomposes every layer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from torch import distributed as dist

from ..parallel.ranks import world

LOG = logging.getLogger(__name__)

CACHE_FORMAT = "balora-pissa-v1"


class FactorCache:
    """Content-addressed files of (B0, A0), one per weight."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(weight: torch.Tensor, rank: int, scaling: float, niter: int | None) -> str:
        digest = hashlib.sha256(
            f"{CACHE_FORMAT}|{tuple(weight.shape)}|{weight.dtype}|{rank}|{scaling!r}|{niter}".encode()
        )
        # Hash the bytes in place (a uint8 view, any dtype, bf16 included): no copy of the weight.
        digest.update(weight.detach().contiguous().cpu().view(torch.uint8).numpy())
        return digest.hexdigest()

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.directory / f"{key}.safetensors"
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = safetensors.torch.load_file(path)
            factors = tensors["b0"], tensors["a0"]
        except Exception as error:  # a truncated or foreign file: recompute, never trust it
            LOG.warning("BA-LoRA init cache: unreadable entry %s (%s); recomputing", path, error)
            self.misses += 1
            return None
        self.hits += 1
        return factors

    def store(self, key: str, b0: torch.Tensor, a0: torch.Tensor) -> None:
        """Write atomically (temporary file, then rename): readers never see half a file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as handle:
            staging = Path(handle.name)
        try:
            safetensors.torch.save_file({"b0": b0.contiguous().cpu(), "a0": a0.contiguous().cpu()}, staging)
            os.replace(staging, self.directory / f"{key}.safetensors")
        finally:
            staging.unlink(missing_ok=True)


def compute_device(weight: torch.Tensor) -> torch.device:
    """Where to decompose: the weight's accelerator, else this rank's GPU, else the CPU."""
    if weight.device.type != "cpu" or not torch.cuda.is_available():
        return weight.device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def balanced_owners(costs: list[int], size: int) -> list[int]:
    """Rank of each layer: largest first, each to the least-loaded rank (same answer on every rank).

    Round robin would give one rank most of the large MLP matrices when a model has
    few layers; the decomposition cost grows with the matrix size.
    """
    loads = [0] * size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(size), key=lambda rank: (loads[rank], rank))
        owners[index] = owner
        loads[owner] += costs[index]
    return owners


def communication_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo (and the others here) CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share_from_owners(factors: list[tuple[torch.Tensor, torch.Tensor] | None],
                      shapes: list[tuple[tuple[int, int], tuple[int, int]]],
                      owners: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank gets each layer's (B0, A0) from the rank that computed it (a collective)."""
    rank, _ = world()
    device = communication_device()
    shared = []
    for owned, (b_shape, a_shape), owner in zip(factors, shapes, owners):
        if rank == owner:
            b0, a0 = (tensor.to(device, torch.float32).contiguous() for tensor in owned)
        else:
            b0 = torch.empty(b_shape, dtype=torch.float32, device=device)
            a0 = torch.empty(a_shape, dtype=torch.float32, device=device)
        dist.broadcast(b0, src=owner)
        dist.broadcast(a0, src=owner)
        shared.append((b0, a0))
    return shared
