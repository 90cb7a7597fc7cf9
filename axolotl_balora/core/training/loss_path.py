"""Which loss a model trains with, chosen once: classification, fused (sharded or not) or plain.

Admission to the fused chunked loss is decided in two steps:

* when a model first trains (and again only if the model or its output layer changes),
  `choose_loss_path` collects the reasons known in advance: the config
  (`chunk_size: 0`), a customized task loss, and the model's output layer
  (`fused_path_blocker`: not a frozen bias-free Linear, soft-capped or scaled logits,
  no `logits_to_keep`, a sharded weight no engine module owns);
* on the first batch, the fused path itself (`FusedPath.admit_on_batch` in
  `loss_paths.py`) compares the fused loss with the model's own log-probabilities and
  loss (`head_check.py`), which catches what the list misses. A failure falls back to
  the plain path for the rest of the run.

The chosen object (`loss_paths.py`) computes the loss; the Trainer mixin only asks for it.
"""

from __future__ import annotations

import inspect
import logging

from peft import PeftModel
from torch import nn

from ..adapter.pissa_init import check_frozen_factors_active
from ..config import BALoRAConfig
from ..ops.fused import LmHeadFactor
from ..parallel.output_layer import output_layer_of, sharding_blocker
from ..parallel.sharding import sharding_engine
from .classification import uses_classification_form
from .loss_paths import ClassificationPath, FusedPath, LossPath, PlainPath

LOG = logging.getLogger(__name__)

# Config attributes by which known models scale around the output layer: Granite
# divides the logits by `logits_scaling`, Cohere multiplies them by `logit_scale`,
# FalconH1 by `lm_head_multiplier`; MiniCPM3 divides the hidden states by its
# `logits_scaling` (hidden_size / dim_model_base) before the head.
LOGIT_SCALE_ATTRIBUTES = ("logits_scaling", "logit_scale", "lm_head_multiplier")
# Gemma 2/3n, VaultGemma call it final_logit_softcapping; RecurrentGemma logits_soft_cap.
SOFTCAP_ATTRIBUTES = ("final_logit_softcapping", "logits_soft_cap")


def fused_path_blocker(model: PeftModel) -> str | None:
    """Known reasons the chunked loss would not equal the model's own logits (None: none known).

    A shortcut only: `FusedPath.admit_on_batch` compares the two on the real batch
    before the first fused step and catches what this list misses.
    """
    base = model.get_base_model()
    lm_head = output_layer_of(model)
    if type(lm_head) is not nn.Linear:
        return (
            f"the output layer is {type(lm_head).__name__}, not a frozen nn.Linear "
            "(LoRA on lm_head or lm_head in modules_to_save)"
        )
    if lm_head.bias is not None:
        return "the output layer has a bias"
    if lm_head.weight.requires_grad:
        return "the output layer's weight is trained"
    # A weight sharded by ZeRO-3 or FSDP2 is gathered for the loss (`parallel/output_layer.py`).
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


def output_layer_key(peft_model: nn.Module) -> tuple:
    """What the choice depends on: the model, its output layer, that layer's weight
    (the Parameter object, not its storage, which ZeRO-3 and FSDP2 swap) and its dtype."""
    head = output_layer_of(peft_model)
    weight = getattr(head, "weight", None)
    return id(peft_model), id(head), None if weight is None else (id(weight), weight.dtype)


def choose_loss_path(peft_model: PeftModel, config: BALoRAConfig, customized_task_loss: bool) -> LossPath:
    """The path for this model: the classification form, else fused unless a reason known
    in advance says the fused loss would not be the model's own."""
    key = output_layer_key(peft_model)
    check_frozen_factors_active(peft_model)
    if uses_classification_form(peft_model, config.task):
        LOG.info("BA-LoRA: classification form (per-example logits, pooled features)")
        return ClassificationPath(key)
    head_weight = getattr(output_layer_of(peft_model), "weight", None)
    sharding = None if head_weight is None else sharding_engine(head_weight)
    if config.chunk_size == 0:
        reason = "balora_chunk_size is 0"
    elif customized_task_loss:
        reason = "the task loss is customized (label smoothing or compute_loss_func)"
    else:
        reason = fused_path_blocker(peft_model)
    if reason is not None:
        return PlainPath.because(key, reason)
    if sharding is not None:
        LOG.info("BA-LoRA: the output layer's weight is sharded (%s); the fused loss gathers it "
                 "for each micro-batch", sharding)
        return FusedPath(key, config.chunk_size, head_r=LmHeadFactor(fixed=True))
    return FusedPath(key, config.chunk_size)
