"""BA-LoRA core: pure torch + peft + transformers, usable without Axolotl."""

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
    "lambdas_at",
    "svd_ratio",
]
