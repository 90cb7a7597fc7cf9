"""Evaluate the three regularizers for one micro-batch, robust to numerical faults.

This is the seam between the trainer and the loss implementations: the plain
path below uses the readable functions of `losses`; a fused, chunked path
can return the same `RegularizerTerms` without ever building full logits;
the classification form uses those of `classification_terms`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .classification_terms import feature_consistency, logit_decorrelation, logit_svd_ratio
from ..config import BALoRAConfig
from .fused import fused_losses, svd_ratio_from_hidden
from .losses import consistency_kl, diversity_entropy, svd_ratio
from .schedules import Lambdas

LOG = logging.getLogger(__name__)

TERM_NAMES = ("consistency", "diversity", "svd")


@dataclass
class RegularizerTerms:
    """Each computed term of one micro-batch and whether it entered the loss, on the device.

    A term is dropped (skipped) when its value is not finite or its SVD
    failed. That decision stays a device bool in `kept`: no host sync, no
    Python branch on a value. `values` holds every computed term, a dropped
    one included (a failed SVD has no value).
    """

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)

    def weighted_sum(self, lambdas: Lambdas) -> torch.Tensor | float:
        """sum of lambda * value over the kept terms; a dropped term adds exactly 0, gradient included."""
        total: torch.Tensor | float = 0.0
        for name, value in self.values.items():
            weight = getattr(lambdas, name)
            if weight > 0:
                total = total + weight * torch.where(self.kept[name], value, torch.zeros_like(value))
        return total

    @property
    def skipped(self) -> dict[str, int]:
        """{name: 1} for each dropped term. Reads the device flags (a host sync): tests and debugging only."""
        return {name: 1 for name, kept in self.kept.items() if not bool(kept)}


class _GradientGate(torch.autograd.Function):
    """Identity forward; backward passes the gradient only if the term turned out kept.

    `torch.where` in the loss stops a dropped term's value, but backward would
    still run through that term's graph with a zero incoming gradient, and
    0 * NaN (a NaN reference, a failed SVD) is NaN. Gating each input of the
    term replaces whatever comes back with exact zeros.
    """

    @staticmethod
    def forward(ctx, tensor, gate):
        ctx.gate = gate
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return torch.where(ctx.gate.kept, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


class _TermGate:
    """Wraps a term's inputs; `kept` is set once the term's value is known."""

    def __init__(self) -> None:
        self.kept: torch.Tensor | None = None

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return _GradientGate.apply(tensor, self) if tensor.requires_grad else tensor


TermComputation = Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def _evaluate(
    name: str, compute: TermComputation, with_grad: bool, terms: RegularizerTerms, device: torch.device
) -> None:
    """Run one term (its differentiable inputs through a gate); record its value and kept flag."""
    gate = _TermGate()
    grad_context = contextlib.nullcontext() if with_grad else torch.no_grad()
    try:
        with grad_context:
            value = compute(gate)
    except torch.linalg.LinAlgError as error:
        LOG.warning("BA-LoRA: %s term skipped for this step (SVD failed: %s)", name, error)
        terms.kept[name] = torch.zeros((), dtype=torch.bool, device=device)
        return
    gate.kept = torch.isfinite(value)
    terms.values[name] = value
    terms.kept[name] = gate.kept


def _evaluate_terms(
    computations: dict[str, TermComputation | None],
    config: BALoRAConfig,
    lambdas: Lambdas,
    device: torch.device,
) -> RegularizerTerms:
    """Run each term (None = no input for it, e.g. no reference) under the lambda rules.

    A term whose configured lambda is 0 is not computed at all; a term whose
    scheduled lambda is 0 at this step (the paper's warm-up) is computed
    without gradient, only so that its curve shows in the logs.
    """
    terms = RegularizerTerms()
    for name, compute in computations.items():
        if compute is not None and getattr(config, f"lambda_{name}") > 0:
            _evaluate(name, compute, getattr(lambdas, name) > 0, terms, device)
    return terms


def plain_regularizer_terms(
    logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
    labels: torch.Tensor,
    config: BALoRAConfig,
    lambdas: Lambdas,
) -> RegularizerTerms:
    """Compute the causal-LM terms from full logits."""
    return _evaluate_terms(
        {
            "consistency": None if ref_logits is None else (
                lambda gate: consistency_kl(gate(logits), ref_logits, labels, config.temperature)
            ),
            "diversity": lambda gate: diversity_entropy(gate(logits), labels, config.diversity_top_k),
            "svd": lambda gate: svd_ratio(gate(logits), labels, config.svd_top_k, config.svd_norm),
        },
        config,
        lambdas,
        logits.device,
    )


def classification_regularizer_terms(
    logits: torch.Tensor,
    features: torch.Tensor | None,
    ref_features: torch.Tensor | None,
    config: BALoRAConfig,
    lambdas: Lambdas,
) -> RegularizerTerms:
    """Compute the classification-form terms (spec section 3) from per-example logits [N, C].

    The consistency term compares the pooled features [N, H] of the model and
    of the pre-trained model; without them it is not computed.
    """
    has_features = features is not None and ref_features is not None
    return _evaluate_terms(
        {
            "consistency": (
                (lambda gate: feature_consistency(gate(features), ref_features)) if has_features else None
            ),
            "diversity": lambda gate: logit_decorrelation(gate(logits)),
            "svd": lambda gate: logit_svd_ratio(gate(logits), config.svd_top_k),
        },
        config,
        lambdas,
        logits.device,
    )


@dataclass
class FusedLoss:
    """The fused path's loss: `total` = mean task CE + sum of lambda * kept term (differentiable);
    `task` (the mean CE) and `terms` are for the logs (their weighted sum is already in `total`)."""

    total: torch.Tensor
    task: torch.Tensor
    terms: RegularizerTerms


def fused_regularizer_terms(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor | None,
    labels: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_r: Callable[[], torch.Tensor],
    config: BALoRAConfig,
    lambdas: Lambdas,
) -> FusedLoss:
    """The task loss and the terms from final hidden states, chunk by chunk.

    Same values and gradients as the plain path (tested), without any
    [tokens, vocab] tensor and without a host sync. `lm_head_r` gives R of
    lm_head.weight = Q R.
    """
    consistency = config.lambda_consistency > 0 and ref_hidden is not None
    diversity = config.lambda_diversity > 0
    losses = fused_losses(
        hidden,
        ref_hidden if consistency else None,
        labels,
        lm_head_weight,
        temperature=config.temperature,
        top_k=config.diversity_top_k if diversity else None,
        lambda_consistency=lambdas.consistency if consistency else 0.0,
        lambda_diversity=lambdas.diversity if diversity else 0.0,
        chunk_size=config.chunk_size,
    )
    terms = _evaluate_terms(
        {"svd": lambda gate: svd_ratio_from_hidden(
            gate(hidden), labels, lm_head_r(), config.svd_top_k, config.svd_norm)},
        config, lambdas, hidden.device,
    )
    svd_penalty = terms.weighted_sum(lambdas)  # the other two terms are inside the objective
    if consistency:
        terms.values["consistency"], terms.kept["consistency"] = losses.consistency, losses.consistency_kept
    if diversity:
        terms.values["diversity"], terms.kept["diversity"] = losses.neg_entropy, losses.diversity_kept
    return FusedLoss(total=losses.objective + svd_penalty, task=losses.cross_entropy, terms=terms)
