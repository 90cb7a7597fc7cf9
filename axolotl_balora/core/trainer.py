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
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .config import BALoRAConfig
from .adapters import TRAINING_STATE_DIR
from .checkpoint import check_compatible, load_training_state
from .export import is_balora_model, save_sharded_balora_adapter
from .classification import recorded_pooled_features, reference_features, uses_classification_form
from .init import activate_balora_adapters, check_frozen_factors_active, restore_frozen_factor_buffers
from .fused import LmHeadFactor
from .head_check import check_fused_head
from .hidden_states import final_hidden_states, fused_path_blocker
from .losses import IGNORE_INDEX
from .model_inputs import inputs_from_parent, reference_before_forward, replayed_random_state, without_task_keys
from .regularizers import (
    RegularizerTerms,
    classification_regularizer_terms,
    fused_regularizer_terms,
    plain_regularizer_terms,
)
from .schedules import Lambdas, lambdas_at
from .sharded_head import full_head_weight, head_sharding
from .term_tally import TermTally

LOG = logging.getLogger(__name__)


def _head_key(peft_model: nn.Module) -> tuple:
    """What the loss-path choice depends on: the model, its output layer, that layer's weight
    (the Parameter object, not its storage, which ZeRO-3 and FSDP2 swap) and its dtype."""
    head = peft_model.get_base_model().get_output_embeddings()
    weight = getattr(head, "weight", None)
    return id(peft_model), id(head), None if weight is None else (id(weight), weight.dtype)


def _fsdp2_sharded_state_dict(trainer: Any) -> bool:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    return (plugin is not None and getattr(plugin, "fsdp_version", 1) == 2
            and "SHARDED_STATE_DICT" in str(plugin.state_dict_type))


class _FrozenFactorsStayBuffers(TrainerCallback):
    """At train begin (after the engine wrapped and, with rank-0 loading, re-loaded the model),
    before any forward: the frozen factors are buffers again if a loader made them parameters."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        restored = restore_frozen_factor_buffers(model) if model is not None else 0
        if restored:
            LOG.info("BA-LoRA: %d frozen factors came back from the engine's loading as parameters; "
                     "kept as buffers (never trained, never clipped)", restored)


class BALoRATrainerMixin:
    """Adds lambda1 L_CR + lambda2 L_DR + lambda3 L_SVDR to the training loss and logs them."""

    def __init__(self, *args: Any, balora_config: BALoRAConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.balora_config = balora_config or BALoRAConfig()
        self._balora_tally = TermTally()
        self._balora_path_key: tuple | None = None
        self._balora_classification = False
        self._balora_fused_blocker: str | None = None
        self._balora_head_checked = False
        self._balora_head_r = LmHeadFactor()  # replaced by _choose_loss_path for the model's head
        self.add_callback(_FrozenFactorsStayBuffers())

    @property
    def balora_loss_path(self) -> str:
        """Which loss the last training step used: for logs, benchmarks and tests."""
        if self._balora_path_key is None:
            return "model loss"
        if self._balora_classification:
            return "classification"
        if self._balora_fused_blocker is None:
            return f"fused (chunk {self.balora_config.chunk_size})"
        return f"plain ({self._balora_fused_blocker})"

    # -- loss ---------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or not self.balora_config.regularized:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        peft_model = self.accelerator.unwrap_model(model)
        self._choose_loss_path(peft_model)
        lambdas = lambdas_at(self.balora_config, self.state.global_step, self.state.max_steps)
        if self._balora_classification:
            loss, outputs = self._classification_loss(model, peft_model, inputs, lambdas, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        labels = inputs["labels"]
        weight = self.regularizer_weight(labels, num_items_in_batch)
        if return_outputs or self._balora_fused_blocker is not None:
            return self._plain_loss(model, peft_model, inputs, lambdas, weight, num_items_in_batch, return_outputs)
        model_inputs = without_task_keys(inputs_from_parent(super().compute_loss, model, inputs, num_items_in_batch))
        if not self._balora_head_checked and not self._fused_head_matches(model, peft_model, model_inputs, labels):
            # The parent runs once more for this one step (its side effects, such as
            # Axolotl's token count, see this batch twice).
            return self._plain_loss(model, peft_model, inputs, lambdas, weight, num_items_in_batch, return_outputs)
        fused = self._fused_terms(model, peft_model, model_inputs, labels, lambdas)
        self._record(fused.terms, lambdas)
        return weight * fused.total

    def _choose_loss_path(self, peft_model: nn.Module) -> None:
        """Pick the form and path once per model / output layer (again if either changes)."""
        key = _head_key(peft_model)
        if key == self._balora_path_key:
            return
        self._balora_path_key = key
        check_frozen_factors_active(peft_model)
        self._balora_classification = uses_classification_form(peft_model, self.balora_config.task)
        if self._balora_classification:
            LOG.info("BA-LoRA: classification form (per-example logits, pooled features)")
            return
        head_weight = getattr(peft_model.get_base_model().get_output_embeddings(), "weight", None)
        sharding = None if head_weight is None else head_sharding(head_weight)
        self._balora_head_r = LmHeadFactor(fixed=sharding is not None)
        if self.balora_config.chunk_size == 0:
            blocker = "balora_chunk_size is 0"
        elif getattr(self.args, "label_smoothing_factor", 0) or getattr(self, "compute_loss_func", None):
            blocker = "the task loss is customized (label smoothing or compute_loss_func)"
        else:
            blocker = fused_path_blocker(peft_model)
        self._balora_fused_blocker = blocker
        self._balora_head_checked = False
        if blocker is not None:
            LOG.warning("BA-LoRA: regularizers from full logits (plain path): %s", blocker)
        elif sharding is not None:
            LOG.info("BA-LoRA: the output layer's weight is sharded (%s); the fused loss gathers it "
                     "for each micro-batch", sharding)

    def _fused_head_matches(self, model, peft_model, model_inputs, labels) -> bool:
        """Check the fused path against the model's own log-probabilities on this batch (once)."""
        check = check_fused_head(model, peft_model, model_inputs, labels)
        self._balora_head_checked = True
        if check.reason is not None:
            self._balora_fused_blocker = check.reason
            LOG.warning("BA-LoRA: regularizers from full logits (plain path): %s", check.reason)
            return False
        LOG.info(
            "BA-LoRA: fused chunked loss (chunk %d tokens); checked against the model's own "
            "log-probabilities on %d positions and its own loss (largest difference %.2g, tolerance %.2g)",
            self.balora_config.chunk_size, check.positions, check.error, check.tolerance,
        )
        return True

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
        self._record(terms, lambdas)
        loss = task_loss + weight * terms.weighted_sum(lambdas)
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
                lambda: self._balora_head_r(lm_head_weight), self.balora_config, lambdas,
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
        self._record(terms, lambdas)
        weight = self.regularizer_weight(inputs["labels"], num_items_in_batch, shifted=False)
        return task_loss + weight * terms.weighted_sum(lambdas), outputs

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Also write the rank-2r export (and TRAINING_STATE_DIR) where FSDP2 saves DCP shards only.

        With `SHARDED_STATE_DICT` the Trainer's own save of a checkpoint writes no adapter file;
        the export gathers just the adapter tensors (small) on every rank, as for the final save.
        Resuming then takes the same TRAINING_STATE_DIR route as every other engine.
        """
        super().save_model(output_dir, _internal_call)
        peft_model = self.accelerator.unwrap_model(self.model)
        if _fsdp2_sharded_state_dict(self) and is_balora_model(peft_model):
            save_sharded_balora_adapter(peft_model, output_dir or self.args.output_dir)

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
