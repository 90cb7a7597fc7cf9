"""BA-LoRA on preference trainers: TRL's DPO (and IPO), KTO, ORPO and CPO (SimPO).

Put `BALoRAPreferenceMixin` first in the bases of the trainer class, e.g.
`class MyDPO(BALoRAPreferenceMixin, DPOTrainer)`. The trainer's own preference loss
stays as it is; the three terms are added to it, computed on the completion tokens the
trainer scores (chosen and rejected completions alike; never the prompt), from the logits
of the policy forward the trainer runs anyway. The reference is the model with its
adapters disabled, which for BA-LoRA is the pre-trained model exactly: where the trainer
runs such a forward itself for its reference log-probabilities (DPO, IPO, KTO), its logits
are reused; where it runs none (ORPO, SimPO, or a precomputed reference), one
adapter-disabled forward per step is added, and only when the consistency term is on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from torch import nn

from ..adapter.names import FROZEN_ADAPTER, TRAINABLE_ADAPTER
from ..adapter.pissa_init import activate_balora_adapters, apply_balora, lora_layers
from ..ops.losses import IGNORE_INDEX
from ..ops.regularizers import plain_regularizer_terms
from ..ops.schedules import lambdas_at
from .trainer_base import BALoRATrainerBase

LOG = logging.getLogger(__name__)


@dataclass
class _Forward:
    """One call of the causal LM during the parent's loss: its inputs and logits."""

    input_ids: torch.Tensor
    kwargs: dict[str, Any]
    logits: torch.Tensor
    adapters_on: bool
    with_grad: bool


@dataclass
class _ForwardLog:
    """The causal LM's calls during one `compute_loss` of the parent, in order."""

    calls: list[_Forward] = field(default_factory=list)

    def policy(self, input_ids: torch.Tensor) -> _Forward | None:
        """The trained forward on the scored batch (KTO's mismatched KL batch runs without grad)."""
        return next((call for call in self.calls
                     if call.adapters_on and call.with_grad and call.input_ids is input_ids), None)

    def reference(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Logits of an adapter-disabled forward of the parent on the same batch, if it ran one."""
        return next((call.logits for call in self.calls
                     if not call.adapters_on and call.input_ids is input_ids), None)


@contextlib.contextmanager
def _recorded_forwards(peft_model: PeftModel) -> Iterator[_ForwardLog]:
    """Record every forward of the model inside the block (a forward hook on the PeftModel).

    The hook sits under every engine wrapper (DDP, DeepSpeed), which call the PeftModel as a
    module, as TRL calls it for its reference; so it sees the policy call and the adapter-disabled
    reference call alike. Not lower: PEFT versions differ in which inner module's `forward` they
    call directly, past its hooks.
    """
    log = _ForwardLog()
    probe = lora_layers(peft_model)[0][1]

    def record(_module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        adapters_on, with_grad = not probe.disable_adapters, torch.is_grad_enabled()
        if input_ids is None or logits is None or (adapters_on and not with_grad):
            return  # neither a policy nor a reference forward (KTO's KL forward): not kept alive
        log.calls.append(_Forward(input_ids, kwargs, logits, adapters_on, with_grad))

    handle = peft_model.register_forward_hook(record, with_kwargs=True)
    try:
        yield log
    finally:
        handle.remove()


def _completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Labels in the causal-LM convention: the token where it is part of a completion, else ignored."""
    return torch.where(completion_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))


class BALoRAPreferenceMixin(BALoRATrainerBase):
    """Adds lambda1 L_CR + lambda2 L_DR + lambda3 L_SVDR to a TRL preference trainer's loss."""

    def __init__(self, *args: Any, peft_config: PeftConfig | None = None, **kwargs: Any):
        """DPO, IPO and KTO receive the base model and a LoRA config: the BA-LoRA adapter is
        built from that config here, before TRL would build a plain LoRA from it."""
        model = kwargs.get("model", args[0] if args else None)
        if peft_config is not None and model is not None and not isinstance(model, PeftModel):
            config = kwargs.get("balora_config")
            init = config.init if config is not None else "pissa"
            cache = config.init_cache_dir() if config is not None else None
            LOG.info("BA-LoRA: building the adapter from the trainer's LoRA config (init=%s, r=%s)",
                     init, peft_config.r)
            model = apply_balora(model, peft_config, init=init, init_cache=cache)
            if args:
                args = (model, *args[1:])
            else:
                kwargs["model"] = model
        super().__init__(*args, **kwargs)
        self._drop_reference_copy()

    def _drop_reference_copy(self) -> None:
        """TRL adds a "ref" copy of the trained adapter to a PeftModel it did not build, as the
        reference. For BA-LoRA that copy without the frozen factors is W + s B0 A0, not the
        pre-trained model: remove it, so TRL disables the adapters for its reference instead."""
        peft_model = self.accelerator.unwrap_model(self.model)
        extra = [name for name in getattr(peft_model, "peft_config", {})
                 if name not in (TRAINABLE_ADAPTER, FROZEN_ADAPTER)]
        for name in extra:
            peft_model.delete_adapter(name)
        if extra:
            activate_balora_adapters(peft_model)
            LOG.info("BA-LoRA: removed the trainer's reference adapter copy %s; the reference is the "
                     "model with adapters disabled (the pre-trained model exactly)", extra)

    def concatenated_inputs(self, batch: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """ORPO and CPO build the chosen + rejected batch here: remember it for the scored labels."""
        concatenated = super().concatenated_inputs(batch, *args, **kwargs)
        self._balora_concatenated = concatenated
        return concatenated

    def _scored_batch(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids the policy forward received, labels of the completion tokens it scores)."""
        if "completion_mask" in inputs:  # DPO, IPO, KTO
            return inputs["input_ids"], _completion_labels(inputs["input_ids"], inputs["completion_mask"])
        concatenated = getattr(self, "_balora_concatenated", None)
        if concatenated is not None:  # ORPO, CPO / SimPO
            return concatenated["concatenated_input_ids"], concatenated["concatenated_labels"]
        raise RuntimeError(
            f"BA-LoRA: {type(self).__name__} scores its completions in a way BA-LoRA does not know "
            "(no completion_mask in the batch, no concatenated chosen + rejected batch)"
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or not self.balora_config.regularized:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        peft_model = self.accelerator.unwrap_model(model)
        lambdas = lambdas_at(self.balora_config, self.state.global_step, self.state.max_steps)
        self._balora_concatenated = None
        with _recorded_forwards(peft_model) as forwards:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        task_loss = result[0] if return_outputs else result
        input_ids, labels = self._scored_batch(inputs)
        policy = forwards.policy(input_ids)
        if policy is None:
            raise RuntimeError(
                "BA-LoRA: the trainer computed its loss without the model's logits (a chunked or "
                "Liger loss, e.g. dpo_use_liger_kernel / use_liger_kernel); turn that off"
            )
        reference = None
        if self.balora_config.lambda_consistency > 0:
            reference = forwards.reference(input_ids)
            if reference is None:
                reference = self._reference_logits(peft_model, policy)
        terms = plain_regularizer_terms(policy.logits, reference, labels, self.balora_config, lambdas)
        loss = task_loss + terms.weighted_sum(lambdas)
        self._record(terms, lambdas, task_loss, loss)
        return (loss, *result[1:]) if return_outputs else loss

    @staticmethod
    def _reference_logits(peft_model: PeftModel, policy: _Forward) -> torch.Tensor:
        """One adapter-disabled forward on the policy's inputs (the pre-trained model's logits),
        through the PeftModel as the trainer calls it, so an engine's hooks on it run too."""
        inputs = {key: value for key, value in policy.kwargs.items() if key != "output_router_logits"}
        if "input_ids" not in inputs:
            inputs["input_ids"] = policy.input_ids
        with torch.no_grad(), peft_model.disable_adapter():
            return peft_model(**inputs).logits
