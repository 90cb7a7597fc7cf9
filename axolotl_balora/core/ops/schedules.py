"""Lambda schedules: how the three regularizer weights move over a run (spec section 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import BALoRAConfig

# Paper schedule constants: lambda1 decays to this fraction of its value;
# lambda2/lambda3 are off for WARMUP_START of the run, then ramp over WARMUP_LENGTH.
CONSISTENCY_FLOOR = 0.1
WARMUP_START = 0.20
WARMUP_LENGTH = 0.05


@dataclass(frozen=True)
class Lambdas:
    consistency: float
    diversity: float
    svd: float


def _progress(step: int, total_steps: int) -> float:
    if total_steps <= 0:
        return 0.0
    return min(max(step / total_steps, 0.0), 1.0)


def paper_consistency_factor(progress: float) -> float:
    """Cosine decay from 1 to CONSISTENCY_FLOOR over the run."""
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return CONSISTENCY_FLOOR + (1.0 - CONSISTENCY_FLOOR) * cosine


def paper_warmup_factor(progress: float) -> float:
    """0 for the first 20% of the run, linear to 1 over the next 5%, then 1."""
    if progress < WARMUP_START:
        return 0.0
    return min((progress - WARMUP_START) / WARMUP_LENGTH, 1.0)


def lambdas_at(config: BALoRAConfig, step: int, total_steps: int) -> Lambdas:
    """The three weights to use at optimizer step `step` of `total_steps`."""
    if config.lambda_schedule == "constant":
        return Lambdas(config.lambda_consistency, config.lambda_diversity, config.lambda_svd)
    progress = _progress(step, total_steps)
    warmup = paper_warmup_factor(progress)
    return Lambdas(
        consistency=config.lambda_consistency * paper_consistency_factor(progress),
        diversity=config.lambda_diversity * warmup,
        svd=config.lambda_svd * warmup,
    )
