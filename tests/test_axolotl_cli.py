"""BA-LoRA through the real `axolotl train` CLI on a tiny random LLaMA (CPU)."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from axolotl_cli import REPO_ROOT, base_config, run_axolotl, run_axolotl_train, training_logs

pytestmark = pytest.mark.slow

REGULARIZER_KEYS = [
    "balora/consistency",
    "balora/diversity",
    "balora/svd",
    "balora/lambda_consistency",
    "balora/lambda_diversity",
    "balora/lambda_svd",
]


def _assert_trained_balora(result, out_dir: Path, lora_r: int) -> list[dict[str, float]]:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    logs = training_logs(output)
    assert logs, "no training logs found: " + output[-2000:]
    # Axolotl 0.19 only logs a plugin that fails to import; the terms prove BA-LoRA ran.
    for key in REGULARIZER_KEYS:
        assert key in logs[0], f"{key} missing from {logs[0]}"
    assert abs(logs[0]["balora/consistency"]) < 1e-4
    assert logs[-1]["balora/consistency"] > logs[0]["balora/consistency"]
    assert all(log["balora/diversity"] < 0 and log["balora/svd"] < 0 for log in logs)
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 2 * lora_r
    assert (out_dir / "adapter_model.safetensors").stat().st_size > 0
    return logs


def _reads_plugin_entry_points() -> bool:
    """axolotl 0.21 registers every installed `axolotl.plugins` entry point; 0.19 and 0.20 do not."""
    integrations = importlib.import_module("axolotl.integrations.base")
    return getattr(integrations, "PLUGIN_ENTRY_POINT_GROUP", None) == "axolotl.plugins"


def _assert_plugin_name_was_read(result, plugin_name: str) -> None:
    """The startup hook (axolotl_balora/patches/plugin_names.py) read the name as the plugin's own."""
    assert f"plugins: {plugin_name!r} read as 'axolotl_balora.BALoRAPlugin'" in result.stdout + result.stderr


@pytest.mark.parametrize("sample_packing", [False, True], ids=["padded-fp16-default", "packed"])
def test_axolotl_train_balora(tiny_llama_dir, tiny_dataset, tmp_path, sample_packing):
    """Padded, on axolotl's own CPU default (fp16), with no `plugins:` where axolotl loads the
    entry point (0.21: registered under the name users list, so validation sees one class);
    packed with gradient checkpointing, the plugin listed by its bare package name (axolotl's
    loader alone splits a name at its last dot and fails)."""
    overrides = {"sample_packing": sample_packing}
    if sample_packing:
        overrides |= {"pad_to_sequence_len": True, "gradient_checkpointing": True, "plugins": ["axolotl_balora"]}
    else:  # no bf16 / fp16 keys: axolotl's own CPU default, fp16 (step 0 must still be the base model)
        overrides |= {"bf16": None, "fp16": None}
        if _reads_plugin_entry_points():
            overrides["plugins"] = None
    config = base_config(tiny_llama_dir, tiny_dataset, tmp_path, **overrides)
    result = run_axolotl_train(config, tmp_path)
    logs = _assert_trained_balora(result, tmp_path / "out", lora_r=4)
    assert len(logs) == config["max_steps"]
    if sample_packing:
        assert "gradient checkpointing enabled" in result.stdout + result.stderr
        _assert_plugin_name_was_read(result, "axolotl_balora")
    else:
        assert "Converting modules to torch.float16" in result.stdout + result.stderr


def test_axolotl_refuses_bad_balora_value(tiny_llama_dir, tiny_dataset, tmp_path):
    config = base_config(tiny_llama_dir, tiny_dataset, tmp_path, balora_temperature=0)
    result = run_axolotl_train(config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "balora_temperature: 0 is not allowed" in output
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_balora_on_embedded_smollm2_train_merge_reload(tmp_path):
    """The real pretrained SmolLM2-135M-Instruct: train a few steps, merge-lora, vanilla reload.

    The plugin is listed by its class's module path, which axolotl 0.21 alone would register
    beside the entry point (duplicate base class)."""
    from prepare_demo import prepare_dataset, prepare_model

    model_dir = prepare_model(REPO_ROOT)
    dataset = prepare_dataset(REPO_ROOT)
    base_hash = _sha256(model_dir / "model.safetensors")
    config = base_config(
        model_dir, dataset, tmp_path, plugins=["axolotl_balora.plugin.BALoRAPlugin"],
        lora_target_linear=None, lora_target_modules=["q_proj", "v_proj"],
        max_steps=3, gradient_accumulation_steps=1, micro_batch_size=2, learning_rate=0.002,
    )
    result = run_axolotl_train(config, tmp_path)
    logs = _assert_trained_balora(result, tmp_path / "out", lora_r=4)
    assert len(logs) == 3
    _assert_plugin_name_was_read(result, "axolotl_balora.plugin.BALoRAPlugin")
    assert _sha256(model_dir / "model.safetensors") == base_hash  # the base on disk is never written

    merge = run_axolotl("merge-lora", config, tmp_path)
    assert merge.returncode == 0, (merge.stdout + merge.stderr)[-3000:]
    tokens = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()(tokens).logits
        reloaded_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out"
        ).eval()
        reloaded = reloaded_model(tokens).logits
        with reloaded_model.disable_adapter():
            base = reloaded_model(tokens).logits
    assert (merged - reloaded).abs().max() <= 1e-3
    assert (reloaded - base).abs().max() > 1e-2  # the adapter changed the model
