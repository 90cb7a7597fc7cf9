"""The three regularizers against an independent float64 reference (spec section 2).

The reference functions below never call into `axolotl_balora.core.ops.losses`:
they loop over batch and positions, apply the causal shift by hand (position t
is scored when labels[b, t + 1] != -100) and use explicit softmax / KL /
entropy formulas and numpy.linalg.svd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from axolotl_balora.core.ops import losses as losses_module
from axolotl_balora.core.config import BALoRAConfig
from axolotl_balora.core.ops.losses import consistency_kl, diversity_entropy, svd_ratio
from axolotl_balora.core.ops.regularizers import plain_regularizer_terms
from axolotl_balora.core.ops.schedules import Lambdas

IGNORE = -100
BATCH, SEQ, VOCAB = 2, 5, 7


# --------------------------------------------------------------------------- reference


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).cpu().numpy()


def _positions(labels: torch.Tensor, shift: bool = True) -> list[tuple[int, int]]:
    """(b, t) pairs scored by the task loss; shift=False is the authors' (wrong) mask."""
    lab = labels.tolist()
    out = []
    for b in range(len(lab)):
        for t in range(len(lab[b]) - 1 if shift else len(lab[b])):
            target = lab[b][t + 1] if shift else lab[b][t]
            if target != IGNORE:
                out.append((b, t))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = max(x)
    log_norm = m + math.log(sum(math.exp(v - m) for v in x))
    return np.array([v - log_norm for v in x])


def _entropy(x: np.ndarray) -> float:
    lp = _log_softmax(x)
    return -sum(math.exp(l) * l for l in lp)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q))."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def ref_consistency(logits, ref_logits, labels, temperature, shift=True, reverse=False):
    z, r = _np(logits), _np(ref_logits)
    kls = []
    for b, t in _positions(labels, shift):
        model, ref = z[b, t] / temperature, r[b, t] / temperature
        kls.append(_kl(model, ref) if reverse else _kl(ref, model))
    if not kls:
        return 0.0
    return temperature**2 * sum(kls) / len(kls)


def _top_k(row: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= len(row):
        return row
    return np.sort(row)[::-1][:k]


def ref_mean_topk_entropy(logits, labels, top_k, shift=True) -> float:
    z = _np(logits)
    ents = [_entropy(_top_k(z[b, t], top_k)) for b, t in _positions(labels, shift)]
    return sum(ents) / len(ents) if ents else 0.0


def ref_diversity(logits, labels, top_k, shift=True) -> float:
    return -ref_mean_topk_entropy(logits, labels, top_k, shift)


def ref_svd_share(logits, labels, k, norm, shift=True) -> float:
    z = _np(logits)
    pos = _positions(labels, shift)
    if not pos:
        return 0.0
    matrix = np.stack([z[b, t] for b, t in pos])
    sigma = np.linalg.svd(matrix, compute_uv=False)  # decreasing order
    if norm == "nuclear":
        denom = sigma.sum()
    else:
        denom = math.sqrt(sum(v * v for v in matrix.ravel()))
    return float(sigma[:k].sum() / denom)


def ref_svd(logits, labels, k, norm, shift=True) -> float:
    return -ref_svd_share(logits, labels, k, norm, shift)


# --------------------------------------------------------------------------- inputs


def _logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SEQ, VOCAB, generator=gen) * scale


@pytest.fixture
def logits() -> torch.Tensor:
    return _logits(0)


@pytest.fixture
def ref_logits() -> torch.Tensor:
    return _logits(1)


@pytest.fixture
def labels() -> torch.Tensor:
    # Shifted mask scores (0,0),(0,1),(0,3),(1,1),(1,2),(1,3) -> 6 rows.
    # Unshifted mask would score (0,1),(0,2),(0,4),(1,2),(1,3),(1,4): different rows.
    return torch.tensor(
        [
            [IGNORE, 3, 5, IGNORE, 1],
            [IGNORE, IGNORE, 2, 6, 0],
        ]
    )


def _close(value: torch.Tensor, expected: float, tol: float = 1e-5) -> None:
    assert value.dtype == torch.float32
    assert value.shape == ()
    assert math.isfinite(value.item())
    assert value.item() == pytest.approx(expected, rel=tol, abs=tol)


# --------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.7])
def test_consistency_matches_reference(logits, ref_logits, labels, temperature):
    value = consistency_kl(logits, ref_logits, labels, temperature)
    expected = ref_consistency(logits, ref_logits, labels, temperature)
    assert expected > 1e-3
    _close(value, expected)


def test_consistency_applies_causal_shift(logits, ref_logits, labels):
    value = consistency_kl(logits, ref_logits, labels, 2.0).item()
    shifted = ref_consistency(logits, ref_logits, labels, 2.0, shift=True)
    unshifted = ref_consistency(logits, ref_logits, labels, 2.0, shift=False)
    assert abs(shifted - unshifted) > 1e-2
    assert value == pytest.approx(shifted, rel=1e-5)
    assert abs(value - unshifted) > 1e-2


def test_consistency_kl_direction_is_reference_first(labels):
    # Model: peaked; reference: flat. Forward and reverse KL differ a lot.
    logits = torch.zeros(BATCH, SEQ, VOCAB)
    logits[..., 0] = 6.0
    ref_logits = torch.zeros(BATCH, SEQ, VOCAB)
    ref_logits[..., 0] = 0.5
    forward = ref_consistency(logits, ref_logits, labels, 1.0)
    reverse = ref_consistency(logits, ref_logits, labels, 1.0, reverse=True)
    assert abs(forward - reverse) > 0.5
    value = consistency_kl(logits, ref_logits, labels, 1.0).item()
    assert value == pytest.approx(forward, rel=1e-5)
    assert abs(value - reverse) > 0.5


def test_consistency_temperature_squared_factor(logits, ref_logits, labels):
    # Without the T^2 factor: mean KL of the softened distributions.
    t = 2.0
    mean_kl = ref_consistency(logits, ref_logits, labels, t) / t**2
    value = consistency_kl(logits, ref_logits, labels, t).item()
    assert value == pytest.approx(t**2 * mean_kl, rel=1e-5)
    assert abs(value - mean_kl) > 1e-3
    # Scaling all logits by T and using temperature T gives T^2 times the T=1 value.
    at_one = consistency_kl(logits, ref_logits, labels, 1.0).item()
    scaled = consistency_kl(logits * 3.0, ref_logits * 3.0, labels, 3.0).item()
    assert scaled == pytest.approx(9.0 * at_one, rel=1e-5)


def test_consistency_identical_logits_is_zero(logits, labels):
    value = consistency_kl(logits, logits.clone(), labels, 2.0)
    assert value.item() == 0.0


# --------------------------------------------------------------------------- diversity


@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 6])
def test_diversity_matches_reference(logits, labels, top_k):
    value = diversity_entropy(logits, labels, top_k)
    expected = ref_diversity(logits, labels, top_k)
    if top_k > 1:
        assert expected < -1e-3
    _close(value, expected)


def test_diversity_top_k_zero_and_too_large_mean_full_vocab(logits, labels):
    full = ref_diversity(logits, labels, 0)
    partial = ref_diversity(logits, labels, 3)
    assert abs(full - partial) > 1e-2
    for top_k in (0, VOCAB, VOCAB + 1, 1000):
        _close(diversity_entropy(logits, labels, top_k), full)


def test_diversity_applies_causal_shift(logits, labels):
    value = diversity_entropy(logits, labels, 3).item()
    shifted = ref_diversity(logits, labels, 3, shift=True)
    unshifted = ref_diversity(logits, labels, 3, shift=False)
    assert abs(shifted - unshifted) > 1e-2
    assert value == pytest.approx(shifted, rel=1e-5)
    assert abs(value - unshifted) > 1e-2


def test_diversity_descent_step_raises_top_k_entropy(logits, labels):
    top_k = 4
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(diversity_entropy(x, labels, top_k), x)
    assert grad.abs().sum() > 0
    stepped = (logits - 0.1 * grad).detach()
    before = ref_mean_topk_entropy(logits, labels, top_k)
    after = ref_mean_topk_entropy(stepped, labels, top_k)
    assert after > before + 1e-4


# --------------------------------------------------------------------------- svd


@pytest.mark.parametrize("norm", ["frobenius", "nuclear"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_svd_matches_reference(logits, labels, k, norm):
    value = svd_ratio(logits, labels, k, norm)
    expected = ref_svd(logits, labels, k, norm)
    assert expected < -1e-3
    _close(value, expected)


def test_svd_norms_differ(logits, labels):
    frob = svd_ratio(logits, labels, 2, "frobenius").item()
    nuc = svd_ratio(logits, labels, 2, "nuclear").item()
    assert frob == pytest.approx(ref_svd(logits, labels, 2, "frobenius"), rel=1e-5)
    assert nuc == pytest.approx(ref_svd(logits, labels, 2, "nuclear"), rel=1e-5)
    # sum of top-k sigma <= nuclear norm, and ||Z||_F <= nuclear norm.
    assert abs(frob - nuc) > 1e-2
    assert -1.0 <= nuc < 0.0
    assert frob < nuc


def test_svd_unknown_norm_rejected(logits, labels):
    with pytest.raises(ValueError, match="spectral"):
        svd_ratio(logits, labels, 2, "spectral")


def test_svd_k_larger_than_rows_uses_all_singular_values(logits):
    # Only two scored rows: (0, 2) and (1, 0).
    labels = torch.tensor(
        [
            [IGNORE, IGNORE, IGNORE, 4, IGNORE],
            [IGNORE, 1, IGNORE, IGNORE, IGNORE],
        ]
    )
    assert len(_positions(labels)) == 2
    z = _np(logits)
    matrix = np.stack([z[0, 2], z[1, 0]])
    sigma = np.linalg.svd(matrix, compute_uv=False)
    assert len(sigma) == 2
    expected_frob = -sigma.sum() / np.linalg.norm(matrix)
    for k in (2, 10, 100):
        _close(svd_ratio(logits, labels, k, "frobenius"), expected_frob)
        _close(svd_ratio(logits, labels, k, "nuclear"), -1.0)
    # k=1 takes only the largest one, so it differs.
    assert svd_ratio(logits, labels, 1, "frobenius").item() == pytest.approx(
        -sigma[0] / np.linalg.norm(matrix), rel=1e-5
    )
    assert abs(expected_frob + sigma[0] / np.linalg.norm(matrix)) > 1e-2


def test_svd_applies_causal_shift(logits, labels):
    value = svd_ratio(logits, labels, 2, "frobenius").item()
    shifted = ref_svd(logits, labels, 2, "frobenius", shift=True)
    unshifted = ref_svd(logits, labels, 2, "frobenius", shift=False)
    assert abs(shifted - unshifted) > 1e-3
    assert value == pytest.approx(shifted, rel=1e-5)
    assert abs(value - unshifted) > 1e-3


def test_svd_descent_step_raises_top_k_share(logits, labels):
    k = 1
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(svd_ratio(x, labels, k, "frobenius"), x)
    assert grad.abs().sum() > 0
    stepped = (logits - 0.5 * grad).detach()
    before = ref_svd_share(logits, labels, k, "frobenius")
    after = ref_svd_share(stepped, labels, k, "frobenius")
    assert after > before + 1e-4


# --------------------------------------------------------------------------- shared edge cases


def _all_three(logits, ref_logits, labels):
    return {
        "consistency": consistency_kl(logits, ref_logits, labels, 2.0),
        "diversity": diversity_entropy(logits, labels, 3),
        "svd_frobenius": svd_ratio(logits, labels, 2, "frobenius"),
        "svd_nuclear": svd_ratio(logits, labels, 2, "nuclear"),
    }


def test_all_ignored_batch_is_exactly_zero_with_finite_gradient(logits, ref_logits):
    # The only non-ignored labels sit at position 0, which no position predicts
    # after the shift: M is empty (an unshifted mask would not be empty).
    labels = torch.full((BATCH, SEQ), IGNORE)
    labels[:, 0] = 3
    assert _positions(labels) == []
    assert len(_positions(labels, shift=False)) == BATCH
    x = logits.clone().requires_grad_(True)
    for name, value in _all_three(x, ref_logits, labels).items():
        assert value.dtype == torch.float32, name
        assert value.item() == 0.0, name
        assert not torch.isnan(value), name
        other = (x**2).mean()
        (grad,) = torch.autograd.grad(other + value, x)
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, 2 * x.detach() / x.numel())


@pytest.mark.parametrize("name", ["consistency", "diversity", "svd_frobenius", "svd_nuclear"])
def test_gradients_finite_and_only_on_scored_positions(logits, ref_logits, labels, name):
    x = logits.clone().requires_grad_(True)
    value = _all_three(x, ref_logits, labels)[name]
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(grad).all()
    scored = set(_positions(labels))
    for b in range(BATCH):
        for t in range(SEQ):
            norm = grad[b, t].abs().sum().item()
            if (b, t) in scored:
                assert norm > 0, (b, t)
            else:
                assert norm == 0, (b, t)


def test_bf16_logits_computed_in_float32(logits, ref_logits, labels):
    bf16 = logits.to(torch.bfloat16)
    ref_bf16 = ref_logits.to(torch.bfloat16)
    got = _all_three(bf16, ref_bf16, labels)
    upcast = _all_three(bf16.float(), ref_bf16.float(), labels)
    full = _all_three(logits, ref_logits, labels)
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        # Same inputs, float32 arithmetic: matches the upcast computation tightly
        # (bf16 arithmetic would be off by ~1e-2).
        assert value.item() == pytest.approx(upcast[name].item(), rel=1e-5, abs=1e-6), name
        # And close to the result on the original float32 logits.
        assert value.item() == pytest.approx(full[name].item(), rel=2e-2, abs=2e-2), name


def test_bf16_matches_float64_reference(logits, ref_logits, labels):
    bf16 = logits.to(torch.bfloat16)
    ref_bf16 = ref_logits.to(torch.bfloat16)
    _close(consistency_kl(bf16, ref_bf16, labels, 2.0), ref_consistency(bf16, ref_bf16, labels, 2.0))
    _close(diversity_entropy(bf16, labels, 3), ref_diversity(bf16, labels, 3))
    _close(svd_ratio(bf16, labels, 2, "nuclear"), ref_svd(bf16, labels, 2, "nuclear"))


# --------------------------------------------------------------------------- plain_regularizer_terms


def _config(**overrides) -> BALoRAConfig:
    base = dict(
        lambda_consistency=0.1,
        lambda_diversity=0.2,
        lambda_svd=0.3,
        temperature=2.0,
        diversity_top_k=3,
        svd_top_k=2,
        svd_norm="frobenius",
    )
    base.update(overrides)
    return BALoRAConfig(**base)


ALL_ON = Lambdas(consistency=0.1, diversity=0.2, svd=0.3)


def test_terms_values_match_reference(logits, ref_logits, labels):
    terms = plain_regularizer_terms(logits, ref_logits, labels, _config(), ALL_ON)
    assert set(terms.values) == {"consistency", "diversity", "svd"}
    assert terms.skipped == {}
    _close(terms.values["consistency"], ref_consistency(logits, ref_logits, labels, 2.0))
    _close(terms.values["diversity"], ref_diversity(logits, labels, 3))
    _close(terms.values["svd"], ref_svd(logits, labels, 2, "frobenius"))
    expected_sum = (
        0.1 * ref_consistency(logits, ref_logits, labels, 2.0)
        + 0.2 * ref_diversity(logits, labels, 3)
        + 0.3 * ref_svd(logits, labels, 2, "frobenius")
    )
    assert float(terms.weighted_sum(ALL_ON)) == pytest.approx(expected_sum, rel=1e-5)


@pytest.mark.parametrize(
    "off, name",
    [
        ({"lambda_consistency": 0.0}, "consistency"),
        ({"lambda_diversity": 0.0}, "diversity"),
        ({"lambda_svd": 0.0}, "svd"),
    ],
)
def test_config_lambda_zero_term_absent(logits, ref_logits, labels, off, name):
    terms = plain_regularizer_terms(logits, ref_logits, labels, _config(**off), ALL_ON)
    assert name not in terms.values
    assert name not in terms.skipped
    assert set(terms.values) == {"consistency", "diversity", "svd"} - {name}


def test_no_reference_logits_no_consistency(logits, labels):
    terms = plain_regularizer_terms(logits, None, labels, _config(), ALL_ON)
    assert set(terms.values) == {"diversity", "svd"}


def test_scheduled_lambda_zero_computed_without_grad(logits, ref_logits, labels):
    x = logits.clone().requires_grad_(True)
    warmup = Lambdas(consistency=0.1, diversity=0.0, svd=0.0)
    terms = plain_regularizer_terms(x, ref_logits, labels, _config(), warmup)
    assert set(terms.values) == {"consistency", "diversity", "svd"}
    assert terms.values["consistency"].requires_grad is True
    assert terms.values["diversity"].requires_grad is False
    assert terms.values["svd"].requires_grad is False
    # Still real values, for the logs.
    _close(terms.values["diversity"], ref_diversity(logits, labels, 3))
    _close(terms.values["svd"], ref_svd(logits, labels, 2, "frobenius"))
    # Only the consistency term contributes to the weighted sum.
    assert terms.weighted_sum(warmup).detach().item() == pytest.approx(
        0.1 * ref_consistency(logits, ref_logits, labels, 2.0), rel=1e-5
    )


def test_svd_failure_is_skipped_and_counted(logits, ref_logits, labels, monkeypatch):
    calls = []

    def failing_svdvals(*args, **kwargs):
        calls.append(1)
        raise torch.linalg.LinAlgError("injected: SVD did not converge")

    monkeypatch.setattr(losses_module.torch.linalg, "svdvals", failing_svdvals)
    x = logits.clone().requires_grad_(True)
    terms = plain_regularizer_terms(x, ref_logits, labels, _config(), ALL_ON)
    assert calls == [1]
    assert terms.skipped == {"svd": 1}
    assert "svd" not in terms.values
    assert set(terms.values) == {"consistency", "diversity"}
    assert terms.values["diversity"].requires_grad
    _close(terms.values["diversity"], ref_diversity(logits, labels, 3))


def test_non_finite_reference_skipped_and_counted(logits, ref_logits, labels):
    bad_ref = ref_logits.clone()
    bad_ref[0, 0, 2] = float("inf")  # (0, 0) is a scored position
    assert (0, 0) in _positions(labels)
    terms = plain_regularizer_terms(logits, bad_ref, labels, _config(), ALL_ON)
    assert terms.skipped == {"consistency": 1}
    assert not torch.isfinite(terms.values["consistency"])  # kept for its flag, never in the loss
    for name in ("diversity", "svd"):
        assert torch.isfinite(terms.values[name])
    expected = ALL_ON.diversity * terms.values["diversity"] + ALL_ON.svd * terms.values["svd"]
    _close(terms.weighted_sum(ALL_ON), expected.item())


def test_non_finite_logits_skipped_and_counted(logits, ref_logits, labels):
    bad = logits.clone()
    bad[1, 2, 4] = float("nan")  # (1, 2) is a scored position
    assert (1, 2) in _positions(labels)
    config = _config(lambda_consistency=0.0, lambda_svd=0.0)
    terms = plain_regularizer_terms(bad, ref_logits, labels, config, ALL_ON)
    assert terms.skipped == {"diversity": 1}
    assert terms.weighted_sum(ALL_ON) == 0


def test_non_finite_at_unscored_position_is_harmless(logits, ref_logits, labels):
    bad = logits.clone()
    bad[0, 2, 0] = float("nan")  # labels[0, 3] is ignored: (0, 2) is not scored
    assert (0, 2) not in _positions(labels)
    terms = plain_regularizer_terms(bad, ref_logits, labels, _config(), ALL_ON)
    assert terms.skipped == {}
    assert set(terms.values) == {"consistency", "diversity", "svd"}
