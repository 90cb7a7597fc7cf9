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

Fused LoRA kernels that take one (A, B) pair per layer (axolotl's `lora_*_kernel`)
get the same update as one pair of rank 2r, `stacked_update_factors`:

    B A x - B0 A0 x  =  [B | B - B0] @ [A - A0 ; A0] @ x

built by autograd from the trainable factors (gradients reach A and B only) and
exactly zero at the init. It has one input for both halves, so it holds only
without dropout on the trainable half (the plugin refuses the kernels otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from ..parallel.sharding import is_sharded
from .names import FROZEN_ADAPTER, TRAINABLE_ADAPTER

BALORA_ADAPTERS = {TRAINABLE_ADAPTER, FROZEN_ADAPTER}


class BALoRALinear(LoraLinear):
    """PEFT's LoRA Linear whose trainable and frozen adapters run as one update."""

    def runs_both_adapters(self) -> bool:
        """Adapters on, unmerged, exactly the trainable and the frozen pair active, plain LoRA."""
        return (
            not self.disable_adapters
            and not self.merged
            and set(self.active_adapters) == BALORA_ADAPTERS
            and not self.lora_variant
        )

    def _takes_fused_update(self, kwargs: dict[str, Any]) -> bool:
        return (
            self.runs_both_adapters()
            and kwargs.get("adapter_names") is None
            and not is_sharded(self.lora_A[TRAINABLE_ADAPTER].weight)
        )

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, A0, -B0), the frozen pair in the trainable dtype (see
        pissa_init._frozen_follow_trainable_dtype: then A == A0 and B == B0 bit for bit at step 0)."""
        a, b = self.lora_A[TRAINABLE_ADAPTER].weight, self.lora_B[TRAINABLE_ADAPTER].weight
        return a, b, self.lora_A[FROZEN_ADAPTER].weight.to(a.dtype), self.lora_B[FROZEN_ADAPTER].weight.to(b.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._takes_fused_update(kwargs):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        a, b, a0, minus_b0 = self._factors()
        x = self._cast_input_dtype(x, a.dtype)
        frozen_z = x @ a0.T
        trained_z = self.lora_dropout[TRAINABLE_ADAPTER](x) @ a.T
        z = torch.cat([trained_z - frozen_z, frozen_z], dim=-1)
        update_weight = _stacked_b(b, minus_b0)
        scaling = self.scaling[TRAINABLE_ADAPTER]
        if result.dtype == z.dtype:
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), z.reshape(-1, z.shape[-1]),
                               update_weight.T, alpha=scaling)
            return flat.view(result.shape)
        return (result + (z @ update_weight.T) * scaling).to(result.dtype)


def _stacked_b(b: torch.Tensor, minus_b0: torch.Tensor) -> torch.Tensor:
    """[B | B - B0]: the rank-2r up-projection of both forms."""
    return torch.cat([b, b + minus_b0], dim=1)


def stacked_update_factors(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A', B') = ([A - A0 ; A0], [B | B - B0]), one LoRA pair of rank 2r with
    B' A' = B A - B0 A0, for a kernel that takes a single pair without dropout.

    None where the layer does not run both BA-LoRA adapters (disabled, merged, another
    adapter set): the caller's single-adapter view is right there. The trainable factors
    must be whole tensors here (a kernel unshards them itself before asking).
    """
    if not isinstance(layer, BALoRALinear) or not layer.runs_both_adapters():
        return None
    a, b, a0, minus_b0 = layer._factors()
    if is_sharded(a) or is_sharded(b):
        raise RuntimeError(
            "BA-LoRA: a fused LoRA kernel asked for the factors of a layer whose trainable factors "
            "are still sharded (ZeRO-3 partition or FSDP2 DTensor); set the lora_*_kernel keys to false"
        )
    return torch.cat([a - a0, a0], dim=0), _stacked_b(b, minus_b0)


def use_fused_update(layer: torch.nn.Module) -> None:
    """Give a PEFT LoRA Linear the one-update forward (other layer types keep PEFT's)."""
    if type(layer) is LoraLinear:
        layer.__class__ = BALoRALinear
