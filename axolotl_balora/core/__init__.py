"""BA-LoRA core: pure torch + peft + transformers, usable without Axolotl."""

from .ops.classification_terms import (
    feature_consistency,
    logit_consistency_kl,
    logit_decorrelation,
    logit_svd_ratio,
)
from .config import BALoRAConfig
from .adapter.pissa_init import apply_balora
from .ops.losses import consistency_kl, diversity_entropy, svd_ratio
from .ops.schedules import lambdas_at
from .training.trainer import BALoRATrainerMixin

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
