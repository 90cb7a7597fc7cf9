"""Axolotl's fused LoRA kernels (`lora_qkv_kernel`, `lora_o_kernel`, `lora_mlp_kernel`,
`lora_embedding_kernel`) for `adapter: balora`.

The kernels take one LoRA pair per projection from `axolotl.kernels.lora.get_lora_parameters`.
For a BA-LoRA layer the pair handed over is the rank-2r stacked one
(`core.adapter.layer.stacked_update_factors`), so the kernels compute W x + s (B A - B0 A0) x
exactly, zero at the init. Three things live here:

* which keys a config ends up with (`settle_kernel_keys`, run by the args validator): on by
  default under the conditions axolotl uses for `adapter: lora`, off where BA-LoRA cannot be
  exact with them, and an error naming the key when the user asked for them there;
* the one wrapper that hands the kernels the stacked pair (`install_kernel_support`);
* the log lines that say which projections the kernels really computed.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn

from .core.adapter.layer import BALoRALinear, stacked_update_factors
from .core.adapter.pissa_init import lora_layers

LOG = logging.getLogger(__name__)

KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# The MLP kernel's activation is a Triton kernel that allocates on a literal "cuda" device; it is
# auto-enabled only where axolotl found a GPU (`capabilities.compute_capability`).
GPU_ONLY_KERNELS = ("lora_mlp_kernel",)


def kernel_blocker(data: dict[str, Any], zero_stage: int | None) -> str | None:
    """Why BA-LoRA cannot be exact with the fused kernels in this config, or None."""
    if (data.get("lora_dropout") or 0) > 0:
        return ("the kernels apply one dropout mask to the whole rank-2r update, so the frozen "
                "-B0 A0 x half would be dropped out too (BA-LoRA drops out the trainable half only); "
                "set lora_dropout: 0.0 to use them")
    if zero_stage == 3:
        return ("under DeepSpeed ZeRO-3 the kernels read the partitioned base weights without "
                "gathering them; use ZeRO-2 or FSDP2 to use them")
    return None


def _axolotl_would_enable(data: dict[str, Any]) -> dict[str, bool]:
    """The kernel keys axolotl's own auto-enable sets for this config with `adapter: lora`."""
    from axolotl.utils.schemas.config import AxolotlConfigWCapabilities

    probe = {**data, "adapter": "lora"}
    AxolotlConfigWCapabilities.check_auto_enable_lora_kernels(probe)
    return {key: bool(probe.get(key)) for key in KERNEL_KEYS}


def settle_kernel_keys(data: dict[str, Any], zero_stage: int | None) -> None:
    """Refuse kernels BA-LoRA cannot be exact with; turn them on where axolotl would for LoRA.

    Axolotl auto-enables only while validating with the machine's capabilities (what
    `axolotl train` does), never for keys the user set; so does this.
    """
    blocker = kernel_blocker(data, zero_stage)
    asked = [key for key in KERNEL_KEYS if data.get(key)]
    if asked and blocker:
        raise ValueError(f"{asked[0]}: true is not supported with adapter: balora here: {blocker}; "
                         f"or remove {asked[0]} / set it to false")
    if blocker or data.get("capabilities") is None or any(data.get(key) is not None for key in KERNEL_KEYS):
        return
    enabled = _axolotl_would_enable(data)
    if not (data.get("capabilities") or {}).get("compute_capability"):
        enabled.update({key: False for key in GPU_ONLY_KERNELS})
    data.update(enabled)
    if any(enabled.values()):
        LOG.info("BA-LoRA: fused LoRA kernels on, as axolotl sets them for adapter: lora: %s",
                 ", ".join(key for key, on in enabled.items() if on))


# -- at run time --------------------------------------------------------------------------------

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

    get_lora_parameters.balora_wrapped = True
    return get_lora_parameters


def _note_served(proj: nn.Module) -> None:
    kind = getattr(proj, KIND_ATTRIBUTE, type(proj).__name__)
    if kind not in _served:
        _served.add(kind)
        LOG.info("BA-LoRA: a fused LoRA kernel computed %s (the rank-2r update [B | B-B0] [A-A0 ; A0])", kind)


def install_kernel_support() -> None:
    """Route axolotl's kernels' parameter lookup through BA-LoRA (idempotent).

    The kernel entry points (`apply_lora_qkv`, `apply_lora_o`, `apply_lora_mlp_*`, ...) read
    `get_lora_parameters` from their module's globals at call time, so replacing the module
    attribute reaches every one of them; other models get axolotl's own answer.
    """
    from axolotl.kernels import lora as kernels

    if not getattr(kernels.get_lora_parameters, "balora_wrapped", False):
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
