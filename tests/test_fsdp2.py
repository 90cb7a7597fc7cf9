"""FSDP2 (`fsdp_version: 2`) through the real `axolotl train` CLI on 2 CPU ranks.

Axolotl's own FSDP2 code (its loader, `fsdp2_prepare_model`, its final save) runs
over gloo; the only change is the test-only patch in tests/cpu_distributed
(accelerate's FSDP selection for CPU ranks, axolotl's literal "cuda" devices).
"""

from __future__ import annotations

import pytest
import torch

from axolotl_cli import base_config, run_axolotl_on_cpu_ranks
from probe_checks import FLOAT32, PROBE, assert_factors_match_unsharded, assert_saved_adapters_reproduce_the_run, ok

pytestmark = pytest.mark.slow

FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "offload_params": False,
        "state_dict_type": "FULL_STATE_DICT",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "reshard_after_forward": True,
    },
}


def test_fsdp2_final_adapter_is_the_standard_export(tiny_llama_dir, tiny_dataset, tmp_path):
    """Axolotl saves the final FSDP2 adapter itself; it must be the rank-2r export too."""
    config = base_config(
        tiny_llama_dir, tiny_dataset, tmp_path, plugins=["axolotl_balora.BALoRAPlugin", PROBE],
        balora_init="pissa", gradient_accumulation_steps=1, save_strategy="steps", save_steps=2,
        **FSDP2, **FLOAT32,
    )
    result = run_axolotl_on_cpu_ranks(config, tmp_path, "fsdp", extra_env={"BALORA_PROBE_DIR": str(tmp_path / "probe")})
    text = ok(result)
    begin = torch.load(tmp_path / "probe" / "logits_begin.pt")
    assert begin["engine"].startswith("FSDP") and begin["dtypes"] == ["torch.float32"]
    assert_factors_match_unsharded(tmp_path / "probe", tiny_llama_dir, tmp_path / "out" / "balora_state", exact=True)
    assert_saved_adapters_reproduce_the_run(tmp_path, tiny_llama_dir, tmp_path, lora_r=config["lora_r"])
    assert "saving the FSDP2 final adapter" in text
