"""A Trainer mixin that adds the BA-LoRA regularizers to the task loss.

Works on top of any `transformers.Trainer` subclass (plain Trainer, TRL's
SFTTrainer, Axolotl's trainer): put it first in the bases, e.g.
`class MyTrainer(BALoRATrainerMixin, Trainer)`, and pass `balora_config=`.
Which loss runs is chosen once per model by `loss_path.py`, and computed by the
chosen object (`loss_paths.py`): on the fused path the task loss and the terms
come from the final hidden states (no logits are built); on the plain path the
task loss comes from the parent's `compute_loss`; a `*ForSequenceClassification`
model gets the classification form (per-example logits and pooled features).
Either way the terms are normalized exactly as the parent's loss (token-weighted
under gradient accumulation and across devices, `regularizer_weight`). The mixin
keeps only the Trainer hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.losses import IGNORE_INDEX
from ..ops.schedules import lambdas_at
from .loss_path import choose_loss_path, output_layer_key
from .loss_paths import LossPath, LossStep
from .trainer_base import BALoRATrainerBase

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
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The parent's loss, plus the terms in training: computed by the loss path of this model."""
        if not model.training or not self.balora_config.regularized:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        peft_model = self.accelerator.unwrap_model(model)
        path = self._loss_path(peft_model)
        step = LossStep(
            model, peft_model, inputs, num_items_in_batch, self.balora_config,
            lambdas_at(self.balora_config, self.state.global_step, self.state.max_steps),
            super().compute_loss, self.regularizer_weight, self._record,
        )
        return path.compute_loss(step, return_outputs)

    def _loss_path(self, peft_model: nn.Module) -> LossPath:
        """The path chosen for this model and output layer (chosen again if either changes)."""
        if self._balora_path is None or self._balora_path.key != output_layer_key(peft_model):
            customized = bool(getattr(self.args, "label_smoothing_factor", 0) or getattr(self, "compute_loss_func", None))
            self._balora_path = choose_loss_path(peft_model, self.balora_config, customized)
        return self._balora_path

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
