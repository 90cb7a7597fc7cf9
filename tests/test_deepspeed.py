"""DeepSpeed ZeRO-2 / ZeRO-3 through the real `axolotl train` CLI on 2 CPU ranks.

The real DeepSpeed (CPU accelerator, gloo) runs under torchrun; the only change is
the test-only patch in tests/cpu_distributed (accelerate's CPU/DeepSpeed selection,
transformers' bf16 check). A probe plugin records, inside the run, the frozen
factors each rank holds and logits of fixed tokens at step 0, after each save and
at the end; the tests compare those with an unsharded build, with the pre-trained
model and with vanilla PEFT loading what the run saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from axolotl_cli import (
    base_config,
    resume_after_step2,
    run_axolotl_on_cpu_ranks,
    run_axolotl_train,
    training_logs,
)
from fused_vs_plain import (
    FUSED_SETTINGS,
    assert_fused_equals_plain,
    assert_sharded_head_took_the_fused_path,
    plain_config,
)
from probe_checks import (
    PROBE,
    assert_factors_match_unsharded,
    assert_saved_adapters_reproduce_the_run,
    ok,
    pretrained_logits,
)

pytestmark = pytest.mark.slow

TERMS = ("balora/consistency", "balora/diversity", "balora/svd")
# A resumed run vs the uninterrupted one: same batches, same optimizer state, float32.
RESUME_TOLERANCE = 1e-5
# Two ranks' terms averaged vs one process averaging the same two micro-batches.
LOG_RELATIVE_TOLERANCE = 1e-4


def zero_json(directory: Path, stage: int, bf16: bool | str = False, persistence_threshold: int | None = None) -> Path:
    """A DeepSpeed config as users write them ("auto" where the HF Trainer fills values).

    `persistence_threshold` 0 partitions every parameter under ZeRO-3: the tiny head (400 x 64) is
    below the default threshold, which would keep it whole on every rank."""
    zero = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}
    if persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    config = {
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    path = directory / f"zero{stage}.json"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def deepspeed_run(config: dict, workdir: Path):
    probe = workdir / "probe"
    result = run_axolotl_on_cpu_ranks(config, workdir, "deepspeed", extra_env={"BALORA_PROBE_DIR": str(probe)})
    return result, probe


def uninterrupted_run(stage: int, tiny_llama_dir, tiny_dataset, tmp_path_factory) -> dict:
    """4 steps on 2 ranks in float32, checkpoints at steps 2 and 4, on the fused loss path (under
    ZeRO-3 with the output layer partitioned)."""
    workdir = tmp_path_factory.mktemp(f"zero{stage}")
    config = base_config(
        tiny_llama_dir, tiny_dataset, workdir, plugins=["axolotl_balora.BALoRAPlugin", PROBE],
        deepspeed=str(zero_json(workdir, stage, persistence_threshold=0 if stage == 3 else None)),
        balora_init="pissa", gradient_accumulation_steps=1, save_strategy="steps", save_steps=2, **FUSED_SETTINGS,
    )
    result, probe = deepspeed_run(config, workdir)
    text = ok(result)
    return {"stage": stage, "config": config, "workdir": workdir, "probe": probe, "text": text,
            "logs": training_logs(text)}


@pytest.fixture(scope="module")
def uninterrupted_zero2(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    return uninterrupted_run(2, tiny_llama_dir, tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted_zero3(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    return uninterrupted_run(3, tiny_llama_dir, tiny_dataset, tmp_path_factory)


@pytest.fixture(params=[2, 3], ids=["zero2", "zero3"])
def uninterrupted(request):
    """The uninterrupted run of each ZeRO stage (each runs once per module)."""
    return request.getfixturevalue(f"uninterrupted_zero{request.param}")


@pytest.fixture(scope="module")
def single_process_logs(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    """One process seeing each step's two micro-batches (accumulation 2) that two ranks split."""
    workdir = tmp_path_factory.mktemp("single")
    config = base_config(tiny_llama_dir, tiny_dataset, workdir, balora_init="pissa", **FUSED_SETTINGS)
    return training_logs(ok(run_axolotl_train(config, workdir)))


@pytest.fixture(scope="module")
def plain_zero3(uninterrupted_zero3, tmp_path_factory):
    """The uninterrupted ZeRO-3 run's first 2 steps on the plain loss path (ZeRO-2 keeps the
    output layer whole: nothing to gather)."""
    workdir = tmp_path_factory.mktemp("plain-zero3")
    result, _ = deepspeed_run(plain_config(uninterrupted_zero3["config"], workdir), workdir)
    return {"workdir": workdir, "text": ok(result)}


def test_zero3_partitioned_head_takes_the_fused_path(uninterrupted_zero3, plain_zero3):
    assert_sharded_head_took_the_fused_path(uninterrupted_zero3, plain_zero3)


def test_zero3_fused_path_equals_the_plain_path(uninterrupted_zero3, plain_zero3):
    assert_fused_equals_plain(uninterrupted_zero3, plain_zero3)


def test_every_rank_holds_the_unsharded_factors(uninterrupted, tiny_llama_dir):
    out = uninterrupted["workdir"] / "out"
    assert_factors_match_unsharded(uninterrupted["probe"], tiny_llama_dir, out / "balora_state", exact=True)
    begin = torch.load(uninterrupted["probe"] / "logits_begin.pt")
    assert begin["engine"] == "DeepSpeedEngine" and begin["zero_stage"] == uninterrupted["stage"]
    assert begin["dtypes"] == ["torch.float32"] and begin["engine_bf16"] is False
    for rank in (0, 1):  # the ranks split the 14 target layers (ZeRO-3: gathered two at a time)
        assert f"rank {rank} of 2 took 7 of 14 layers" in uninterrupted["text"]
    # tests/cpu_distributed: DeepSpeed neither compiled nor loaded its CPU shared-memory op
    assert "deepspeed_shm_comm" not in uninterrupted["text"]


def test_checkpoints_and_final_adapter_load_in_vanilla_peft(uninterrupted, tiny_llama_dir, tmp_path):
    assert_saved_adapters_reproduce_the_run(uninterrupted["workdir"], tiny_llama_dir, tmp_path,
                                            lora_r=uninterrupted["config"]["lora_r"])


def test_logged_terms_are_the_mean_over_ranks(uninterrupted, single_process_logs):
    logs = uninterrupted["logs"]
    assert len(logs) == len(single_process_logs) == 4
    for step, (got, expected) in enumerate(zip(logs, single_process_logs), start=1):
        for key in TERMS[1:]:  # consistency starts at ~0: compared in absolute terms below
            assert got[key] == pytest.approx(expected[key], rel=LOG_RELATIVE_TOLERANCE), (step, key)
        assert got[TERMS[0]] == pytest.approx(expected[TERMS[0]], rel=1e-2, abs=1e-7), step


def _resume(uninterrupted, tmp_path: Path, **overrides):
    config, output = resume_after_step2(uninterrupted["config"], uninterrupted["workdir"] / "out", tmp_path,
                                        **overrides)
    result, _ = deepspeed_run(config, tmp_path)
    return result, output


def test_resumed_run_ends_with_the_uninterrupted_adapter(uninterrupted, tmp_path):
    result, output = _resume(uninterrupted, tmp_path)
    logs = training_logs(ok(result))
    assert len(logs) == 2  # steps 3 and 4 only
    expected = safetensors.torch.load_file(uninterrupted["workdir"] / "out" / "adapter_model.safetensors")
    got = safetensors.torch.load_file(output / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= RESUME_TOLERANCE


# The check compares the checkpoint's balora_state/ with the model's PEFT config whatever the
# engine (tests/test_resume.py: one process); here on a ZeRO-3 partitioned model.
@pytest.mark.parametrize("uninterrupted", [3], ids=["zero3"], indirect=True)
def test_resume_with_another_adapter_is_refused(uninterrupted, tmp_path):
    """Another rank and another init at once: the refusal names every difference."""
    result, output = _resume(uninterrupted, tmp_path, lora_r=8, balora_init="pissa_niter_4")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot resume" in text, text[-3000:]
    assert "r: checkpoint 4, config 8" in text and "balora_init: checkpoint 'pissa', config 'pissa_niter_4'" in text
    assert not (output / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("bf16", "weights_dtype"),
    # "auto": the HF Trainer turns the engine's bf16 on, but axolotl builds the model inside
    # zero.Init before that, which partitions it in float32 (a float32 base under a bf16
    # engine). True: zero.Init partitions it in bfloat16.
    [("auto", "torch.float32"), (True, "torch.bfloat16")],
    ids=["fp32-base", "bf16-base"],
)
def test_zero3_bf16_engine_step0_is_the_pretrained_model(tiny_llama_dir, tiny_dataset, tmp_path, bf16,
                                                         weights_dtype):
    config = base_config(
        tiny_llama_dir, tiny_dataset, tmp_path, plugins=["axolotl_balora.BALoRAPlugin", PROBE],
        deepspeed=str(zero_json(tmp_path, 3, bf16=bf16)), bf16=True, balora_init="pissa_niter_4",
        max_steps=1, save_strategy="no",
    )
    result, probe = deepspeed_run(config, tmp_path)
    ok(result)
    begin = torch.load(probe / "logits_begin.pt")
    assert begin["engine_bf16"] is True and begin["zero_stage"] == 3
    assert weights_dtype in begin["dtypes"]
    scale = begin["off"].abs().max()
    assert (begin["on"] - begin["off"]).abs().max() <= 1e-6 * scale
    assert torch.equal(begin["off"], pretrained_logits(tiny_llama_dir, probe))
    assert_factors_match_unsharded(probe, tiny_llama_dir, tmp_path / "out" / "balora_state", exact=False)
