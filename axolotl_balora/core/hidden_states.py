"""Final hidden states without logits: when the fused loss is exact, and how to get them.

The model is still called through its (possibly DDP/FSDP-wrapped) forward, so
the engine's hooks run as usual; a forward hook on the decoder records its
output, and `logits_to_keep=1` makes the model's own lm_head see one position
only, so the full [batch, seq, vocab] logits are never built.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from peft import PeftModel
from torch import nn

from .sharded_head import sharding_blocker


# Config attributes by which known models scale around the output layer: Granite
# divides the logits by `logits_scaling`, Cohere multiplies them by `logit_scale`,
# FalconH1 by `lm_head_multiplier`; MiniCPM3 divides the hidden states by its
# `logits_scaling` (hidden_size / dim_model_base) before the head.
LOGIT_SCALE_ATTRIBUTES = ("logits_scaling", "logit_scale", "lm_head_multiplier")
# Gemma 2/3n, VaultGemma call it final_logit_softcapping; RecurrentGemma logits_soft_cap.
SOFTCAP_ATTRIBUTES = ("final_logit_softcapping", "logits_soft_cap")


def fused_path_blocker(model: PeftModel) -> str | None:
    """Known reasons the chunked loss would not equal the model's own logits (None: none known).

    A shortcut only: `head_check.check_fused_head` compares the two on the
    real batch before the first fused step and catches what this list misses.
    """
    base = model.get_base_model()
    lm_head = base.get_output_embeddings()
    if type(lm_head) is not nn.Linear:
        return (
            f"the output layer is {type(lm_head).__name__}, not a frozen nn.Linear "
            "(LoRA on lm_head or lm_head in modules_to_save)"
        )
    if lm_head.bias is not None:
        return "the output layer has a bias"
    if lm_head.weight.requires_grad:
        return "the output layer's weight is trained"
    # A weight sharded by ZeRO-3 or FSDP2 is gathered for the loss (`sharded_head`).
    sharding = sharding_blocker(model)
    if sharding is not None:
        return sharding
    for config in (base.config, base.config.get_text_config()):
        if any(getattr(config, name, None) for name in SOFTCAP_ATTRIBUTES):
            return "the model soft-caps its final logits"
        for name in LOGIT_SCALE_ATTRIBUTES:
            if getattr(config, name, 1) not in (None, 1, 1.0):
                return f"the model scales its logits or final hidden states ({name} = {getattr(config, name)})"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument"
    if base.get_decoder() is None or base.get_decoder() is base:
        return f"{type(base).__name__} exposes no decoder of its own (get_decoder)"
    return None


@contextlib.contextmanager
def recorded_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the first output (the hidden states) of each call of `module`."""
    recorded: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        recorded.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

    handle = module.register_forward_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()


def final_hidden_states(model: nn.Module, peft_model: PeftModel, inputs: dict) -> torch.Tensor:
    """Run `model` (wrapped or not) and return the decoder's last hidden state [batch, seq, hidden]."""
    with recorded_output(peft_model.get_base_model().get_decoder()) as recorded:
        model(**inputs, logits_to_keep=1)
    return recorded[-1]
