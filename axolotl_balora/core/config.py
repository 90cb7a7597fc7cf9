"""BA-LoRA hyper-parameters and their validation.

The core and the Axolotl layer validate through the same function, so a bad
value gets the same message whether it comes from Python or from a YAML file.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


SCHEDULE_CHOICES = ("paper", "constant")
SVD_NORM_CHOICES = ("frobenius", "nuclear")
TASK_CHOICES = ("auto", "causal_lm", "classification")
# Spec section 3: the weights and k reported for NLU (GLUE, DeBERTa-v3-base).
CLASSIFICATION_DEFAULTS = {
    "lambda_consistency": 0.15,
    "lambda_diversity": 0.03,
    "lambda_svd": 0.03,
    "svd_top_k": 5,
}
_PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")


def default_cache_dir() -> Path:
    """BALORA_INIT_CACHE_DIR, else $XDG_CACHE_HOME (or ~/.cache)/axolotl_balora/pissa."""
    if os.environ.get("BALORA_INIT_CACHE_DIR"):
        return Path(os.environ["BALORA_INIT_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "axolotl_balora" / "pissa"


def parse_init(init: str) -> tuple[str, int | None]:
    """Split an init name into its method and the randomized-SVD iteration count.

    Returns ("pissa", None), ("pissa", N) or ("gaussian", None); raises
    ValueError naming the accepted forms otherwise.
    """
    if init in ("pissa", "gaussian"):
        return init, None
    match = _PISSA_NITER.match(str(init))
    if match and int(match.group(1)) >= 1:
        return "pissa", int(match.group(1))
    raise ValueError(
        f"balora_init: {init!r} is not a known initialization; allowed: "
        "'pissa' (exact SVD), 'pissa_niter_N' with N >= 1 (randomized SVD, e.g. "
        "'pissa_niter_16'), 'gaussian' (plain LoRA init)"
    )


def _option(default: object, description: str) -> Any:
    """A field with its user-facing description: the `balora_*` schema and README's key table
    (`python ci/key_table.py`) are built from it, so each key is described once."""
    return field(default=default, metadata={"description": description})


def _check(condition: bool, key: str, value: object, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {value!r} is not allowed; {allowed}")


@dataclass(frozen=True)
class BALoRAConfig:
    """Regularizer weights and shapes; defaults are the spec's (LLaMA-2-7B, MetaMathQA).

    For sequence classification start from `for_classification()` (the NLU defaults).
    """

    lambda_consistency: float = _option(
        0.025,
        "weight λ1 of the consistency term L_CR = T² · mean KL(p_ref ‖ p_model) over the positions of "
        "the task loss; the reference is the pre-trained model (adapters disabled), computed without "
        "gradient. It holds back a rare class that the base model does not predict: lower it on "
        "skewed data ([results](docs/results.md))",
    )
    lambda_diversity: float = _option(
        0.005,
        "weight λ2 of the diversity term L_DR = − mean entropy of the top-K renormalized distribution "
        "(minimizing it raises entropy)",
    )
    lambda_svd: float = _option(
        0.005,
        "weight λ3 of the SVD term L_SVDR = − (sum of the top-k singular values of the batch's logit "
        "matrix) / norm",
    )
    temperature: float = _option(2.0, "T of the consistency term (> 0)")
    diversity_top_k: int = _option(20, "K of the diversity term; `0` = the full vocabulary")
    svd_top_k: int = _option(
        10, "k of the SVD term (≥ 1; with fewer rows than k all singular values are used)"
    )
    svd_norm: str = _option(
        "frobenius",
        "denominator of the SVD term: `frobenius` (the authors' code) or `nuclear` (the paper's formula)",
    )
    init: str = _option(
        "pissa",
        "`pissa` (exact SVD), `pissa_niter_N` (randomized SVD with N power iterations, fixed seed), "
        "`gaussian` (plain LoRA init: the paper's \"LoRA + regularizers\" ablation)",
    )
    init_cache: str | bool = _option(  # YAML reads a bare off / on as false / true
        "auto",
        "where the PiSSA factors are kept for the next run on the same base: `auto` "
        "(`$BALORA_INIT_CACHE_DIR`, else `~/.cache/axolotl_balora/pissa`), a folder, or `off`; keyed "
        "by a hash of each weight, so a changed base is never served stale (≈ 1.3 GB for LLaMA-2-7B "
        "at r = 128)",
    )
    lambda_schedule: str = _option(
        "paper",
        "`paper`: λ1 decays by a cosine to 0.1·λ1 over the run; λ2 and λ3 are 0 for the first 20% of "
        "steps, ramp linearly over the next 5%, then stay. `constant`: the values as given",
    )
    chunk_size: int = _option(
        256,
        "tokens per chunk of the fused loss (no `[tokens, vocab]` logits are ever built); smaller "
        "saves memory; `0` = the terms from the model's full logits (the plain path)",
    )
    task: str = _option(
        "auto",
        "which form of the regularizers: `causal_lm` (token positions, above), `classification` "
        "(per-example logits and pooled features, see "
        "[docs/guide.md](docs/guide.md#classification-models)); `auto` picks `classification` for a "
        "`*ForSequenceClassification` model, else `causal_lm`",
    )

    @classmethod
    def for_classification(cls, **overrides: object) -> "BALoRAConfig":
        """The spec's NLU defaults (lambda 0.15 / 0.03 / 0.03, k = 5), task "classification"."""
        return cls(**{**CLASSIFICATION_DEFAULTS, "task": "classification", **overrides})

    def __post_init__(self) -> None:
        for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
            value = getattr(self, name)
            _check(
                isinstance(value, (int, float)) and value >= 0,
                f"balora_{name}",
                value,
                "use a number >= 0 (0 turns the term off)",
            )
        _check(
            isinstance(self.temperature, (int, float)) and self.temperature > 0,
            "balora_temperature",
            self.temperature,
            "use a number > 0 (the spec's default is 2.0)",
        )
        _check(
            isinstance(self.diversity_top_k, int) and self.diversity_top_k >= 0,
            "balora_diversity_top_k",
            self.diversity_top_k,
            "use an integer >= 0 (0 means the full vocabulary)",
        )
        _check(
            isinstance(self.svd_top_k, int) and self.svd_top_k >= 1,
            "balora_svd_top_k",
            self.svd_top_k,
            "use an integer >= 1 (set balora_lambda_svd: 0 to turn the term off)",
        )
        _check(
            self.svd_norm in SVD_NORM_CHOICES,
            "balora_svd_norm",
            self.svd_norm,
            f"allowed: {', '.join(SVD_NORM_CHOICES)}",
        )
        _check(
            self.lambda_schedule in SCHEDULE_CHOICES,
            "balora_lambda_schedule",
            self.lambda_schedule,
            f"allowed: {', '.join(SCHEDULE_CHOICES)}",
        )
        _check(
            isinstance(self.chunk_size, int) and self.chunk_size >= 0,
            "balora_chunk_size",
            self.chunk_size,
            "use an integer >= 0 (tokens per chunk of the fused loss; 0 = plain path from full logits)",
        )
        _check(
            self.task in TASK_CHOICES,
            "balora_task",
            self.task,
            f"allowed: {', '.join(TASK_CHOICES)} (auto: classification for a "
            "*ForSequenceClassification model, else causal_lm)",
        )
        parse_init(self.init)
        _check(
            isinstance(self.init_cache, bool) or (isinstance(self.init_cache, str) and self.init_cache.strip()),
            "balora_init_cache",
            self.init_cache,
            "use auto (the default folder), off, or a folder path",
        )

    def init_cache_dir(self) -> str | None:
        """The PiSSA factor cache folder this config asks for (None: off)."""
        if self.init_cache in (False, "off"):
            return None
        return str(default_cache_dir()) if self.init_cache in (True, "auto") else self.init_cache

    @property
    def regularized(self) -> bool:
        """Whether any regularizer has a non-zero weight (else the step is plain PiSSA/LoRA)."""
        return any(
            (self.lambda_consistency, self.lambda_diversity, self.lambda_svd)
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
