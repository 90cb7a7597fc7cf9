"""Axolotl's fused LoRA kernels with `adapter: balora`, through the real `axolotl train` CLI (CPU).

Three runs of one config on a tiny LLaMA, 4 steps each:

* `asked`:   lora_qkv_kernel, lora_o_kernel and lora_mlp_kernel set true (the MLP kernel's
             Triton activation replaced by the test-only torch stand-in, tests/cpu_distributed);
* `default`: no kernel keys, as a user writes it: the kernels axolotl would turn on for LoRA;
* `unfused`: every kernel key false: PEFT's forward through BA-LoRA's own layer (the reference).

The probe plugin records logits of fixed tokens with the adapters on and off at step 0 and the
logits the saved adapters must reproduce.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from axolotl_cli import base_config, run_axolotl_train, training_logs
from probe_checks import PROBE, assert_saved_adapters_reproduce_the_run, ok, pretrained_logits

pytestmark = pytest.mark.slow

RUNS = {
    "asked": {"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True},
    "default": {"lora_qkv_kernel": None, "lora_o_kernel": None, "lora_mlp_kernel": None},
    "unfused": {},
}
STAND_IN = "cpu_activation.CPUActivationPlugin"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Fused vs unfused float32 arithmetic over 4 Adam steps at lr 1e-3: the adapters differed by at most
# 6e-7 (all three kernels) and 3e-8 (qkv and o) on axolotl 0.19, 2026-12-05.
TRAINING_TOLERANCE = 1e-5


def served(text: str) -> set[str]:
    """The projections a fused kernel computed, as the plugin logged them."""
    return {name for name in (*ATTENTION, *MLP) if f"a fused LoRA kernel computed {name} " in text}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    results = {}
    for name, keys in RUNS.items():
        workdir = tmp_path_factory.mktemp(name)
        plugins = ["axolotl_balora.BALoRAPlugin", PROBE, *([STAND_IN] if name == "asked" else [])]
        config = base_config(tiny_llama_dir, tiny_dataset, workdir, plugins=plugins, balora_init="pissa",
                             gradient_accumulation_steps=1, save_strategy="steps", save_steps=2, **keys)
        env = {"BALORA_PROBE_DIR": str(workdir / "probe")}  # tests/conftest.py put cpu_distributed on PYTHONPATH
        text = ok(run_axolotl_train(config, workdir, extra_env=env))
        results[name] = {"workdir": workdir, "text": text, "config": config}
    return results


def _adapter(run: dict) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run["workdir"] / "out" / "adapter_model.safetensors")


@pytest.mark.parametrize("name", ["asked", "default"])
def test_kernels_compute_the_balora_update_from_step0_exact_to_the_export(runs, name, tiny_llama_dir, tmp_path):
    run, unfused = runs[name], runs["unfused"]
    expected = {*ATTENTION, *MLP} if name == "asked" else set(ATTENTION)  # no MLP kernel on CPU by default
    assert served(run["text"]) == expected
    assert served(unfused["text"]) == set()
    probe = run["workdir"] / "probe"
    begin = torch.load(probe / "logits_begin.pt")
    assert torch.equal(begin["on"], begin["off"])  # step 0 is the pre-trained model, through the kernels
    torch.testing.assert_close(begin["off"], pretrained_logits(tiny_llama_dir, probe), rtol=1e-5, atol=1e-5)
    logs, reference_logs = training_logs(run["text"]), training_logs(unfused["text"])
    assert len(logs) == len(reference_logs) == run["config"]["max_steps"]
    assert logs[0]["balora/consistency"] == 0.0
    for log, reference in zip(logs, reference_logs):
        for key in ("loss", "balora/consistency", "balora/diversity", "balora/svd"):
            assert abs(log[key] - reference[key]) <= TRAINING_TOLERANCE * max(1.0, abs(reference[key])), key
    got, reference = _adapter(run), _adapter(unfused)
    assert got.keys() == reference.keys()
    assert max((got[key] - reference[key]).abs().max().item() for key in got) <= TRAINING_TOLERANCE
    assert_saved_adapters_reproduce_the_run(run["workdir"], tiny_llama_dir, tmp_path, lora_r=run["config"]["lora_r"])


def test_default_config_reports_the_kernels_axolotl_would_enable_for_lora(runs):
    text = runs["default"]["text"]
    assert "fused LoRA kernels on, as axolotl sets them for adapter: lora: lora_qkv_kernel, lora_o_kernel, " \
           "lora_embedding_kernel" in text
    assert "fused LoRA kernels patched" in text and "fused LoRA kernels patched" not in runs["unfused"]["text"]
