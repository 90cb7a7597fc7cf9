"""The `balora_*` YAML keys: pydantic fields merged into Axolotl's config schema.

Validation runs on the raw YAML (mode="before"), so the messages name the
key exactly as the user wrote it. The value checks themselves live in the
core (`BALoRAConfig`), shared with plain-transformers users.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, get_type_hints

from pydantic import Field, create_model, model_validator

from .core.config import BALoRAConfig
from .kernels import settle_kernel_keys

ADAPTER_NAME = "balora"
_DEFAULTS = BALoRAConfig()
BALORA_KEYS = tuple(f"balora_{field.name}" for field in fields(BALoRAConfig))

# Options whose Axolotl code paths only handle adapter "lora"/"qlora" and would
# silently do something else for a balora run; refused until supported.
UNSUPPORTED_WITH_BALORA = {
    "load_in_4bit": "Axolotl builds its 4-bit BitsAndBytesConfig only for adapter: qlora, so the "
    "base would load in full precision; for QLoRA with BA-LoRA run "
    "`python -m axolotl_balora.quantize BASE_MODEL OUT_DIR` once and set base_model: OUT_DIR",
    "load_in_8bit": "8-bit loading is only wired for adapter: lora in Axolotl; "
    "BA-LoRA on a quantized base is not supported yet",
    "gptq": "BA-LoRA needs a dense base weight for its PiSSA init",
    "peft_use_dora": "BA-LoRA is a LoRA method, not DoRA",
    "flash_attn_fuse_mlp": "fused MLP modules are not LoRA targets",
    "use_onebitllms": "one-bit LLM layers are not LoRA targets",
    "relora": "ReLoRA restarts would drop the frozen initial factors",
    "liger_fused_linear_cross_entropy": "it replaces the logits BA-LoRA's regularizers read; "
    "BA-LoRA's own fused loss already avoids materializing them (balora_chunk_size)",
    "cut_cross_entropy": "it replaces the logits BA-LoRA's regularizers read; "
    "BA-LoRA's own fused loss already avoids materializing them (balora_chunk_size)",
    "reward_model": "Axolotl trains it with TRL's RewardTrainer on preference pairs, which "
    "the BA-LoRA trainer would replace; for sequence classification use the core with a "
    "plain transformers Trainer (examples/classification_trainer.py)",
    "process_reward_model": "Axolotl trains it with its PRM trainer on token labels, which "
    "the BA-LoRA trainer would replace",
    "use_dft": "DFT replaces the task loss with a probability-weighted one (a compute_loss_func) "
    "that BA-LoRA's fused loss does not compute",
    "dpo_use_liger_kernel": "TRL's chunked DPO loss never builds the logits BA-LoRA's terms read",
    "rl_adapter_ref_model": "with BA-LoRA the model with its adapters disabled is already exactly the "
    "pre-trained model, which DPO, IPO and KTO take as their reference; a second copy only costs memory",
}

# `rl:` values BA-LoRA trains with (Axolotl's own trainer for each, with the terms added), and
# why the others are refused.
PREFERENCE_RL = ("dpo", "ipo", "kto", "orpo", "simpo")
REFUSED_RL = {
    "grpo": "GRPO scores completions it generates with reward functions; BA-LoRA's terms are not "
            "wired into its rollouts",
    "gdpo": "GDPO is GRPO with several rewards; BA-LoRA's terms are not wired into its rollouts",
    "ebft": "EBFT's trainer is not one of the TRL preference trainers BA-LoRA's terms are wired into",
}


# Each rank of a context-parallel group holds a slice of every sequence, so the
# terms would be computed per slice (the SVD term over the wrong rows). The deprecated
# alias comes first: axolotl 0.21 copies it into `context_parallel_size` (and its nested
# `context_parallel: {size: N}`) before this check runs, and the message names the key
# the user wrote.
SEQUENCE_SPLITTING_KEYS = ("sequence_parallel_degree", "context_parallel_size", "context_parallel.size")


def config_from_mapping(values: dict[str, Any]) -> BALoRAConfig:
    """BALoRAConfig from `balora_*` keys (missing or None keys take the spec default)."""
    kwargs = {
        field.name: values[f"balora_{field.name}"]
        for field in fields(BALoRAConfig)
        if values.get(f"balora_{field.name}") is not None
    }
    return BALoRAConfig(**kwargs)


def _check_keys(data: dict[str, Any]) -> None:
    present = [key for key in data if isinstance(key, str) and key.startswith("balora_")]
    for key in present:
        if key not in BALORA_KEYS:
            close = difflib.get_close_matches(key, BALORA_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{key}: unknown BA-LoRA key.{hint} Known keys: {', '.join(BALORA_KEYS)}"
            )
    set_keys = [key for key in present if data[key] is not None]
    if set_keys and data.get("adapter") != ADAPTER_NAME:
        raise ValueError(
            f"{', '.join(set_keys)} set while adapter is {data.get('adapter')!r}; "
            f"set `adapter: {ADAPTER_NAME}` to train BA-LoRA, or remove the balora_* keys"
        )


def _check_compatibility(data: dict[str, Any]) -> None:
    for key, reason in UNSUPPORTED_WITH_BALORA.items():
        if data.get(key):
            raise ValueError(
                f"{key}: {data[key]!r} is not supported with adapter: {ADAPTER_NAME} ({reason}); "
                f"remove {key} or set it to false"
            )


def _check_resolved_defaults(config: Any) -> None:
    """The same refusals on the resolved config: another plugin's schema may default one of those
    keys on (the Cut Cross Entropy plugin's `cut_cross_entropy: true`) after the raw YAML was checked."""
    for key, reason in UNSUPPORTED_WITH_BALORA.items():
        if getattr(config, key, None):
            raise ValueError(
                f"{key}: {getattr(config, key)!r} is not supported with adapter: {ADAPTER_NAME} ({reason}); "
                f"the YAML does not set it, so it is a default of a listed plugin's schema: write "
                f"{key}: false, or remove that plugin from plugins:"
            )


def _check_rl(data: dict[str, Any]) -> None:
    rl = data.get("rl")
    if rl in (None, False) or str(getattr(rl, "value", rl)) in PREFERENCE_RL:
        return
    rl = str(getattr(rl, "value", rl))
    reason = REFUSED_RL.get(rl, "this trainer is not one BA-LoRA's terms are wired into")
    raise ValueError(
        f"rl: {rl} is not supported with adapter: {ADAPTER_NAME} ({reason}); BA-LoRA trains with "
        f"rl: {', '.join(PREFERENCE_RL)} or without rl:, or use adapter: lora for rl: {rl}"
    )


def _check_sequence_splitting(data: dict[str, Any]) -> None:
    for key in SEQUENCE_SPLITTING_KEYS:
        section, _, field = key.partition(".")
        degree = data.get(section)
        if field:  # axolotl 0.21's nested form
            degree = degree.get(field) if isinstance(degree, dict) else getattr(degree, field, None)
        if isinstance(degree, int) and degree > 1:
            raise ValueError(
                f"{key}: {degree} is not supported with adapter: {ADAPTER_NAME} (each rank would "
                f"see a slice of every sequence and BA-LoRA's terms would be computed per slice); "
                f"set {key}: 1 or remove it"
            )


# With this off, the HF Trainer saves ZeRO-3 models with an empty state dict (the
# weights only in DeepSpeed's own shards), so an adapter save would be empty.
ZERO3_GATHER_KEYS = ("stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save")


def _deepspeed_config(value: Any) -> dict[str, Any] | None:
    """The `deepspeed:` value as a dict: inline, or read from its JSON file (None if unreadable)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (str, Path)) and Path(value).is_file():
        try:
            loaded = json.loads(Path(value).read_text())
        except (OSError, ValueError):
            return None  # DeepSpeed itself reports a malformed file
        return loaded if isinstance(loaded, dict) else None
    return None


def _zero_section(data: dict[str, Any]) -> dict[str, Any]:
    """The `zero_optimization` section of the `deepspeed:` value ({} without one)."""
    return (_deepspeed_config(data.get("deepspeed")) or {}).get("zero_optimization") or {}


def _check_zero3_save(data: dict[str, Any]) -> None:
    zero = _zero_section(data)
    if zero.get("stage") != 3 or any(zero.get(key) is True for key in ZERO3_GATHER_KEYS):
        return
    source = data["deepspeed"] if isinstance(data["deepspeed"], str) else "the inline config"
    raise ValueError(
        f"deepspeed: {source} is ZeRO-3 with {ZERO3_GATHER_KEYS[0]} {zero.get(ZERO3_GATHER_KEYS[0])!r}; without it the "
        f"Trainer hands the save an empty state dict and the BA-LoRA adapter (checkpoints and "
        f'output_dir) would be empty. Set "{ZERO3_GATHER_KEYS[0]}": true in its zero_optimization '
        f"section (cheap here: for a PEFT model the Trainer gathers only the adapter tensors)"
    )


def _check_fsdp_loading(data: dict[str, Any]) -> None:
    """Rank-0-only loading is handled (and tested) for FSDP2; FSDP1 would load it another way."""
    fsdp = data.get("fsdp_config") or {}
    if not isinstance(fsdp, dict) or str(data.get("fsdp_version") or fsdp.get("fsdp_version") or "") == "2":
        return
    for key in ("cpu_ram_efficient_loading", "fsdp_cpu_ram_efficient_loading"):
        if fsdp.get(key):
            raise ValueError(
                f"fsdp_config.{key}: true with adapter: {ADAPTER_NAME} is supported with fsdp_version: 2 "
                f"only (FSDP1's rank-0 loading was never run with BA-LoRA's frozen factors); set "
                f"fsdp_version: 2, or fsdp_config.{key}: false"
            )


# One optional YAML key per BALoRAConfig field, typed and described as the field (a new option is
# written once, in the core). Unset keys stay None on non-BA-LoRA configs, so a dumped config can be
# validated again; on `adapter: balora` they are filled with the spec's defaults.
_HINTS = get_type_hints(BALoRAConfig)
_BALoRAKeys = create_model(
    "_BALoRAKeys",
    **{
        f"balora_{field.name}": (Optional[_HINTS[field.name]], Field(None, description=field.metadata["description"]))
        for field in fields(BALoRAConfig)
    },
)


class BALoRAArgs(_BALoRAKeys):
    """BA-LoRA options (each key's meaning: its field's description); the checks that need
    the rest of the Axolotl config (adapter, engines, kernels) run here, the value checks in
    the core's `BALoRAConfig`."""

    @model_validator(mode="before")
    @classmethod
    def _validate_balora(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        _check_keys(data)
        if data.get("adapter") == ADAPTER_NAME:
            config_from_mapping(data)
            _check_compatibility(data)
            _check_rl(data)
            _check_sequence_splitting(data)
            _check_zero3_save(data)
            _check_fsdp_loading(data)
            settle_kernel_keys(data, _zero_section(data).get("stage"))
        return data

    @model_validator(mode="after")
    def _check_resolved_and_fill_defaults(self) -> "BALoRAArgs":
        if getattr(self, "adapter", None) == ADAPTER_NAME:
            _check_resolved_defaults(self)
            for field in fields(BALoRAConfig):
                key = f"balora_{field.name}"
                if getattr(self, key) is None:
                    setattr(self, key, getattr(_DEFAULTS, field.name))
        return self
