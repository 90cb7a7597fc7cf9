"""BA-LoRA on a 4-bit (bitsandbytes NF4) base, on bitsandbytes' CPU backend.

The PiSSA factors must come from the dequantized weight, whatever dtype holds
the packed bytes (PEFT's PiSSA reads a float-stored 4-bit weight as a float
matrix); the quantized base must never change; the reference forward must be
the quantized base model exactly.

bitsandbytes' CPU backend repacks a 4-bit weight in place (with bf16 block
scales) on its first eval-mode forward without grad, a different numeric path;
the comparisons here therefore run every forward in train mode (the tiny
LLaMA has no dropout), as the trainer's own forwards do. Hidden size 64 keeps
each weight a whole number of 64-value quantization blocks.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from axolotl_balora.core.config import BALoRAConfig
from axolotl_balora.core.adapter.pissa_init import apply_balora, lora_layers, principal_factors
from axolotl_balora.core.adapter.names import TRAINABLE_ADAPTER
from tiny_models import perturb_trainable, BALoRATrainer, tiny_llama, token_batch, token_dataset
from vanilla_peft import vanilla_peft_logits

STORAGES = {"uint8": torch.uint8, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _nf4_model(base_dir: Path, storage: torch.dtype):
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage,
    )
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, dtype=torch.float32).train()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-base")
    tiny_llama(hidden_size=64).save_pretrained(directory)
    return directory


def _packed_weights(model) -> dict[str, torch.Tensor]:
    """The packed 4-bit tensors; their storage dtype is kept (bytes read as bf16 can be NaN)."""
    return {name: module.weight.data.clone() for name, module in model.named_modules()
            if hasattr(getattr(module, "weight", None), "quant_state")}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGES)
def test_factors_come_from_the_dequantized_weight(base_dir, storage):
    model = _nf4_model(base_dir, STORAGES[storage])
    packed = _packed_weights(model)
    assert packed and all(w.dtype == STORAGES[storage] for w in packed.values())
    peft_model = apply_balora(model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    layers = lora_layers(peft_model)
    assert len(layers) == len(packed)
    for _, layer in layers:
        base = layer.get_base_layer()
        dense = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        b0, a0 = principal_factors(dense, rank=4, scaling=1.0)
        assert torch.allclose(layer.lora_B[TRAINABLE_ADAPTER].weight, b0, atol=1e-6)
        assert torch.allclose(layer.lora_A[TRAINABLE_ADAPTER].weight, a0, atol=1e-6)
        # A float-stored packed tensor is (n/2/itemsize, 1): treated as a float weight its
        # "factors" would not even have the layer's shape.
        assert base.weight.shape != dense.shape


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_reference_is_the_quantized_base_and_training_leaves_it_untouched(base_dir, tmp_path, storage):
    tokens = token_batch()
    with torch.no_grad():
        quantized_logits = _nf4_model(base_dir, STORAGES[storage])(tokens).logits
    model = apply_balora(_nf4_model(base_dir, STORAGES[storage]),
                         LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    before = _packed_weights(model)
    with torch.no_grad():
        assert (model(tokens).logits - quantized_logits).abs().max() < 1e-5  # step 0 = the 4-bit base
    trainer = BALoRATrainer(
        model=model, balora_config=BALoRAConfig(lambda_schedule="constant"),
        args=_training_args(tmp_path), train_dataset=token_dataset(8, 12, seed=3, prompt_length=lambda r: 2),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "balora/consistency" in entry]
    assert logs and logs[-1]["balora/consistency"] > 0
    after = _packed_weights(model)
    assert before.keys() == after.keys()
    assert all(_same_bytes(before[name], after[name]) for name in before)
    model.train()  # the Trainer leaves it so; see the module docstring
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(tokens).logits, quantized_logits)
    with torch.no_grad():
        tuned = model(tokens).logits
    assert (tuned - quantized_logits).abs().max() > 1e-3  # training moved the adapter


def test_export_applies_to_the_saved_nf4_checkpoint(base_dir, tmp_path):
    nf4_dir = tmp_path / "nf4"
    _nf4_model(base_dir, torch.uint8).save_pretrained(nf4_dir)
    model = apply_balora(AutoModelForCausalLM.from_pretrained(nf4_dir),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb_trainable(model)
    tokens = token_batch()
    with torch.no_grad():
        expected = model.train()(tokens).logits  # from_pretrained returns eval mode: see the docstring
    model.save_pretrained(tmp_path / "adapter")
    reloaded = vanilla_peft_logits(nf4_dir, tmp_path / "adapter", tokens, tmp_path / "reload", mode="train")
    assert (reloaded - expected).abs().max() <= 1e-4


def _training_args(tmp_path: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        optim="sgd", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False,
    )


@pytest.mark.slow
def test_axolotl_train_on_a_prequantized_nf4_base(tiny_llama_dir, tiny_dataset, tmp_path):
    """The documented QLoRA route: `python -m axolotl_balora.quantize`, then `axolotl train`."""
    import subprocess
    import sys

    from axolotl_cli import base_config, run_axolotl_train
    from test_axolotl_cli import _assert_trained_balora, _sha256

    nf4_dir = tmp_path / "nf4"
    subprocess.run([sys.executable, "-m", "axolotl_balora.quantize", str(tiny_llama_dir), str(nf4_dir),
                    "--compute-dtype", "float32", "--quant-storage", "bfloat16", "--device", "cpu"], check=True)
    weights_hash = _sha256(nf4_dir / "model.safetensors")
    config = base_config(nf4_dir, tiny_dataset, tmp_path, gradient_checkpointing=True)
    result = run_axolotl_train(config, tmp_path)
    _assert_trained_balora(result, tmp_path / "out", lora_r=4)
    assert _sha256(nf4_dir / "model.safetensors") == weights_hash
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    tuned = vanilla_peft_logits(nf4_dir, tmp_path / "out", tokens, tmp_path / "reload", mode="train")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(nf4_dir).train()(tokens).logits
    assert (tuned - base).abs().max() > 1e-4  # the trained adapter applies to the 4-bit checkpoint
    layer = AutoModelForCausalLM.from_pretrained(nf4_dir).model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"


def test_load_in_4bit_is_refused_with_the_working_route():
    from axolotl_balora.args import BALoRAArgs

    with pytest.raises(ValueError, match="load_in_4bit.*python -m axolotl_balora.quantize"):
        BALoRAArgs.model_validate({"adapter": "balora", "load_in_4bit": True})


def test_quantize_refuses_bad_arguments_before_loading(tmp_path):
    from axolotl_balora.quantize import quantize_to_nf4

    with pytest.raises(ValueError, match="quant_storage 'int4'"):
        quantize_to_nf4("unused", tmp_path / "out", quant_storage="int4")
    with pytest.raises(ValueError, match="compute_dtype 'uint8'"):
        quantize_to_nf4("unused", tmp_path / "out", compute_dtype="uint8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken exists"):
        quantize_to_nf4("unused", tmp_path / "taken")
