"""PiSSA-style init: exact pre-trained reference, step-0 equality, what trains and what never changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from axolotl_balora.core.adapter.names import FROZEN_ADAPTER, TRAINABLE_ADAPTER
from axolotl_balora.core.adapter.pissa_init import (
    activate_balora_adapters,
    apply_balora,
    check_frozen_factors_active,
    lora_layers,
    principal_factors,
)
from tiny_models import ARCHITECTURES, TARGETS, token_batch
from tiny_models import tiny_llama as tiny_llama_model

INITS = ["pissa", "pissa_niter_4", "gaussian"]
TOLERANCE = 1e-5


def _lora_config(arch: str, **kwargs) -> LoraConfig:
    fan_in_fan_out = arch == "gpt2"
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out, **kwargs,
    )


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture
def saved_base(arch, tmp_path):
    """The pre-trained model on disk, so the reference can be loaded fresh."""
    model = ARCHITECTURES[arch]()
    model.save_pretrained(tmp_path)
    return tmp_path


def _fresh_logits(saved_base, tokens):
    fresh = AutoModelForCausalLM.from_pretrained(saved_base, dtype=torch.float32).eval()
    with torch.no_grad():
        return fresh(tokens).logits


@pytest.mark.parametrize("init", INITS)
def test_reference_and_step0_equal_pretrained(arch, saved_base, init):
    tokens = token_batch()
    expected = _fresh_logits(saved_base, tokens)
    model = apply_balora(
        AutoModelForCausalLM.from_pretrained(saved_base, dtype=torch.float32),
        _lora_config(arch), init=init,
    ).eval()
    with torch.no_grad():
        adapter_on = model(tokens).logits
        with model.disable_adapter():
            adapter_off = model(tokens).logits
        adapter_on_again = model(tokens).logits
    assert (adapter_off - expected).abs().max() <= TOLERANCE
    assert (adapter_on - expected).abs().max() <= TOLERANCE
    assert torch.equal(adapter_on, adapter_on_again)


@pytest.mark.parametrize("niter", [None, 4])
def test_principal_factors_reconstruct_best_rank_r(niter):
    # A decaying spectrum, like trained weights; randomized SVD with q=r is only
    # accurate there (on a flat random spectrum it is not, by design).
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 16, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    spectrum = 10.0 * 0.5 ** torch.arange(16, dtype=torch.float64)
    weight = ((u * spectrum) @ v.T).float()
    rank, scaling = 4, 2.0
    b0, a0 = principal_factors(weight, rank, scaling, niter=niter)
    u, s, vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    got = (scaling * b0 @ a0).double().numpy()
    # Randomized SVD is approximate by design; 4 power iterations get it within 1e-3 here.
    assert np.abs(got - best).max() < (1e-3 if niter else 1e-5)
    assert b0.dtype == torch.float32 and a0.shape == (rank, 16) and b0.shape == (24, rank)


def test_randomized_factors_are_deterministic_and_leave_global_rng_alone():
    weight = torch.randn(32, 20)
    torch.manual_seed(123)
    first = principal_factors(weight, 4, 1.0, niter=2)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    second = principal_factors(weight, 4, 1.0, niter=2)
    after_second = torch.rand(3)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert torch.equal(after_first, after_second)


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.bfloat16])
def test_step0_exact_when_only_adapter_parameters_are_cast(arch, saved_base, adapter_dtype):
    """axolotl 0.21 (CPU) and DeepSpeed's bf16 engine cast parameters but not buffers."""
    tokens = token_batch()
    model = apply_balora(
        AutoModelForCausalLM.from_pretrained(saved_base, dtype=torch.float32),
        _lora_config(arch), init="pissa_niter_4",
    ).eval()
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(adapter_dtype)
    with torch.no_grad():
        adapter_on = model(tokens).logits
        with model.disable_adapter():
            adapter_off = model(tokens).logits
    scale = adapter_off.abs().max()
    assert (adapter_on - adapter_off).abs().max() <= 1e-6 * scale
    assert torch.equal(adapter_off, _fresh_logits(saved_base, tokens))


def test_bf16_model_computes_factors_in_float32(saved_base, arch):
    model = AutoModelForCausalLM.from_pretrained(saved_base, dtype=torch.bfloat16)
    peft_model = apply_balora(model, _lora_config(arch), init="pissa")
    name, layer = lora_layers(peft_model)[0]
    weight = layer.get_base_layer().weight.float()
    if arch == "gpt2":
        weight = weight.T
    b0, a0 = principal_factors(weight, 4, layer.scaling[TRAINABLE_ADAPTER])
    got_a = layer.lora_A[TRAINABLE_ADAPTER].weight
    # PEFT keeps adapter weights in float32 on a bf16 base; the factors are stored as computed.
    assert torch.allclose(got_a.float(), a0.to(got_a.dtype).float(), atol=1e-6), name


def test_only_trainable_factors_get_gradients(arch):
    model = apply_balora(ARCHITECTURES[arch](), _lora_config(arch), init="pissa")
    model.train()
    tokens = token_batch()
    model(tokens, labels=tokens).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable and all(f"lora_A.{TRAINABLE_ADAPTER}." in n or f"lora_B.{TRAINABLE_ADAPTER}." in n
                             for n in trainable)
    frozen = [n for n, _ in model.named_buffers() if FROZEN_ADAPTER in n]
    assert len(frozen) == 2 * len(lora_layers(model))
    assert not any(FROZEN_ADAPTER in n for n, _ in model.named_parameters())


def test_disabling_adapters_never_unfreezes_the_initial_factors(arch):
    model = apply_balora(ARCHITECTURES[arch](), _lora_config(arch), init="pissa")
    trainable_before = [n for n, p in model.named_parameters() if p.requires_grad]
    with model.disable_adapter():
        pass
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable_before
    check_frozen_factors_active(model)


def test_deactivated_frozen_factors_are_detected_and_repairable(arch):
    model = apply_balora(ARCHITECTURES[arch](), _lora_config(arch), init="pissa")
    model.set_adapter(TRAINABLE_ADAPTER)
    with pytest.raises(RuntimeError, match="frozen initial factors"):
        check_frozen_factors_active(model)
    activate_balora_adapters(model)
    check_frozen_factors_active(model)


def test_dropout_applies_to_trainable_path_only(arch):
    model = apply_balora(ARCHITECTURES[arch](), _lora_config(arch) , init="pissa")
    _, layer = lora_layers(model)[0]
    assert isinstance(layer.lora_dropout[FROZEN_ADAPTER], torch.nn.Identity)


def test_dora_is_refused(arch):
    with pytest.raises(NotImplementedError, match="DoRA"):
        apply_balora(ARCHITECTURES[arch](), _lora_config(arch, use_dora=True))


@pytest.mark.parametrize("init", ["pissa", "gaussian"])
def test_modules_to_save_stay_trainable(init):
    model = apply_balora(
        tiny_llama_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                       modules_to_save=["lm_head"]), init=init,
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save.default" in n for n in trainable)
    with model.disable_adapter():
        pass
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
