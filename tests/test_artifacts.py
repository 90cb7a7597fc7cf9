"""What a BA-LoRA run leaves behind works with the vanilla tools: merge-lora, inference."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from axolotl_cli import base_config, run_axolotl, run_axolotl_train

pytestmark = pytest.mark.slow

# The merge adds s*BA into W once in float32; the unmerged model applies it per forward.
MERGE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained_run(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    config = base_config(tiny_llama_dir, tiny_dataset, workdir, learning_rate=0.01)
    result = run_axolotl_train(config, workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return config, workdir


def _logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens).logits


def test_axolotl_merge_lora_matches_trained_model(trained_run, tiny_llama_dir):
    config, workdir = trained_run
    result = run_axolotl("merge-lora", config, workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(workdir / "out" / "merged", dtype=torch.float32)
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), workdir / "out"
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokens = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    merged_logits, trained_logits = _logits(merged, tokens), _logits(trained, tokens)
    assert (merged_logits - trained_logits).abs().max() <= MERGE_TOLERANCE
    assert (merged_logits - _logits(base, tokens)).abs().max() > 100 * MERGE_TOLERANCE  # it did train


def test_axolotl_inference_loads_the_adapter_and_generates(trained_run):
    config, workdir = trained_run
    result = run_axolotl(
        "inference", config, workdir, ["--lora-model-dir", str(workdir / "out")],
        stdin="Ana has 3 apples and gets 4 more. How many apples now?\n",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("Give me an instruction") >= 2  # answered one prompt, asked for the next
