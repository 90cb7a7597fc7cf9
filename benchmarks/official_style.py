"""OFFICIAL-STYLE BA-LoRA loss: a cost model for the overhead benchmark, not part of the package.

This is NOT the authors' code and NOT how this project computes BA-LoRA. It is a
re-implementation, written from the description in the project's spec (section 4:
"the official code loads a second full copy of the model as the reference and
materializes full-vocabulary softmaxes for both models"), of how that code spends
time and memory, so that `overhead.py` can compare against it:

* a separate, frozen, full copy of the pre-trained model produces the reference logits;
* the trained model keeps its full logits [batch, seq, vocab], and every term is
  computed from full-vocabulary softmax / log-softmax tensors of both models, in the
  model's dtype (the official trainer does not upcast);
* the SVD term takes the singular values of the full |M| x vocab logit matrix;
* the adapter is PEFT's own PiSSA (W overwritten by its residual), which is why a
  separate reference model is needed at all.

The values follow the spec's definitions (shifted positions, signs), so the loss is
comparable with the other rows; the official code's bugs do not change its cost.
Where the official layout leaves a choice, the cheaper option is taken (views of the
full logits and a masked mean instead of gathered copies), so the comparison is, if
anything, flattering to this baseline.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Trainer

from axolotl_balora.core import BALoRAConfig
from axolotl_balora.core.config import parse_init
from axolotl_balora.core.ops.losses import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def official_style_loss(
    model: PeftModel, reference: nn.Module, batch: Batch, config: BALoRAConfig
) -> torch.Tensor:
    """Task loss + the three terms from full logits of the model and of its separate reference copy."""
    outputs = model(**batch)
    with torch.no_grad():
        ref_logits = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits[:, :-1]
    logits = outputs.logits[:, :-1]
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    weights = scored.to(logits.dtype)
    count = weights.sum().clamp_min(1)
    temperature = config.temperature

    ref_probs = F.softmax(ref_logits / temperature, dim=-1)
    model_log_probs = F.log_softmax(logits / temperature, dim=-1)
    kl = F.kl_div(model_log_probs, ref_probs, reduction="none").sum(-1)
    consistency = temperature**2 * (kl * weights).sum() / count

    top_probs = F.softmax(logits, dim=-1).topk(config.diversity_top_k, dim=-1).values
    top_probs = top_probs / top_probs.sum(-1, keepdim=True)
    entropy = -(top_probs * torch.log(top_probs + 1e-12)).sum(-1)
    diversity = -(entropy * weights).sum() / count

    rows = logits[scored].float()  # torch.linalg.svdvals has no bf16 kernel
    svd = -torch.linalg.svdvals(rows)[: config.svd_top_k].sum() / torch.linalg.norm(rows)

    return (
        outputs.loss
        + config.lambda_consistency * consistency
        + config.lambda_diversity * diversity
        + config.lambda_svd * svd
    )


def peft_init_weights(init: str) -> str | bool:
    """The PEFT `init_lora_weights` value for one of this project's init names."""
    method, niter = parse_init(init)
    if method == "gaussian":
        return True
    return "pissa" if niter is None else f"pissa_niter_{niter}"


def official_style_models(
    model: nn.Module, lora_config: LoraConfig, init: str
) -> tuple[PeftModel, nn.Module]:
    """(trained PEFT model, reference); the reference is a deep copy taken before PEFT touches W."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    peft_model = get_peft_model(model, replace(lora_config, init_lora_weights=peft_init_weights(init)))
    return peft_model, reference


class OfficialStyleLossMixin:
    """compute_loss = `official_style_loss`, as the official code overrides it on its Trainer."""

    reference: nn.Module
    balora_config = BALoRAConfig(lambda_schedule="constant")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return official_style_loss(model, self.reference, inputs, self.balora_config)


class OfficialStyleTrainer(OfficialStyleLossMixin, Trainer):
    """The official-style loss on a plain transformers Trainer (the in-process benchmark)."""

    def __init__(self, *args: Any, reference: nn.Module, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reference = reference
