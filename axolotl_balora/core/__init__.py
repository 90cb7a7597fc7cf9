"""BA-LoRA core: pure torch + peft + transformers, usable without Axolotl."""

from .classification import (
    feature_consistency,
    logit_consistency_kl,
    logit_decorrelation,
    logit_svd_ratio,
)
from .config import BALoRAConfig
from .init import apply_balora
from .losses import consistency_kl, diversity_entropy, svd_ratio
from .schedules import lambdas_at
from .trainer import BALoRATrainerMixin

__all__ = [
    "BALoRAConfig",
    "BALoRATrainerMixin",
    "apply_balora",
    "consistency_kl",
    "diversity_entropy",
    "feature_consistency",
    "lambdas_at",
    "logit_consistency_kl",
    "logit_decorrelation",
    "logit_svd_ratio",
    "svd_ratio",
]
