"""Supervised workflows through `axolotl train` as users write them, with LoRA, then BA-LoRA:
alpaca with packing, eval, gradient checkpointing and early stopping; chat_template messages
with `lora_modules_to_save`; an MoE model; `torch_compile`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tiny_assets import arithmetic_records, build_tiny_qwen2_moe, write_jsonl
from workflows import WorkflowRun, assert_balora_trained, assert_vanilla_peft_loads, run_both

pytestmark = pytest.mark.slow

MAX_STEPS = 12
EARLY_STOPPING = {
    "sample_packing": True, "sequence_len": 256, "gradient_checkpointing": True,
    "val_set_size": 0.2, "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps", "save_steps": 1,
    "early_stopping_patience": 1, "max_steps": MAX_STEPS, "learning_rate": 0.6,
}
SHARED_EXPERT_AND_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _messages(path: Path) -> Path:
    return write_jsonl([{"messages": [{"role": "user", "content": record["instruction"]},
                                      {"role": "assistant", "content": record["output"]}]}
                        for record in arithmetic_records(64, seed=3)], path)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tiny_dataset, tmp_path_factory) -> dict[str, WorkflowRun]:
    folder = tmp_path_factory.mktemp("sft-runs")
    moe_dir = build_tiny_qwen2_moe(folder / "tiny-qwen2-moe")
    chat = {"path": str(_messages(folder / "messages.jsonl")), "type": "chat_template", "ds_type": "json"}
    workflows = {
        "early-stopping": (tiny_llama_dir, EARLY_STOPPING),
        "chat-template-modules-to-save": (tiny_llama_dir, {"datasets": [chat], "chat_template": "chatml",
                                                           "lora_modules_to_save": ["lm_head"]}),
        "moe": (moe_dir, {"lora_target_linear": None, "lora_target_modules": SHARED_EXPERT_AND_ATTENTION}),
        "torch-compile": (tiny_llama_dir, {"torch_compile": True}),
    }
    return {name: run_both(model, tiny_dataset, folder / name, **overrides)
            for name, (model, overrides) in workflows.items()}


@pytest.mark.parametrize("name", ["early-stopping", "chat-template-modules-to-save", "moe", "torch-compile"])
def test_workflow_trains_with_the_terms_and_saves_the_standard_adapter(runs, name):
    assert_balora_trained(runs[name].balora_logs(), runs[name].out_dir)


def test_early_stopping_keeps_the_best_checkpoints_adapter(runs):
    """Axolotl turns on load_best_model_at_end; the final folder is the best checkpoint's export."""
    run = runs["early-stopping"]
    run.balora_logs()
    states = sorted(run.out_dir.glob("checkpoint-*/trainer_state.json"), key=lambda path: int(path.parent.name[11:]))
    state = json.loads(states[-1].read_text())
    assert state["global_step"] < MAX_STEPS, "the run did not stop early"
    best = Path(state["best_model_checkpoint"])
    assert best.name != states[-1].parent.name  # the best is not simply the last one
    final, kept = load_file(run.out_dir / "adapter_model.safetensors"), load_file(best / "adapter_model.safetensors")
    assert final.keys() == kept.keys()
    assert max((final[key] - kept[key]).abs().max().item() for key in final) <= 1e-6


def test_sft_adapters_load_in_vanilla_peft(runs, tmp_path):
    saved = [run.out_dir for run in runs.values() if run.balora.returncode == 0]
    assert len(saved) == len(runs), "a BA-LoRA run failed (see its own test)"
    assert_vanilla_peft_loads(saved, tmp_path)
