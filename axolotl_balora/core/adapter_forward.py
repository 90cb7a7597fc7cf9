"""One rank-2r update for the trainable and the frozen factors of a layer.

PEFT's forward with two active adapters computes, per adapter,
`result = result + lora_B(lora_A(dropout(x))) * scaling`: four small matmuls and
six `[tokens, out]` temporaries per layer, where plain LoRA has two and three. On
SmolLM2 that made the frozen factors alone cost about a third of a LoRA step and
hundreds of MB of heap. This forward computes the same update as one GEMM added
into the base output (`addmm`), rewritten so that it is exactly zero at the init:

    B (A x') - B0 (A0 x)  =  [B | B - B0] @ [A x' - A0 x ; A0 x]

(x' = dropout(x)). At step 0, B = B0 and A = A0 bit for bit, so both halves of
the product are exact zeros and the model is the pre-trained one exactly, under
any cast of the trainable factors. Anything unusual (adapters disabled or merged,
mixed-adapter batches, another set of active adapters, ZeRO-3 or FSDP2 sharded
parameters, whose gather runs only in the submodules' own forwards) goes to
PEFT's forward unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor
from peft.tuners.lora.layer import Linear as LoraLinear

from .adapters import FROZEN_ADAPTER, TRAINABLE_ADAPTER

BALORA_ADAPTERS = {TRAINABLE_ADAPTER, FROZEN_ADAPTER}


def _partitioned(weight: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter or an FSDP2 DTensor shard: gathered only by hooks
    on the adapter's own submodules, so only their own forwards may read it."""
    return hasattr(weight, "ds_id") or isinstance(weight, DTensor)


class BALoRALinear(LoraLinear):
    """PEFT's LoRA Linear whose trainable and frozen adapters run as one update."""

    def _takes_fused_update(self, kwargs: dict[str, Any]) -> bool:
        return (
            not self.disable_adapters
            and not self.merged
            and kwargs.get("adapter_names") is None
            and set(self.active_adapters) == BALORA_ADAPTERS
            and not self.lora_variant
            and not _partitioned(self.lora_A[TRAINABLE_ADAPTER].weight)
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._takes_fused_update(kwargs):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        a, b = self.lora_A[TRAINABLE_ADAPTER].weight, self.lora_B[TRAINABLE_ADAPTER].weight
        # The frozen pair follows the trainable dtype (see init._frozen_follow_trainable_dtype).
        a0 = self.lora_A[FROZEN_ADAPTER].weight.to(a.dtype)
        minus_b0 = self.lora_B[FROZEN_ADAPTER].weight.to(b.dtype)
        x = self._cast_input_dtype(x, a.dtype)
        frozen_z = x @ a0.T
        trained_z = self.lora_dropout[TRAINABLE_ADAPTER](x) @ a.T
        z = torch.cat([trained_z - frozen_z, frozen_z], dim=-1)
        update_weight = torch.cat([b, b + minus_b0], dim=1)
        scaling = self.scaling[TRAINABLE_ADAPTER]
        if result.dtype == z.dtype:
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), z.reshape(-1, z.shape[-1]),
                               update_weight.T, alpha=scaling)
            return flat.view(result.shape)
        return (result + (z @ update_weight.T) * scaling).to(result.dtype)


def use_fused_update(layer: torch.nn.Module) -> None:
    """Give a PEFT LoRA Linear the one-update forward (other layer types keep PEFT's)."""
    if type(layer) is LoraLinear:
        layer.__class__ = BALoRALinear
