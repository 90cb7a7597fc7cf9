"""The one-update forward of the trainable + frozen factors against PEFT's own two-adapter forward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from axolotl_balora.core.adapter.layer import BALoRALinear
from axolotl_balora.core.adapter.pissa_init import apply_balora, lora_layers
from tiny_models import ARCHITECTURES, TARGETS, perturb_trainable, token_batch


def _model(arch: str, dropout: float = 0.0):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=dropout,
                        fan_in_fan_out=arch == "gpt2")
    return apply_balora(ARCHITECTURES[arch](), config, init="pissa_niter_4")


def _with_peft_forward(model):
    """The same model, its layers back on PEFT's generic per-adapter loop (the reference)."""
    reference = copy.deepcopy(model)
    for _, layer in lora_layers(reference):
        if type(layer) is BALoRALinear:
            layer.__class__ = LoraLinear
    return reference


def _logits_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_layers_take_the_one_update_forward(arch):
    layers = [layer for _, layer in lora_layers(_model(arch))]
    assert layers and all(type(layer) is BALoRALinear for layer in layers)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_step0_is_the_pretrained_model_bit_for_bit(arch, adapter_dtype):
    model = _model(arch).eval()
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(adapter_dtype)
    tokens = token_batch()
    with torch.no_grad():
        adapter_on = model(tokens).logits
        with model.disable_adapter():
            adapter_off = model(tokens).logits
    assert torch.equal(adapter_on, adapter_off)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_values_and_gradients_equal_peft_forward_after_training(arch):
    model = _model(arch).eval()  # GPT-2's own dropout off; gradients flow in eval mode too
    perturb_trainable(model)
    reference = _with_peft_forward(model)
    tokens = token_batch()
    logits, grads = _logits_and_grads(model, tokens)
    ref_logits, ref_grads = _logits_and_grads(reference, tokens)
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max() <= 1e-5 * ref_grads[name].abs().max() + 1e-12, name


def test_dropout_applies_to_the_trained_factors_only():
    """Same dropout draws as PEFT: the trainable path sees dropout(x), the frozen one x."""
    model = _model("llama", dropout=0.5).train()
    perturb_trainable(model)
    reference = _with_peft_forward(model)
    tokens = token_batch()
    torch.manual_seed(3)
    logits, _ = _logits_and_grads(model, tokens)
    torch.manual_seed(3)
    ref_logits, _ = _logits_and_grads(reference, tokens)
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()


def test_disabled_adapters_fall_back_to_peft():
    model = _model("llama").eval()
    perturb_trainable(model)
    tokens = token_batch()
    with torch.no_grad(), model.disable_adapter():
        off = model(tokens).logits
        off_peft = _with_peft_forward(model)(tokens).logits
    with torch.no_grad():
        on = model(tokens).logits
    assert torch.equal(off, off_peft) and not torch.allclose(on, off)
