"""Which of Axolotl's fused LoRA kernel keys (`lora_qkv_kernel`, `lora_o_kernel`,
`lora_mlp_kernel`, `lora_embedding_kernel`) a config with `adapter: balora` ends up with.

`settle_kernel_keys`, run by the args validator, turns them on by default under the conditions
axolotl uses for `adapter: lora`, off where BA-LoRA cannot be exact with them, and raises an
error naming the key when the user asked for them there. The kernels compute BA-LoRA's update
exactly through `patches/kernel_parameters.py`, which hands them the rank-2r stacked pair.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

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
    if _is_4bit_checkpoint(data.get("base_model")) and not _has_cuda():
        return ("the base is 4-bit and this machine has no CUDA device: the kernels dequantize its "
                "NF4 weights with a CUDA-only bitsandbytes call; they stay off here")
    return None


def _is_4bit_checkpoint(base_model: Any) -> bool:
    """A local base whose config carries a 4-bit bitsandbytes `quantization_config` (the
    pre-quantized route, `python -m axolotl_balora.quantize`)."""
    config_file = Path(str(base_model)) / "config.json" if base_model else None
    if config_file is None or not config_file.is_file():
        return False
    try:
        quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return bool(quantization.get("load_in_4bit"))


def _has_cuda() -> bool:
    import torch  # only asked for a 4-bit base: config checks stay free of torch otherwise

    return torch.cuda.is_available()


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

