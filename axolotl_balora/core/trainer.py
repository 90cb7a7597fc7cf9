"""A Trainer mixin that adds the BA-LoRA regularizers to the task loss.

Works on top of any `transformers.Trainer` subclass (plain Trainer, TRL's
SFTTrainer, Axolotl's trainer): put it first in the bases, e.g.
`class MyTrainer(BALoRATrainerMixin, Trainer)`, and pass `balora_config=`.
On the fused path the task loss and the terms come from the final hidden
states (no logits are built); on the plain path the task loss comes from the
parent's `compute_loss`. Either way it is normalized exactly as the parent
would (token-weighted under gradient accumulation and across devices).
A `*ForSequenceClassification` model gets the classification form instead
(per-example logits and pooled features, `classification.py`); the
`task` field of BALoRAConfig overrides that choice.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from .config import BALoRAConfig
from .adapters import TRAINING_STATE_DIR
from .checkpoint import check_compatible, load_training_state
from .classification import recorded_pooled_features, reference_features, uses_classification_form
from .init import activate_balora_adapters, check_frozen_factors_active
from .losses import IGNORE_INDEX
from .fused import LmHeadFactor
from .hidden_states import final_hidden_states, fused_path_blocker
from .regularizers import (
    TERM_NAMES,
    RegularizerTerms,
    classification_regularizer_terms,
    fused_regularizer_terms,
    plain_regularizer_terms,
)
from .schedules import Lambdas, lambdas_at
from .term_tally import TermTally

LOG = logging.getLogger(__name__)

# Keys of the model inputs that are not model inputs for the reference forward.
_TASK_ONLY_KEYS = ("labels", "num_items_in_batch")


class BALoRATrainerMixin:
    """Adds lambda1 L_CR + lambda2 L_DR + lambda3 L_SVDR to the training loss and logs them."""

    def __init__(self, *args: Any, balora_config: BALoRAConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.balora_config = balora_config or BALoRAConfig()
        self._balora_tally = TermTally()
        self._balora_checked = False
        self._balora_classification = False
        self._balora_fused_blocker: str | None = None
        self._balora_lm_head_r = LmHeadFactor()

    # -- loss ---------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or not self.balora_config.regularized:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        peft_model = self.accelerator.unwrap_model(model)
        if not self._balora_checked:
            check_frozen_factors_active(peft_model)
            self._balora_classification = uses_classification_form(peft_model, self.balora_config.task)
            if self._balora_classification:
                LOG.info("BA-LoRA: classification form (per-example logits, pooled features)")
            else:
                self._balora_fused_blocker = self._choose_loss_path(peft_model)
            self._balora_checked = True
        labels = inputs["labels"]
        lambdas = lambdas_at(self.balora_config, self.state.global_step, self.state.max_steps)
        if self._balora_classification:
            loss, outputs = self._classification_loss(model, peft_model, inputs, lambdas, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        weight = self.regularizer_weight(labels, num_items_in_batch)
        if return_outputs or self._balora_fused_blocker is not None:
            task_loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            ref_logits = self.reference_logits(model, inputs) if lambdas.consistency > 0 else None
            terms = plain_regularizer_terms(
                outputs.logits, ref_logits, labels, self.balora_config, lambdas
            )
            loss = task_loss + weight * terms.weighted_sum(lambdas)
        else:
            outputs = None
            task_mean, terms = self._fused_terms(model, peft_model, inputs, labels, lambdas)
            loss = weight * (task_mean + terms.weighted_sum(lambdas))
        self._record(terms, lambdas)
        return (loss, outputs) if return_outputs else loss

    def _choose_loss_path(self, peft_model: nn.Module) -> str | None:
        if self.balora_config.chunk_size == 0:
            blocker = "balora_chunk_size is 0"
        elif getattr(self.args, "label_smoothing_factor", 0) or getattr(self, "compute_loss_func", None):
            blocker = "the task loss is customized (label smoothing or compute_loss_func)"
        else:
            blocker = fused_path_blocker(peft_model)
        if blocker is None:
            LOG.info("BA-LoRA: fused chunked loss (chunk %d tokens)", self.balora_config.chunk_size)
        else:
            LOG.warning("BA-LoRA: regularizers from full logits (plain path): %s", blocker)
        return blocker

    def _fused_terms(self, model, peft_model, inputs, labels, lambdas):
        model_inputs = {k: v for k, v in inputs.items() if k not in _TASK_ONLY_KEYS}
        hidden = final_hidden_states(model, peft_model, model_inputs)
        ref_hidden = None
        if self.balora_config.lambda_consistency > 0:
            with torch.no_grad(), peft_model.disable_adapter():
                ref_hidden = final_hidden_states(model, peft_model, model_inputs).detach()
        lm_head_weight = peft_model.get_base_model().get_output_embeddings().weight
        return fused_regularizer_terms(
            hidden, ref_hidden, labels, lm_head_weight,
            lambda: self._balora_lm_head_r(lm_head_weight), self.balora_config, lambdas,
        )

    def _classification_loss(self, model, peft_model, inputs, lambdas, num_items_in_batch):
        """(loss, outputs) of the classification form: the parent's task loss plus the terms
        on the per-example logits [N, C] and the pooled features (spec section 3)."""
        consistency = self.balora_config.lambda_consistency > 0
        ref_features = None
        if consistency:
            model_inputs = {k: v for k, v in inputs.items() if k not in _TASK_ONLY_KEYS}
            ref_features = reference_features(model, peft_model, model_inputs)
        recording = recorded_pooled_features(peft_model, inputs) if consistency else contextlib.nullcontext([])
        with recording as features:
            task_loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        terms = classification_regularizer_terms(
            outputs.logits, features[-1] if features else None, ref_features, self.balora_config, lambdas
        )
        self._record(terms, lambdas)
        weight = self.regularizer_weight(inputs["labels"], num_items_in_batch, shifted=False)
        return task_loss + weight * terms.weighted_sum(lambdas), outputs

    def reference_logits(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Logits of the pre-trained model: the same forward with every adapter disabled, no grad."""
        peft_model = self.accelerator.unwrap_model(model)
        reference_inputs = {k: v for k, v in inputs.items() if k not in _TASK_ONLY_KEYS}
        with torch.no_grad(), peft_model.disable_adapter():
            return model(**reference_inputs).logits.detach()

    def regularizer_weight(
        self, labels: torch.Tensor, num_items_in_batch: Any, shifted: bool = True
    ) -> float | torch.Tensor:
        """Scale that makes a per-micro-batch mean add up like the task loss does.

        When the parent normalizes the task loss by the token count of the whole
        accumulated (and device-averaged) batch, the parent does not divide by
        the accumulation steps, so each micro-batch's regularizers are weighted
        by its share of those tokens. Otherwise the parent divides the returned
        loss by the accumulation steps itself and the weight is 1. Tokens are
        counted as the Trainer counts them: after the causal shift (`shifted`),
        or every label of a classifier.
        """
        if num_items_in_batch is None or not getattr(self, "model_accepts_loss_kwargs", False):
            return 1.0
        scored = labels[..., 1:] if shifted else labels
        local_tokens = (scored != IGNORE_INDEX).sum()
        weight = local_tokens / num_items_in_batch
        if getattr(self.args, "average_tokens_across_devices", False):
            processes = self.accelerator.num_processes
            parallelism = getattr(self.accelerator, "parallelism_config", None)
            if parallelism is not None:
                processes //= parallelism.tp_size
            weight = weight * processes
        return weight

    # -- checkpoints --------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """Refuse a checkpoint of another adapter layout or init before anything loads it.

        DeepSpeed resumes through its own checkpoint loader, never through
        `_load_from_checkpoint`; the check must not depend on which engine runs.
        """
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, Path)) and (Path(checkpoint) / TRAINING_STATE_DIR).is_dir():
            check_compatible(self.accelerator.unwrap_model(self.model), Path(checkpoint) / TRAINING_STATE_DIR)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume from the raw adapters under TRAINING_STATE_DIR, not the rank-2r export."""
        state_dir = Path(resume_from_checkpoint) / TRAINING_STATE_DIR
        peft_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not state_dir.is_dir():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        LOG.info("BA-LoRA: resuming adapters from %s", state_dir)
        load_training_state(peft_model, state_dir)
        activate_balora_adapters(peft_model)

    # -- logging ------------------------------------------------------------
    def _record(self, terms: RegularizerTerms, lambdas: Lambdas) -> None:
        self._balora_tally.add(terms, lambdas)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Attach each term's mean since the last training log, over every rank (skips summed).

        The Trainer logs on every rank at the same steps, so the one reduction here
        is collective-safe; it is the only host sync the terms cost.
        """
        if "loss" in logs and self._balora_tally.micro_batches:
            logs.update(self._balora_tally.reduce_and_reset(self.accelerator, self.args.device))
        super().log(logs, *args, **kwargs)
