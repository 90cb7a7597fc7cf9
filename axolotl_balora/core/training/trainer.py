"""A Trainer mixin that adds the BA-LoRA regularizers to the task loss.

Works on top of any `transformers.Trainer` subclass (plain Trainer, TRL's
SFTTrainer, Axolotl's trainer): put it first in the bases, e.g.
`class MyTrainer(BALoRATrainerMixin, Trainer)`, and pass `balora_config=`.
Which loss runs is chosen once per model by `loss_path.py`: on the fused path
the task loss and the terms come from the final hidden states (no logits are
built); on the plain path the task loss comes from the parent's `compute_loss`;
a `*ForSequenceClassification` model gets the classification form (per-example
logits and pooled features, `classification.py`). Either way the terms are
normalized exactly as the parent's loss (token-weighted under gradient
accumulation and across devices). The mixin keeps only the Trainer hooks.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from ..ops.losses import IGNORE_INDEX
from ..ops.regularizers import (
    classification_regularizer_terms,
    fused_regularizer_terms,
    plain_regularizer_terms,
)
from ..ops.schedules import lambdas_at
from ..parallel.output_layer import full_head_weight
from .classification import recorded_pooled_features, reference_features
from .hidden_states import final_hidden_states
from .loss_path import CLASSIFICATION, LossPath, choose_loss_path, output_layer_key
from .model_inputs import inputs_from_parent, reference_before_forward, replayed_random_state, without_task_keys
from .trainer_base import BALoRATrainerBase

LOG = logging.getLogger(__name__)


class BALoRATrainerMixin(BALoRATrainerBase):
    """Adds lambda1 L_CR + lambda2 L_DR + lambda3 L_SVDR to the training loss and logs them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._balora_path: LossPath | None = None  # chosen at the first training step

    @property
    def balora_loss_path(self) -> str:
        """Which loss the last training step used: for logs, benchmarks and tests."""
        return "model loss" if self._balora_path is None else self._balora_path.describe()

    # -- loss ---------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or not self.balora_config.regularized:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        peft_model = self.accelerator.unwrap_model(model)
        path = self._loss_path(peft_model)
        lambdas = lambdas_at(self.balora_config, self.state.global_step, self.state.max_steps)
        if path.kind == CLASSIFICATION:
            loss, outputs = self._classification_loss(model, peft_model, inputs, lambdas, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        labels = inputs["labels"]
        weight = self.regularizer_weight(labels, num_items_in_batch)
        if return_outputs or not path.fused:
            return self._plain_loss(model, peft_model, inputs, lambdas, weight, num_items_in_batch, return_outputs)
        model_inputs = without_task_keys(inputs_from_parent(super().compute_loss, model, inputs, num_items_in_batch))
        if not path.admit_on_batch(model, peft_model, model_inputs, labels):
            # The parent runs once more for this one step (its side effects, such as
            # Axolotl's token count, see this batch twice).
            return self._plain_loss(model, peft_model, inputs, lambdas, weight, num_items_in_batch, return_outputs)
        fused = self._fused_terms(model, peft_model, model_inputs, labels, lambdas)
        loss = weight * fused.total
        self._record(fused.terms, lambdas, weight * fused.task, loss)
        return loss

    def _loss_path(self, peft_model: nn.Module) -> LossPath:
        """The path chosen for this model and output layer (chosen again if either changes)."""
        if self._balora_path is None or self._balora_path.key != output_layer_key(peft_model):
            customized = bool(getattr(self.args, "label_smoothing_factor", 0) or getattr(self, "compute_loss_func", None))
            self._balora_path = choose_loss_path(peft_model, self.balora_config, customized)
        return self._balora_path

    def _plain_loss(self, model, peft_model, inputs, lambdas, weight, num_items_in_batch, return_outputs):
        """The parent's task loss and outputs; the terms from full logits.

        The reference forward runs inside the parent's model call, on the inputs
        the parent prepared, before the trained forward (same dropout draws).
        """
        labels = inputs["labels"]  # a parent with compute_loss_func pops them from `inputs`
        reference: list[torch.Tensor] = []

        def run_reference(forward, model_inputs: dict[str, Any]) -> None:
            with replayed_random_state(model_inputs), torch.no_grad(), peft_model.disable_adapter():
                reference.append(forward(**without_task_keys(model_inputs)).logits.detach())

        with reference_before_forward(model, run_reference) if lambdas.consistency > 0 else contextlib.nullcontext():
            task_loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        terms = plain_regularizer_terms(
            outputs.logits, reference[-1] if reference else None, labels, self.balora_config, lambdas
        )
        loss = task_loss + weight * terms.weighted_sum(lambdas)
        self._record(terms, lambdas, task_loss, loss)
        return (loss, outputs) if return_outputs else loss

    def _fused_terms(self, model, peft_model, model_inputs, labels, lambdas):
        ref_hidden = None
        if self.balora_config.lambda_consistency > 0:
            with replayed_random_state(model_inputs), torch.no_grad(), peft_model.disable_adapter():
                ref_hidden = final_hidden_states(model, peft_model, model_inputs).detach()
        hidden = final_hidden_states(model, peft_model, model_inputs)
        # After both forwards: under FSDP2 / ZeRO-3 this gathers the sharded head (collective).
        with full_head_weight(peft_model) as lm_head_weight:
            return fused_regularizer_terms(
                hidden, ref_hidden, labels, lm_head_weight,
                lambda: self._balora_path.head_r(lm_head_weight), self.balora_config, lambdas,
            )

    def _classification_loss(self, model, peft_model, inputs, lambdas, num_items_in_batch):
        """(loss, outputs) of the classification form: the parent's task loss plus the terms
        on the per-example logits [N, C] and the pooled features (spec section 3)."""
        consistency = self.balora_config.lambda_consistency > 0
        ref_features = None
        if consistency:
            ref_features = reference_features(model, peft_model, without_task_keys(inputs))
        recording = recorded_pooled_features(peft_model, inputs) if consistency else contextlib.nullcontext([])
        with recording as features:
            task_loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        terms = classification_regularizer_terms(
            outputs.logits, features[-1] if features else None, ref_features, self.balora_config, lambdas
        )
        weight = self.regularizer_weight(inputs["labels"], num_items_in_batch, shifted=False)
        loss = task_loss + weight * terms.weighted_sum(lambdas)
        self._record(terms, lambdas, task_loss, loss)
        return loss, outputs

    def regularizer_weight(
        self, labels: torch.Tensor, num_items_in_batch: Any, shifted: bool = True
    ) -> float | torch.Tensor:
        """Scale that makes a per-micro-batch mean add up like the parent's task loss does.

        Mirrors each branch of transformers' Trainer (`compute_loss` and
        `training_step`):

        * the task loss is normalized by the token count of the whole accumulated
          batch (`num_items_in_batch` given, and the model takes loss kwargs or a
          `compute_loss_func` receives it): the parent does not divide by the
          accumulation steps, so each micro-batch is weighted by its share of
          those tokens, times the parent's device scale under
          `average_tokens_across_devices`;
        * a `compute_loss_func` without `num_items_in_batch`: the parent divides
          by nothing, so the weight is 1 / accumulation steps;
        * otherwise the parent divides the returned loss by the accumulation
          steps itself: weight 1.

        Tokens are counted as the Trainer counts them: after the causal shift
        (`shifted`), or every label of a classifier.
        """
        loss_func = getattr(self, "compute_loss_func", None)
        accepts_loss_kwargs = getattr(self, "model_accepts_loss_kwargs", False)
        if num_items_in_batch is not None and (accepts_loss_kwargs or loss_func is not None):
            scored = labels[..., 1:] if shifted else labels
            weight = (scored != IGNORE_INDEX).sum() / num_items_in_batch
            if getattr(self.args, "average_tokens_across_devices", False):
                weight = weight * self._device_loss_scale()
            return weight
        if loss_func is not None:
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            return 1.0 / steps
        return 1.0

    def _device_loss_scale(self) -> int:
        """The factor the parent multiplies a token-normalized loss by across devices."""
        if self.args.n_gpu > 1:
            return self.args.n_gpu
        processes = self.accelerator.num_processes
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None:
            processes //= parallelism.tp_size
        return processes
