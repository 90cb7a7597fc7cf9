"""Axolotl workflows as users write them, run with `adapter: lora` and with `adapter: balora`.

Each workflow is a YAML (built on `axolotl_cli.base_config`) that trains with plain LoRA
first, so a failure of the BA-LoRA run is BA-LoRA's and not the config's.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from axolotl_cli import base_config, run_axolotl_train, training_logs
from vanilla_peft import vanilla_peft_logits_of_each

TERM_KEYS = ("balora/consistency", "balora/diversity", "balora/svd", "balora/task_loss",
             "balora/lambda_consistency", "balora/lambda_diversity", "balora/lambda_svd")


def as_lora(config: dict[str, Any]) -> dict[str, Any]:
    """The same YAML with `adapter: lora`, without the plugin and its keys."""
    return {**{key: value for key, value in config.items()
               if not key.startswith("balora_") and key != "plugins"}, "adapter": "lora"}


@dataclass
class WorkflowRun:
    """The LoRA and the BA-LoRA run of one workflow."""

    lora: subprocess.CompletedProcess
    balora: subprocess.CompletedProcess
    out_dir: Path

    def balora_logs(self) -> list[dict[str, float]]:
        """BA-LoRA's training logs, once both runs are known to have passed."""
        for name, result in (("lora", self.lora), ("balora", self.balora)):
            assert result.returncode == 0, f"adapter: {name}: {(result.stdout + result.stderr)[-4000:]}"
        return training_logs(self.balora.stdout + self.balora.stderr)


def run_both(model_dir: Path, dataset: Path, workdir: Path, lora_steps: int = 2, **overrides: Any) -> WorkflowRun:
    """Train the workflow with LoRA (`lora_steps` steps: it only has to train), then with BA-LoRA."""
    balora = base_config(model_dir, dataset, workdir / "balora", **overrides)
    lora = as_lora({**balora, "output_dir": str(workdir / "lora" / "out"), "max_steps": lora_steps})
    return WorkflowRun(run_axolotl_train(lora, workdir / "lora"), run_axolotl_train(balora, workdir / "balora"),
                       workdir / "balora" / "out")


def assert_balora_trained(logs: list[dict[str, float]], out_dir: Path, lora_r: int = 4) -> None:
    """The terms were logged (BA-LoRA ran, from the exact reference at step 0) and the saved
    adapter is the standard rank-2r export."""
    assert logs, "no training logs"
    for key in TERM_KEYS:
        assert key in logs[0], f"{key} missing from {logs[0]}"
    assert abs(logs[0]["balora/consistency"]) < 1e-4
    assert logs[-1]["balora/consistency"] > logs[0]["balora/consistency"]
    weights = load_file(out_dir / "adapter_model.safetensors")
    assert {tensor.shape[0] for name, tensor in weights.items() if "lora_A" in name} == {2 * lora_r}


def assert_vanilla_peft_loads(out_dirs: list[Path], workdir: Path) -> None:
    """Every adapter loads with plain PEFT onto the base its config names (in one fresh interpreter
    that never imports this package) and changes that base model's logits."""
    bases = [Path(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"])
             for out in out_dirs]
    tokens = torch.randint(4, 256, (1, 16), generator=torch.Generator().manual_seed(0))  # within the byte alphabet
    logits = vanilla_peft_logits_of_each(list(zip(bases, out_dirs)), tokens, workdir)
    for base_dir, out, adapted in zip(bases, out_dirs, logits):
        with torch.no_grad():
            base = AutoModelForCausalLM.from_pretrained(base_dir).eval()(tokens).logits
        assert torch.isfinite(adapted).all(), out
        assert (adapted - base).abs().max() > 1e-4, f"{out}: the adapter does not change the base model"
