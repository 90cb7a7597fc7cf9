"""Save a BA-LoRA model as an ordinary PEFT LoRA adapter for the ORIGINAL base model.

The learned delta s * (B A - B0 A0) equals s * [B, -B0] [A; A0], a rank-2r
LoRA with the same scaling, written with one rank and one alpha for every module
(no per-module patterns) so that every serving stack reads it as PEFT does. Every
save writes that adapter at the top of the directory (what PEFT, vLLM and
`axolotl merge-lora` load), logs the vLLM flags it needs, and both raw PEFT
adapters under TRAINING_STATE_DIR (what resuming needs). Files are written
to a temporary folder first and moved into place, so an interrupted save
never leaves a half-written adapter where a good one was.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from .names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FROZEN_ADAPTER,
    TRAINABLE_ADAPTER,
    TRAINING_STATE_DIR,
)
from ..parallel.ranks import distributed_running, is_main_rank
from ..parallel.sharding import full_tensor
from .checkpoint import write_metadata
from .serving import log_vllm_needs


def _scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def trained_module_scalings(model: PeftModel) -> dict[str, tuple[int, float]]:
    """{module name in the base model: (rank, scaling)} of the trainable adapter, as trained.

    Read from the LoRA layers themselves, so whatever PEFT resolved from the
    rank/alpha patterns (first matching key, regex keys, rsLoRA) is what is exported.
    """
    return {
        name: (module.r[TRAINABLE_ADAPTER], module.scaling[TRAINABLE_ADAPTER])
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, LoraLayer) and TRAINABLE_ADAPTER in module.r
    }


def _module_of(key: str) -> str:
    """The base-model module name of an adapter state-dict key (`base_model.model.<name>.lora_A.weight`)."""
    return key.removeprefix("base_model.model.").split(".lora_", 1)[0]


def _padded(factor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """`factor` with zero rows (dim 0, an A) or columns (dim 1, a B) up to `rank`: adds exactly nothing."""
    missing = rank - factor.shape[dim]
    if missing == 0:
        return factor
    shape = list(factor.shape)
    shape[dim] = missing
    return torch.cat([factor, factor.new_zeros(shape)], dim=dim)


def _folded(b: torch.Tensor, factor: float) -> torch.Tensor:
    """B times a module's own scaling over the export's, computed in float32 (1.0: untouched)."""
    return b if factor == 1.0 else (b.float() * factor).to(b.dtype)


def uniform_rank_export(
    config: LoraConfig,
    scalings: dict[str, tuple[int, float]],
    trained: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """One rank and one alpha for every module: the rank-2r pairs [A; A0], [B, -B0] of each module,
    zero-padded to the largest rank and with each module's own scaling folded into its B.

    Serving stacks read an adapter their own way: older vLLM, SGLang and TGI ignore
    `rank_pattern` / `alpha_pattern`, and rsLoRA needs its own flag. Here the config has no
    pattern and no rsLoRA, so every loader computes (alpha / r) B A per module, which is what
    PEFT computed in training: exact for padding, within float32 rounding of the weight's
    dtype for a folded scaling (1.0, the usual case of one rank and one alpha, leaves B as is).
    """
    rank = 2 * max(module_rank for module_rank, _ in scalings.values())
    scaling = _scaling(config.lora_alpha, config.r, config.use_rslora)  # the unpatterned modules'
    weights = {}
    for key, value in trained.items():
        if key in frozen and ".lora_A." in key:
            weights[key] = _padded(torch.cat([value, frozen[key].to(value.dtype)], dim=0), rank, 0)
        elif key in frozen and ".lora_B." in key:
            stacked = torch.cat([value, frozen[key].to(value.dtype)], dim=1)
            weights[key] = _padded(_folded(stacked, scalings[_module_of(key)][1] / scaling), rank, 1)
        else:
            weights[key] = value
    uniform = replace(config, r=rank, lora_alpha=rank * scaling, rank_pattern={}, alpha_pattern={},
                      use_rslora=False, init_lora_weights=True)
    return uniform, weights


def standard_lora_export(
    model: PeftModel, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, weights) of the standard LoRA adapter equivalent to the BA-LoRA model.

    `state_dict` is the full model state dict when the caller gathered it
    (sharded training); otherwise the model's own is used.
    """
    config = model.peft_config[TRAINABLE_ADAPTER]
    trained = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=TRAINABLE_ADAPTER)
    if FROZEN_ADAPTER not in model.peft_config:
        return replace(config, init_lora_weights=True), trained
    frozen = get_peft_model_state_dict(
        model, state_dict=state_dict, adapter_name=FROZEN_ADAPTER, save_embedding_layers=False
    )
    return uniform_rank_export(config, trained_module_scalings(model), trained, frozen)


def _replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing it; the old copy is removed only after the move."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(source, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)


def save_balora_adapter(
    model: PeftModel,
    save_directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    **peft_kwargs: Any,
) -> None:
    """Write the standard adapter at `save_directory` and the training state beneath it."""
    if not is_main_process:
        return
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".balora-save-") as staging:
        staging_path = Path(staging)
        state_path = staging_path / TRAINING_STATE_DIR
        type(model).save_pretrained(model, state_path, state_dict=state_dict, **peft_kwargs)
        write_metadata(model, state_path)
        config, weights = standard_lora_export(model, state_dict)
        log_vllm_needs(config)
        export_path = staging_path / "export"
        export_path.mkdir()
        config.save_pretrained(export_path)
        safetensors.torch.save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()},
            export_path / ADAPTER_WEIGHTS,
            metadata={"format": "pt"},
        )
        _replace_dir(state_path, directory / TRAINING_STATE_DIR)
        # Each file is replaced whole (rename); neither is ever half-written.
        os.replace(export_path / ADAPTER_WEIGHTS, directory / ADAPTER_WEIGHTS)
        os.replace(export_path / ADAPTER_CONFIG, directory / ADAPTER_CONFIG)


def save_sharded_balora_adapter(model: PeftModel, save_directory: str | os.PathLike) -> None:
    """Save a model whose parameters are FSDP2 DTensor shards; every rank must call this.

    Each adapter tensor (trainable, frozen, modules_to_save) is gathered to a full
    tensor in the same order on every rank (the adapter is small, the base is never
    gathered), rank 0 writes the usual export, and every rank waits for it.
    """
    state_dict = {
        name: full_tensor(tensor).detach()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if "lora_" in name or tensor.requires_grad
    }
    save_balora_adapter(model, save_directory, state_dict=state_dict, is_main_process=is_main_rank())
    if distributed_running():
        torch.distributed.barrier()


def is_balora_model(model: Any) -> bool:
    return hasattr(model, "balora_init_method")


def install_standard_save(model: PeftModel) -> None:
    """Make `model.save_pretrained` (used by Trainer, Axolotl, signal handlers) write the export."""

    def save_pretrained(self: PeftModel, save_directory: str, **kwargs: Any) -> None:
        save_balora_adapter(self, save_directory, **kwargs)

    model.save_pretrained = types.MethodType(save_pretrained, model)
