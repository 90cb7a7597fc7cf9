"""Patch of axolotl's FSDP2 final adapter save
(`axolotl.integrations.expert_parallel.shard.save_fsdp2_lora_adapter`, axolotl 0.19-0.21):
save a BA-LoRA model through the BA-LoRA export.

For `fsdp_version: 2` axolotl's train.py saves the final adapter with `save_fsdp2_lora_adapter`,
which keeps only the trainable adapter (rank r, without the -B0 A0 term): the shipped adapter
would be wrong. train.py imports that function from its module at call time, so replacing the
module attribute reaches it; other models still go to axolotl's own function.
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from ..core.adapter.export import is_balora_model, save_sharded_balora_adapter
from . import Target

LOG = logging.getLogger(__name__)

TARGETS = (
    Target("axolotl.integrations.expert_parallel.shard", "save_fsdp2_lora_adapter", ("model", "output_dir")),
)


def _balora_adapter_save(original: Callable[[nn.Module, str], bool]) -> Callable[[nn.Module, str], bool]:
    """`save_fsdp2_lora_adapter` that writes a BA-LoRA model as the standard rank-2r export."""

    def save_fsdp2_lora_adapter(model: nn.Module, output_dir: str) -> bool:
        if not is_balora_model(model):
            return original(model, output_dir)
        LOG.info("BA-LoRA: saving the FSDP2 final adapter as the standard rank-2r export")
        save_sharded_balora_adapter(model, output_dir)
        return True

    save_fsdp2_lora_adapter.balora_original = original
    return save_fsdp2_lora_adapter


def install() -> None:
    """Route axolotl's FSDP2 final adapter save through the BA-LoRA export (idempotent)."""
    try:
        from axolotl.integrations.expert_parallel import shard
    except ImportError:
        return
    original = getattr(shard, "save_fsdp2_lora_adapter", None)
    if original is None or hasattr(original, "balora_original"):
        return
    shard.save_fsdp2_lora_adapter = _balora_adapter_save(original)
