"""Evaluate the three regularizers for one micro-batch, robust to numerical faults.

This is the seam between the trainer and the loss implementations: the plain
path below uses the readable functions of `losses`; a fused, chunked path
can return the same `RegularizerTerms` without ever building full logits;
the classification form uses those of `classification`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .classification import feature_consistency, logit_decorrelation, logit_svd_ratio
from .config import BALoRAConfig
from .fused import fused_sums, svd_ratio_from_hidden
from .losses import consistency_kl, diversity_entropy, svd_ratio
from .schedules import Lambdas

LOG = logging.getLogger(__name__)

TERM_NAMES = ("consistency", "diversity", "svd")


@dataclass
class RegularizerTerms:
    """Each term of one micro-batch (absent = off or skipped) and how many were skipped."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def weighted_sum(self, lambdas: Lambdas) -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
        for name, value in self.values.items():
            weight = getattr(lambdas, name)
            if weight > 0:
                total = total + weight * value
        return total


def _evaluate(
    name: str, compute: Callable[[], torch.Tensor], with_grad: bool, terms: RegularizerTerms
) -> None:
    """Run one term; a failed SVD or a non-finite value is skipped and counted, never raised."""
    grad_context = contextlib.nullcontext() if with_grad else torch.no_grad()
    try:
        with grad_context:
            value = compute()
    except torch.linalg.LinAlgError as error:
        LOG.warning("BA-LoRA: %s term skipped for this step (SVD failed: %s)", name, error)
        terms.skipped[name] = terms.skipped.get(name, 0) + 1
        return
    if not torch.isfinite(value).all():
        LOG.warning("BA-LoRA: %s term skipped for this step (non-finite value)", name)
        terms.skipped[name] = terms.skipped.get(name, 0) + 1
        return
    terms.values[name] = value


def _evaluate_terms(
    computations: dict[str, Callable[[], torch.Tensor] | None],
    config: BALoRAConfig,
    lambdas: Lambdas,
) -> RegularizerTerms:
    """Run each term (None = no input for it, e.g. no reference) under the lambda rules.

    A term whose configured lambda is 0 is not computed at all; a term whose
    scheduled lambda is 0 at this step (the paper's warm-up) is computed
    without gradient, only so that its curve shows in the logs.
    """
    terms = RegularizerTerms()
    for name, compute in computations.items():
        if compute is not None and getattr(config, f"lambda_{name}") > 0:
            _evaluate(name, compute, getattr(lambdas, name) > 0, terms)
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
                lambda: consistency_kl(logits, ref_logits, labels, config.temperature)
            ),
            "diversity": lambda: diversity_entropy(logits, labels, config.diversity_top_k),
            "svd": lambda: svd_ratio(logits, labels, config.svd_top_k, config.svd_norm),
        },
        config,
        lambdas,
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
            "consistency": (lambda: feature_consistency(features, ref_features)) if has_features else None,
            "diversity": lambda: logit_decorrelation(logits),
            "svd": lambda: logit_svd_ratio(logits, config.svd_top_k),
        },
        config,
        lambdas,
    )


def fused_regularizer_terms(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor | None,
    labels: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_r: Callable[[], torch.Tensor],
    config: BALoRAConfig,
    lambdas: Lambdas,
) -> tuple[torch.Tensor, RegularizerTerms]:
    """(mean task cross-entropy, terms) from final hidden states, chunk by chunk.

    Same values and gradients as the plain path (tested), without any
    [tokens, vocab] tensor. `lm_head_r` gives R of lm_head.weight = Q R.
    """
    sums = fused_sums(
        hidden,
        ref_hidden if config.lambda_consistency > 0 else None,
        labels,
        lm_head_weight,
        temperature=config.temperature,
        top_k=config.diversity_top_k if config.lambda_diversity > 0 else None,
        chunk_size=config.chunk_size,
    )
    count = max(sums.count, 1)
    terms = _evaluate_terms(
        {
            "consistency": None if sums.consistency is None else (lambda: sums.consistency / count),
            "diversity": None if sums.neg_entropy is None else (lambda: sums.neg_entropy / count),
            "svd": lambda: svd_ratio_from_hidden(
                hidden, labels, lm_head_r(), config.svd_top_k, config.svd_norm
            ),
        },
        config,
        lambdas,
    )
    return sums.cross_entropy / count, terms
