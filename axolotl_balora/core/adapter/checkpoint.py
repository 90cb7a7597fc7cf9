"""Restore a BA-LoRA model from the training state a save wrote (for resume_from_checkpoint).

The top level of a checkpoint holds the exported rank-2r LoRA, which cannot be
loaded back into the rank-r trainable adapter; the raw adapters under
TRAINING_STATE_DIR can. A checkpoint from a different adapter layout or init
is refused before any weight is touched.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict

from ..parallel.sharding import is_dtensor
from .names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FROZEN_ADAPTER, TRAINABLE_ADAPTER

METADATA_FILE = "balora.json"
_LAYOUT_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def init_method(model: PeftModel) -> str:
    return getattr(model, "balora_init_method", "unknown")


def write_metadata(model: PeftModel, state_dir: Path) -> None:
    """Record what produced the frozen factors, so a resume can check it matches."""
    (state_dir / METADATA_FILE).write_text(json.dumps({"init": init_method(model)}) + "\n")


def _normalized(value: object) -> object:
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def check_compatible(model: PeftModel, state_dir: Path) -> None:
    """Raise ValueError naming every difference between the model and the saved state."""
    saved_config = json.loads((state_dir / ADAPTER_CONFIG).read_text())
    saved_meta = json.loads((state_dir / METADATA_FILE).read_text())
    current = model.peft_config[TRAINABLE_ADAPTER]
    problems = [
        f"{key}: checkpoint {saved_config.get(key)!r}, config {getattr(current, key)!r}"
        for key in _LAYOUT_KEYS
        if _normalized(saved_config.get(key) or None) != _normalized(getattr(current, key) or None)
    ]
    if _normalized(saved_config.get("target_modules")) != _normalized(current.target_modules):
        problems.append(
            f"target_modules: checkpoint {saved_config.get('target_modules')!r}, "
            f"config {current.target_modules!r}"
        )
    if saved_meta.get("init") != init_method(model):
        problems.append(f"balora_init: checkpoint {saved_meta.get('init')!r}, config {init_method(model)!r}")
    if problems:
        raise ValueError(
            f"BA-LoRA: cannot resume from {state_dir.parent}: it was trained with a different "
            f"adapter ({'; '.join(problems)}). Resume with the config that wrote it, or start "
            "a new run in another output_dir."
        )


@contextlib.contextmanager
def _full_tensors_load_into_shards(model: PeftModel) -> Iterator[None]:
    """Let `load_state_dict` copy full (saved) tensors into FSDP2 DTensor parameters.

    The Trainer resumes an FSDP run after wrapping the model, when each adapter
    parameter is a DTensor shard; copying a plain tensor into one fails. A pre-hook
    on the root turns each full tensor into a DTensor of its target's layout, sliced
    locally (every rank read the same file, so nothing needs to be sent).
    """
    targets = {name: tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()]
               if is_dtensor(tensor)}
    if not targets:
        yield
        return
    from torch.distributed.tensor import distribute_tensor

    def to_shards(module, state_dict, prefix, *args) -> None:
        for key, value in state_dict.items():
            target = targets.get(key)
            if target is not None and not is_dtensor(value):
                state_dict[key] = distribute_tensor(
                    value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
                )

    handle = model.register_load_state_dict_pre_hook(to_shards)
    try:
        yield
    finally:
        handle.remove()


def load_training_state(model: PeftModel, state_dir: Path) -> None:
    """Load the trainable and frozen factors saved under `state_dir` into `model`."""
    check_compatible(model, state_dir)
    folders = {TRAINABLE_ADAPTER: state_dir}
    if FROZEN_ADAPTER in model.peft_config:
        folders[FROZEN_ADAPTER] = state_dir / FROZEN_ADAPTER
    for adapter, folder in folders.items():
        weights = safetensors.torch.load_file(folder / ADAPTER_WEIGHTS)
        with _full_tensors_load_into_shards(model):
            result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(
                f"BA-LoRA: unexpected weights in {folder}: {result.unexpected_keys[:5]}"
            )
