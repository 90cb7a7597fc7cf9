"""resume_from_checkpoint through the real `axolotl train` CLI: same result, clear refusals."""

from __future__ import annotations

import pytest
import safetensors.torch

from axolotl_cli import base_config, resume_after_step2, run_axolotl_train, training_logs

pytestmark = pytest.mark.slow

# Same seed, same batches, CPU: the resumed run should match to float rounding.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = base_config(
        tiny_llama_dir, tiny_dataset, workdir, max_steps=4, save_strategy="steps", save_steps=2,
        balora_lambda_schedule="paper",
    )
    result = run_axolotl_train(config, workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return config, workdir, training_logs(result.stdout + result.stderr)


def _resume(uninterrupted, tmp_path, **overrides):
    config, workdir, _ = uninterrupted
    resumed, output = resume_after_step2(config, workdir / "out", tmp_path, **overrides)
    return run_axolotl_train(resumed, tmp_path), output


def test_resumed_run_matches_uninterrupted_run(uninterrupted, tmp_path):
    _, workdir, full_logs = uninterrupted
    result, output = _resume(uninterrupted, tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    expected = safetensors.torch.load_file(workdir / "out" / "adapter_model.safetensors")
    got = safetensors.torch.load_file(output / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= TOLERANCE
    resumed_logs = training_logs(result.stdout + result.stderr)
    assert len(resumed_logs) == 2
    for key in ("balora/consistency", "balora/diversity", "balora/svd", "balora/lambda_consistency"):
        assert resumed_logs[-1][key] == pytest.approx(full_logs[-1][key], rel=1e-3, abs=1e-6), key


def test_resume_with_another_adapter_config_is_refused(uninterrupted, tmp_path):
    """Another rank and another init at once: the refusal names every difference."""
    result, output = _resume(uninterrupted, tmp_path, lora_r=8, balora_init="gaussian")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot resume" in text, text[-3000:]
    assert "r: checkpoint 4, config 8" in text and "balora_init: checkpoint 'pissa', config 'gaussian'" in text
    assert not (output / "adapter_model.safetensors").exists()
