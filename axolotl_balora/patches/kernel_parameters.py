"""Patch of the fused LoRA kernels' parameter lookup (`axolotl.kernels.lora.get_lora_parameters`,
axolotl 0.19-0.21): hand a BA-LoRA layer's kernel the rank-2r stacked pair.

The kernels (`lora_qkv_kernel`, `lora_o_kernel`, `lora_mlp_kernel`, `lora_embedding_kernel`) take
one LoRA pair per projection from `get_lora_parameters`. Axolotl's own answer is the first active
adapter's pair: for a BA-LoRA layer the trainable one alone, W x + s B A x without the frozen
-B0 A0 term. The stacked pair (`core.adapter.layer.stacked_update_factors`) makes the kernels
compute W x + s (B A - B0 A0) x exactly, zero at the init. The kernel entry points
(`apply_lora_qkv`, `apply_lora_o`, `apply_lora_mlp_*`, ...) read `get_lora_parameters` from their
module's globals at call time, so replacing the module attribute reaches every one of them; other
models get axolotl's own answer. Also here: the log lines that say which projections the kernels
really computed.
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from ..core.adapter.layer import BALoRALinear, stacked_update_factors
from ..core.adapter.pissa_init import lora_layers
from . import Target

LOG = logging.getLogger(__name__)

TARGETS = (Target("axolotl.kernels.lora", "get_lora_parameters", ("proj",)),)
# The projection kinds ("q_proj", ...) a kernel has computed in this process: each is logged once.
_served: set[str] = set()
# Set on each BA-LoRA projection by `report_patched_layers`: its kind, for that log line.
KIND_ATTRIBUTE = "balora_projection_kind"


def _balora_lora_parameters(original: Callable[[nn.Module], tuple]) -> Callable[[nn.Module], tuple]:
    """`get_lora_parameters` that hands a BA-LoRA layer's kernel the stacked rank-2r pair."""

    def get_lora_parameters(proj: nn.Module) -> tuple:
        parameters = original(proj)  # unshards the trainable pair where FSDP2 keeps it apart
        if not isinstance(proj, BALoRALinear) or parameters[3] is None:
            return parameters
        stacked = stacked_update_factors(proj)
        if stacked is None:
            return parameters
        weight, bias, quant_state, _, _, scaling, lora_bias, _, magnitude = parameters
        _note_served(proj)
        return weight, bias, quant_state, *stacked, scaling, lora_bias, None, magnitude

    get_lora_parameters.balora_original = original
    return get_lora_parameters


def _note_served(proj: nn.Module) -> None:
    kind = getattr(proj, KIND_ATTRIBUTE, type(proj).__name__)
    if kind not in _served:
        _served.add(kind)
        LOG.info("BA-LoRA: a fused LoRA kernel computed %s (the rank-2r update [B | B-B0] [A-A0 ; A0])", kind)


def install() -> None:
    """Route the kernels' parameter lookup through BA-LoRA (idempotent); before axolotl patches
    its kernels into the model."""
    from axolotl.kernels import lora as kernels

    if not hasattr(kernels.get_lora_parameters, "balora_original"):
        kernels.get_lora_parameters = _balora_lora_parameters(kernels.get_lora_parameters)


def report_patched_layers(model: nn.Module) -> int:
    """Log how many BA-LoRA projections sit under a patched kernel forward; remember their names."""
    for name, layer in lora_layers(model):
        setattr(layer, KIND_ATTRIBUTE, name.rsplit(".", 1)[-1])
    patched = [name for name, module in model.named_modules()
               if any(getattr(getattr(module, attribute, None), "__name__", "").startswith("apply_lora_")
                      for attribute in ("apply_qkv", "apply_o", "forward"))]
    LOG.info("BA-LoRA: axolotl's fused LoRA kernels patched %d modules (e.g. %s)", len(patched),
             ", ".join(patched[:3]) or "none")
    return len(patched)
