"""BA-LoRA through the real `axolotl train` CLI on a tiny random LLaMA (CPU)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
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


@pytest.mark.parametrize("sample_packing", [False, True], ids=["padded-fp16-default", "packed"])
def test_axolotl_train_balora(tiny_llama_dir, tiny_dataset, tmp_path, sample_packing):
    overrides = {"sample_packing": sample_packing}
    if sample_packing:
        overrides |= {"pad_to_sequence_len": True, "gradient_checkpointing": True}
    else:  # no bf16 / fp16 keys: axolotl's own CPU default, fp16 (step 0 must still be the base model)
        overrides |= {"bf16": None, "fp16": None}
    config = base_config(tiny_llama_dir, tiny_dataset, tmp_path, **overrides)
    result = run_axolotl_train(config, tmp_path)
    logs = _assert_trained_balora(result, tmp_path / "out", lora_r=4)
    assert len(logs) == config["max_steps"]
    if sample_packing:
        assert "gradient checkpointing enabled" in result.stdout + result.stderr
    else:
        assert "Converting modules to torch.float16" in result.stdout + result.stderr


def test_axolotl_loads_the_plugin_by_its_entry_point_without_plugins(tiny_llama_dir, tiny_dataset, tmp_path):
    """axolotl 0.21 registers every installed `axolotl.plugins` entry point: no `plugins:` needed.

    (With `plugins:` as well it is registered under both names, which the other tests run: the
    entry point names it exactly as users list it, so validation sees one class.)
    """
    integrations = importlib.import_module("axolotl.integrations.base")
    if getattr(integrations, "PLUGIN_ENTRY_POINT_GROUP", None) != "axolotl.plugins":
        pytest.skip(f"axolotl {importlib.metadata.version('axolotl')} does not load `axolotl.plugins` "
                    "entry points (0.21 does); list the plugin under `plugins:`")
    config = base_config(tiny_llama_dir, tiny_dataset, tmp_path, plugins=None, max_steps=2)
    assert "plugins" not in config
    logs = _assert_trained_balora(run_axolotl_train(config, tmp_path), tmp_path / "out", lora_r=4)
    assert len(logs) == 2


@pytest.mark.parametrize("plugin_name", ["axolotl_balora", "axolotl_balora.plugin.BALoRAPlugin"])
def test_axolotl_train_with_the_plugin_named_as_users_write_it(tiny_llama_dir, tiny_dataset, tmp_path, plugin_name):
    """The bare package name (axolotl's loader alone splits it at a dot and fails) and the class's
    module path (axolotl 0.21 alone would register it beside the entry point: duplicate base class)
    both train BA-LoRA, through the startup hook in axolotl_balora/plugin_names.py."""
    config = base_config(tiny_llama_dir, tiny_dataset, tmp_path, plugins=[plugin_name], max_steps=2)
    result = run_axolotl_train(config, tmp_path)
    logs = _assert_trained_balora(result, tmp_path / "out", lora_r=4)
    assert len(logs) == 2
    assert f"plugins: {plugin_name!r} read as 'axolotl_balora.BALoRAPlugin'" in result.stdout + result.stderr


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
    """The real pretrained SmolLM2-135M-Instruct: train a few steps, merge-lora, vanilla reload."""
    from prepare_demo import prepare_dataset, prepare_model

    model_dir = prepare_model(REPO_ROOT)
    dataset = prepare_dataset(REPO_ROOT)
    base_hash = _sha256(model_dir / "model.safetensors")
    config = base_config(
        model_dir, dataset, tmp_path,
        lora_target_linear=None, lora_target_modules=["q_proj", "v_proj"],
        max_steps=3, gradient_accumulation_steps=1, micro_batch_size=2, learning_rate=0.002,
    )
    result = run_axolotl_train(config, tmp_path)
    logs = _assert_trained_balora(result, tmp_path / "out", lora_r=4)
    assert len(logs) == 3
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
