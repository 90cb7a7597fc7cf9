"""Axolotl's fused LoRA kernels on BA-LoRA layers, against the unfused forward (in-process).

The kernel entry points are called the way axolotl's patched attention and MLP call them
(`apply_lora_qkv(self_attn, X)`, ...), on a tiny BA-LoRA LLaMA; the MLP kernel with the
test-only CPU stand-in for its Triton activation. The CLI runs are in test_kernels_cli.py.
"""

from __future__ import annotations

import pytest
import torch
from axolotl.kernels import lora as axolotl_kernels
from peft import LoraConfig

from axolotl_balora.core.adapter.layer import stacked_update_factors
from axolotl_balora.core.adapter.pissa_init import apply_balora, lora_layers
from axolotl_balora.patches import kernel_parameters
from cpu_distributed import cpu_activation
from tiny_models import perturb_trainable, tiny_llama

HIDDEN = 32


@pytest.fixture(autouse=True)
def kernels_take_balora_factors():
    kernel_parameters.install()
    cpu_activation.install()


def balora_llama(dropout: float = 0.0):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout)
    return apply_balora(tiny_llama(hidden_size=HIDDEN), config, init="pissa_niter_4")


def hidden_states(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, HIDDEN, generator=generator).to(dtype)


def first_layer(model):
    layer = model.base_model.model.model.layers[0]
    return layer.self_attn, layer.mlp


# (kernel, the same thing through the modules' own forwards) for each kernel axolotl patches in.
PATHS = {
    "qkv": (lambda attn, mlp, x: axolotl_kernels.apply_lora_qkv(attn, x),
            lambda attn, mlp, x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))),
    "o": (lambda attn, mlp, x: (axolotl_kernels.apply_lora_o(attn, x),),
          lambda attn, mlp, x: (attn.o_proj(x),)),
    "mlp": (lambda attn, mlp, x: (axolotl_kernels.apply_lora_mlp_swiglu(mlp, x.clone()),),
            lambda attn, mlp, x: (mlp(x),)),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step0_kernel_output_is_the_pretrained_output_bit_for_bit(path, dtype):
    """Adapters on = adapters off through the same kernel, also with the adapter cast to bf16."""
    model = balora_llama().eval()
    model.to(dtype)
    kernel, _ = PATHS[path]
    attn, mlp = first_layer(model)
    with torch.no_grad():
        on = kernel(attn, mlp, hidden_states(dtype))
        with model.disable_adapter():
            off = kernel(attn, mlp, hidden_states(dtype))
    assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))


@pytest.mark.parametrize("path", list(PATHS))
def test_trained_kernel_matches_the_unfused_forward_and_its_gradients(path):
    model = balora_llama().train()
    perturb_trainable(model)
    kernel, unfused = PATHS[path]
    attn, mlp = first_layer(model)
    results = []
    for forward in (kernel, unfused):
        model.zero_grad(set_to_none=True)
        outputs = forward(attn, mlp, hidden_states())
        sum(output.square().sum() for output in outputs).backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        results.append(([output.detach() for output in outputs], grads))
    (kernel_out, kernel_grads), (plain_out, plain_grads) = results
    for got, expected in zip(kernel_out, plain_out, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert kernel_grads and kernel_grads.keys() == plain_grads.keys()
    assert all(".default." in name for name in kernel_grads)  # only the trainable factors
    for name, grad in kernel_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6)


def test_frozen_factors_get_no_gradient_through_the_kernel():
    model = balora_llama().train()
    perturb_trainable(model)
    attn, mlp = first_layer(model)
    q, k, v = axolotl_kernels.apply_lora_qkv(attn, hidden_states())
    (q.sum() + k.sum() + v.sum()).backward()
    frozen = [buffer for name, buffer in model.named_buffers() if ".balora_init." in name]
    assert frozen and all(not buffer.requires_grad and buffer.grad is None for buffer in frozen)
    assert attn.q_proj.lora_A["default"].weight.grad is not None


def test_stacked_factors_are_the_rank_2r_update_and_none_when_adapters_are_off():
    model = balora_llama()
    perturb_trainable(model)
    _, layer = lora_layers(model)[0]
    a_stacked, b_stacked = stacked_update_factors(layer)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a0, minus_b0 = layer.lora_A["balora_init"].weight, layer.lora_B["balora_init"].weight
    assert a_stacked.shape == (2 * 4, a.shape[1]) and b_stacked.shape == (b.shape[0], 2 * 4)
    torch.testing.assert_close(b_stacked @ a_stacked, b @ a + minus_b0 @ a0, rtol=1e-5, atol=1e-6)
    with model.disable_adapter():
        assert stacked_update_factors(layer) is None
    assert stacked_update_factors(torch.nn.Linear(2, 2)) is None


def test_axolotl_own_lora_models_still_get_axolotl_answer():
    """The wrapper only changes BA-LoRA layers: a plain PEFT LoRA layer gets its own pair."""
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(hidden_size=HIDDEN),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    parameters = axolotl_kernels.get_lora_parameters(q_proj)
    assert parameters[3] is q_proj.lora_A["default"].weight and parameters[4] is q_proj.lora_B["default"].weight


def test_each_projection_kind_a_kernel_computed_is_logged_once_by_its_name(monkeypatch, caplog):
    """The CLI tests read these lines to know which projections the kernels really computed."""
    monkeypatch.setattr(kernel_parameters, "_served", set())
    model = balora_llama().eval()
    kernel_parameters.report_patched_layers(model)
    attn, mlp = first_layer(model)
    with caplog.at_level("INFO", logger=kernel_parameters.LOG.name), torch.no_grad():
        for _ in range(2):
            axolotl_kernels.apply_lora_qkv(attn, hidden_states())
    computed = [r.getMessage() for r in caplog.records if "a fused LoRA kernel computed" in r.getMessage()]
    assert [line.split("computed ")[1].split(" ")[0] for line in computed] == ["q_proj", "k_proj", "v_proj"]
