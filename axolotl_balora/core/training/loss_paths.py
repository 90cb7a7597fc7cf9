"""The SFT loss paths, one object each: plain, fused (the output layer sharded or not), classification.

Each path owns its reference forward (the pre-trained model, for the consistency term),
its terms and the loss it returns; `loss_path.py` chooses which one a model trains with.
The trainer lends a path what it needs for one micro-batch in a `LossStep` (its parent's
`compute_loss`, the terms' weight, the tally), so no path reads the trainer's state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from peft import PeftModel
from torch import nn

from ..config import BALoRAConfig
from ..ops.fused import LmHeadFactor
from ..ops.regularizers import (
    FusedLoss,
    RegularizerTerms,
    classification_regularizer_terms,
    fused_regularizer_terms,
    plain_regularizer_terms,
)
from ..ops.schedules import Lambdas
from ..parallel.output_layer import full_head_weight
from .classification import recorded_pooled_features, reference_features
from .head_check import check_fused_head
from .hidden_states import final_hidden_states
from .model_inputs import inputs_from_parent, reference_before_forward, without_task_keys
from .reference import reference_forward

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossStep:
    """One training micro-batch, and what the trainer lends its loss path for it."""

    model: nn.Module  # as the Trainer passes it (possibly wrapped by DDP, DeepSpeed, FSDP)
    peft_model: PeftModel
    inputs: dict[str, Any]
    num_items_in_batch: Any
    config: BALoRAConfig
    lambdas: Lambdas
    parent_compute_loss: Callable[..., Any]  # the parent trainer's compute_loss: the task loss
    regularizer_weight: Callable[..., float | torch.Tensor]  # scales the terms as the parent's loss
    record: Callable[[RegularizerTerms, Lambdas, Any, Any], None]  # the logged terms' tally

    def parent_loss(self) -> tuple[torch.Tensor, Any]:
        """(task loss, outputs) of the parent on this batch."""
        return self.parent_compute_loss(
            self.model, self.inputs, return_outputs=True, num_items_in_batch=self.num_items_in_batch
        )


class LossPath(Protocol):
    """What the trainer asks of the path chosen for its model."""

    key: tuple  # `output_layer_key` of the model it was chosen for

    def describe(self) -> str: ...

    def compute_loss(self, step: LossStep, return_outputs: bool) -> Any: ...


def _plain_loss(step: LossStep, weight: float | torch.Tensor, return_outputs: bool) -> Any:
    """The parent's task loss and outputs; the terms from full logits.

    The reference forward runs inside the parent's model call, on the inputs
    the parent prepared, before the trained forward (same dropout draws).
    """
    labels = step.inputs["labels"]  # a parent with compute_loss_func pops them from `inputs`
    reference: list[torch.Tensor] = []

    def run_reference(forward: Callable, model_inputs: dict[str, Any]) -> None:
        with reference_forward(step.peft_model, model_inputs):
            reference.append(forward(**without_task_keys(model_inputs)).logits.detach())

    consistency = step.lambdas.consistency > 0
    with reference_before_forward(step.model, run_reference) if consistency else contextlib.nullcontext():
        task_loss, outputs = step.parent_loss()
    terms = plain_regularizer_terms(
        outputs.logits, reference[-1] if reference else None, labels, step.config, step.lambdas
    )
    loss = task_loss + weight * terms.weighted_sum(step.lambdas)
    step.record(terms, step.lambdas, task_loss, loss)
    return (loss, outputs) if return_outputs else loss


@dataclass
class PlainPath:
    """Terms from the full logits: a reason known in advance, or the fused check failed."""

    key: tuple
    reason: str

    @classmethod
    def because(cls, key: tuple, reason: str) -> PlainPath:
        """The plain path, with the one warning that says why the fused loss does not run."""
        LOG.warning("BA-LoRA: regularizers from full logits (plain path): %s", reason)
        return cls(key, reason)

    def describe(self) -> str:
        return f"plain ({self.reason})"

    def compute_loss(self, step: LossStep, return_outputs: bool) -> Any:
        return _plain_loss(step, step.regularizer_weight(step.inputs["labels"], step.num_items_in_batch),
                           return_outputs)


@dataclass
class FusedPath:
    """Task loss and terms from the final hidden states, chunk by chunk; no logits are built.

    A sharded output layer's weight is gathered once per micro-batch, and R of its QR is
    then computed once for the run (`head_r` fixed). The first batch is checked against the
    model's own loss; if that fails, `fallback` takes every later step.
    """

    key: tuple
    chunk_size: int
    head_r: LmHeadFactor = field(default_factory=LmHeadFactor)  # R of the head's QR, for the SVD term
    head_checked: bool = False
    fallback: PlainPath | None = None

    def describe(self) -> str:
        return f"fused (chunk {self.chunk_size})" if self.fallback is None else self.fallback.describe()

    def compute_loss(self, step: LossStep, return_outputs: bool) -> Any:
        if self.fallback is not None:
            return self.fallback.compute_loss(step, return_outputs)
        labels = step.inputs["labels"]
        weight = step.regularizer_weight(labels, step.num_items_in_batch)
        if return_outputs:  # outputs need the logits
            return _plain_loss(step, weight, return_outputs)
        model_inputs = without_task_keys(
            inputs_from_parent(step.parent_compute_loss, step.model, step.inputs, step.num_items_in_batch)
        )
        if not self.admit_on_batch(step, model_inputs, labels):
            # The parent runs once more for this one step (its side effects, such as
            # Axolotl's token count, see this batch twice).
            return _plain_loss(step, weight, return_outputs)
        fused = self._terms(step, model_inputs, labels)
        loss = weight * fused.total
        step.record(fused.terms, step.lambdas, weight * fused.task, loss)
        return loss

    def admit_on_batch(self, step: LossStep, model_inputs: dict[str, Any], labels: torch.Tensor) -> bool:
        """Whether the fused loss may run: checked against the model's own log-probabilities
        and loss on the first batch (collective under torch.distributed, so every rank takes
        the same path), remembered after."""
        if self.head_checked:
            return True
        check = check_fused_head(step.model, step.peft_model, model_inputs, labels)
        self.head_checked = True
        if check.reason is not None:
            self.fallback = PlainPath.because(self.key, check.reason)
            return False
        LOG.info(
            "BA-LoRA: fused chunked loss (chunk %d tokens); checked against the model's own "
            "log-probabilities on %d positions and its own loss (largest difference %.2g, tolerance %.2g)",
            self.chunk_size, check.positions, check.error, check.tolerance,
        )
        return True

    def _terms(self, step: LossStep, model_inputs: dict[str, Any], labels: torch.Tensor) -> FusedLoss:
        ref_hidden = None
        if step.config.lambda_consistency > 0:
            with reference_forward(step.peft_model, model_inputs):
                ref_hidden = final_hidden_states(step.model, step.peft_model, model_inputs).detach()
        hidden = final_hidden_states(step.model, step.peft_model, model_inputs)
        # After both forwards: under FSDP2 / ZeRO-3 this gathers the sharded head (collective).
        with full_head_weight(step.peft_model) as lm_head_weight:
            return fused_regularizer_terms(
                hidden, ref_hidden, labels, lm_head_weight,
                lambda: self.head_r(lm_head_weight), step.config, step.lambdas,
            )


@dataclass
class ClassificationPath:
    """The parent's task loss plus the terms on the per-example logits [N, C] and the pooled
    features (spec section 3), for a `*ForSequenceClassification` model."""

    key: tuple

    def describe(self) -> str:
        return "classification"

    def compute_loss(self, step: LossStep, return_outputs: bool) -> Any:
        consistency = step.config.lambda_consistency > 0
        ref_features = None
        if consistency:
            ref_features = reference_features(step.model, step.peft_model, without_task_keys(step.inputs))
        recording = (recorded_pooled_features(step.peft_model, step.inputs) if consistency
                     else contextlib.nullcontext([]))
        with recording as features:
            task_loss, outputs = step.parent_loss()
        terms = classification_regularizer_terms(
            outputs.logits, features[-1] if features else None, ref_features, step.config, step.lambdas
        )
        weight = step.regularizer_weight(step.inputs["labels"], step.num_items_in_batch, shifted=False)
        loss = task_loss + weight * terms.weighted_sum(step.lambdas)
        step.record(terms, step.lambdas, task_loss, loss)
        return (loss, outputs) if return_outputs else loss
