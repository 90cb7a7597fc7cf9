"""Lambda schedules and BALoRAConfig validation (spec section 2)."""

from __future__ import annotations

import math

import pytest

from axolotl_balora.core.config import BALoRAConfig, parse_init
from axolotl_balora.core.ops.schedules import lambdas_at

L1, L2, L3 = 0.025, 0.005, 0.004
TOTAL = 1000


def _paper(**overrides) -> BALoRAConfig:
    base = dict(lambda_consistency=L1, lambda_diversity=L2, lambda_svd=L3, lambda_schedule="paper")
    base.update(overrides)
    return BALoRAConfig(**base)


# --------------------------------------------------------------------------- paper schedule


def test_paper_consistency_start_mid_end():
    config = _paper()
    assert lambdas_at(config, 0, TOTAL).consistency == pytest.approx(L1, rel=1e-12)
    assert lambdas_at(config, TOTAL // 2, TOTAL).consistency == pytest.approx(0.55 * L1, rel=1e-12)
    assert lambdas_at(config, TOTAL, TOTAL).consistency == pytest.approx(0.1 * L1, rel=1e-12)
    # Past the end: stays at the floor.
    assert lambdas_at(config, 2 * TOTAL, TOTAL).consistency == pytest.approx(0.1 * L1, rel=1e-12)


@pytest.mark.parametrize("step", [0, 100, 250, 400, 600, 800, 1000])
def test_paper_consistency_is_cosine(step):
    progress = step / TOTAL
    expected = L1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lambdas_at(_paper(), step, TOTAL).consistency == pytest.approx(expected, rel=1e-12)


def test_paper_consistency_decreases_monotonically():
    values = [lambdas_at(_paper(), s, TOTAL).consistency for s in range(0, TOTAL + 1, 50)]
    assert all(a > b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "step, factor",
    [
        (0, 0.0),
        (100, 0.0),
        (199, 0.0),
        (200, 0.0),
        (210, 0.2),
        (225, 0.5),
        (240, 0.8),
        (250, 1.0),
        (260, 1.0),
        (500, 1.0),
        (1000, 1.0),
    ],
)
def test_paper_diversity_and_svd_warmup(step, factor):
    lambdas = lambdas_at(_paper(), step, TOTAL)
    assert lambdas.diversity == pytest.approx(factor * L2, abs=1e-15, rel=1e-9)
    assert lambdas.svd == pytest.approx(factor * L3, abs=1e-15, rel=1e-9)


def test_paper_zero_total_steps_is_safe():
    for step in (0, 5):
        lambdas = lambdas_at(_paper(), step, 0)
        assert lambdas.consistency == pytest.approx(L1)
        assert lambdas.diversity == 0.0
        assert lambdas.svd == 0.0


def test_paper_zero_config_lambda_stays_zero():
    config = _paper(lambda_diversity=0.0)
    assert lambdas_at(config, 500, TOTAL).diversity == 0.0
    assert lambdas_at(config, 500, TOTAL).svd == pytest.approx(L3)


# --------------------------------------------------------------------------- constant schedule


@pytest.mark.parametrize("step, total", [(0, TOTAL), (100, TOTAL), (500, TOTAL), (TOTAL, TOTAL), (3, 0)])
def test_constant_schedule(step, total):
    lambdas = lambdas_at(_paper(lambda_schedule="constant"), step, total)
    assert (lambdas.consistency, lambdas.diversity, lambdas.svd) == (L1, L2, L3)


def test_defaults_are_spec_values():
    config = BALoRAConfig()
    assert (config.lambda_consistency, config.lambda_diversity, config.lambda_svd) == (0.025, 0.005, 0.005)
    assert (config.temperature, config.diversity_top_k, config.svd_top_k) == (2.0, 20, 10)
    assert (config.svd_norm, config.init, config.lambda_schedule) == ("frobenius", "pissa", "paper")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, key, bad, allowed",
    [
        ({"lambda_consistency": -0.1}, "balora_lambda_consistency", "-0.1", [">= 0"]),
        ({"lambda_diversity": -1}, "balora_lambda_diversity", "-1", [">= 0"]),
        ({"lambda_svd": -0.005}, "balora_lambda_svd", "-0.005", [">= 0"]),
        ({"temperature": 0}, "balora_temperature", "0", ["> 0"]),
        ({"temperature": -2.0}, "balora_temperature", "-2.0", ["> 0"]),
        ({"diversity_top_k": -1}, "balora_diversity_top_k", "-1", [">= 0"]),
        ({"svd_top_k": 0}, "balora_svd_top_k", "0", [">= 1"]),
        ({"svd_norm": "spectral"}, "balora_svd_norm", "'spectral'", ["frobenius", "nuclear"]),
        ({"lambda_schedule": "linear"}, "balora_lambda_schedule", "'linear'", ["paper", "constant"]),
        ({"init": "lora"}, "balora_init", "'lora'", ["pissa", "pissa_niter_N", "gaussian"]),
        ({"init": "pissa_niter_0"}, "balora_init", "'pissa_niter_0'", ["pissa", "N >= 1", "gaussian"]),
        ({"init": "pissa_niter_x"}, "balora_init", "'pissa_niter_x'", ["pissa_niter_N", "gaussian"]),
    ],
)
def test_bad_value_message(kwargs, key, bad, allowed):
    with pytest.raises(ValueError) as info:
        BALoRAConfig(**kwargs)
    message = str(info.value)
    assert key in message
    assert bad in message
    for word in allowed:
        assert word in message, (word, message)


@pytest.mark.parametrize("name", ["lambda_consistency", "lambda_diversity", "lambda_svd"])
def test_zero_lambda_is_valid(name):
    config = BALoRAConfig(**{name: 0.0})
    assert getattr(config, name) == 0.0


def test_regularized_flag():
    assert BALoRAConfig().regularized is True
    assert (
        BALoRAConfig(lambda_consistency=0, lambda_diversity=0, lambda_svd=0).regularized is False
    )


@pytest.mark.parametrize(
    "init, parsed",
    [
        ("pissa", ("pissa", None)),
        ("pissa_niter_4", ("pissa", 4)),
        ("pissa_niter_16", ("pissa", 16)),
        ("gaussian", ("gaussian", None)),
    ],
)
def test_valid_inits_accepted(init, parsed):
    assert BALoRAConfig(init=init).init == init
    assert parse_init(init) == parsed


def test_pissa_niter_zero_refused():
    with pytest.raises(ValueError, match="pissa_niter_0"):
        BALoRAConfig(init="pissa_niter_0")
    with pytest.raises(ValueError, match="balora_init"):
        parse_init("pissa_niter_0")


@pytest.mark.parametrize("top_k", [0, 1, 20, 50000])
def test_valid_diversity_top_k(top_k):
    assert BALoRAConfig(diversity_top_k=top_k).diversity_top_k == top_k


@pytest.mark.parametrize("norm", ["frobenius", "nuclear"])
def test_valid_norms(norm):
    assert BALoRAConfig(svd_norm=norm).svd_norm == norm
