"""DeepSpeed ZeRO-2 / ZeRO-3 through the real `axolotl train` CLI on 2 CPU ranks.

The real DeepSpeed (CPU accelerator, gloo) runs under torchrun; the only change is
the test-only patch in tests/cpu_distributed (accelerate's CPU/DeepSpeed selection,
transformers' bf16 check). A probe plugin records, inside the run, the frozen
factors each rank holds and logits of fixed tokens at step 0, after each save and
at the end; the tests compare those with an unsharded build, with the pre-trained
model and with vanilla PEFT loading what the run saved.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from axolotl_balora.core.init import apply_balora
from axolotl_cli import base_config, run_axolotl_on_cpu_ranks, run_axolotl_train, training_logs
from cpu_distributed.balora_probe import probe_tokens
from vanilla_peft import vanilla_peft_logits

pytestmark = pytest.mark.slow

PROBE = "balora_probe.ProbePlugin"
TERMS = ("balora/consistency", "balora/diversity", "balora/svd")
# Vanilla PEFT on the rank-2r export vs the trained model, float32 (the bound).
EXPORT_TOLERANCE = 1e-4
# A resumed run vs the uninterrupted one: same batches, same optimizer state, float32.
RESUME_TOLERANCE = 1e-5
# Two ranks' terms averaged vs one process averaging the same two micro-batches.
LOG_RELATIVE_TOLERANCE = 1e-4
# Axolotl turns fp16 on by itself where no bf16 GPU is found; these runs are float32.
FLOAT32 = {"bf16": False, "fp16": False}


def zero_json(directory: Path, stage: int, bf16: bool | str = False) -> Path:
    """A DeepSpeed config as users write them ("auto" where the HF Trainer fills values)."""
    config = {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
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


def _ok(result) -> str:
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    return text


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """As each rank runs: LAPACK's and the matmuls' last bits depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrained_as_run_held_it(model_dir: Path, probe: Path) -> torch.nn.Module:
    """The pre-trained model with each tensor in the dtype the run held it in.

    Axolotl casts buffers too (the rotary frequencies) in a bf16 run.
    """
    dtypes = torch.load(probe / "logits_begin.pt")["base_dtypes"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor.data = tensor.data.to(getattr(torch, dtypes[name].removeprefix("torch.")))
    return model


def pretrained_logits(model_dir: Path, probe: Path) -> torch.Tensor:
    model = pretrained_as_run_held_it(model_dir, probe)
    with one_thread(), torch.no_grad():
        return model(probe_tokens(model.config.vocab_size)).logits.float()


def unsharded_factors(model_dir: Path, probe: Path, state_dir: Path) -> dict[str, torch.Tensor]:
    """The frozen factors one process builds from the same base and the saved adapter layout."""
    saved = json.loads((state_dir / "adapter_config.json").read_text())
    init = json.loads((state_dir / "balora.json").read_text())["init"]
    config = LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], lora_dropout=0.0,
                        target_modules=saved["target_modules"], task_type=saved["task_type"])
    with one_thread():
        model = apply_balora(pretrained_as_run_held_it(model_dir, probe), config, init=init)
    return {name: buffer.float() for name, buffer in model.named_buffers() if ".balora_init." in name}


def assert_factors_match_unsharded(probe: Path, model_dir: Path, state_dir: Path, exact: bool) -> None:
    ranks = [safetensors.torch.load_file(probe / f"factors_rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # bit-identical across ranks
    expected = unsharded_factors(model_dir, probe, state_dir)
    assert expected.keys() == ranks[0].keys()
    for name, value in expected.items():
        if exact:
            assert torch.equal(ranks[0][name], value), name
        else:
            assert torch.allclose(ranks[0][name], value, rtol=0, atol=1e-5 * value.abs().max()), name


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def uninterrupted(request, tiny_llama_dir, tiny_dataset, tmp_path_factory):
    """4 steps on 2 ranks in float32, checkpoints at steps 2 and 4."""
    stage = request.param
    workdir = tmp_path_factory.mktemp(f"zero{stage}")
    config = base_config(
        tiny_llama_dir, tiny_dataset, workdir, plugins=["axolotl_balora.BALoRAPlugin", PROBE],
        deepspeed=str(zero_json(workdir, stage)), balora_init="pissa", gradient_accumulation_steps=1,
        save_strategy="steps", save_steps=2, **FLOAT32,
    )
    result, probe = deepspeed_run(config, workdir)
    return {"stage": stage, "config": config, "workdir": workdir, "probe": probe,
            "logs": training_logs(_ok(result))}


@pytest.fixture(scope="module")
def single_process_logs(tiny_llama_dir, tiny_dataset, tmp_path_factory):
    """One process seeing each step's two micro-batches (accumulation 2) that two ranks split."""
    workdir = tmp_path_factory.mktemp("single")
    config = base_config(tiny_llama_dir, tiny_dataset, workdir, balora_init="pissa", **FLOAT32)
    return training_logs(_ok(run_axolotl_train(config, workdir)))


def test_every_rank_holds_the_unsharded_factors(uninterrupted, tiny_llama_dir):
    out = uninterrupted["workdir"] / "out"
    assert_factors_match_unsharded(uninterrupted["probe"], tiny_llama_dir, out / "balora_state", exact=True)
    begin = torch.load(uninterrupted["probe"] / "logits_begin.pt")
    assert begin["engine"] == "DeepSpeedEngine" and begin["zero_stage"] == uninterrupted["stage"]
    assert begin["dtypes"] == ["torch.float32"] and begin["engine_bf16"] is False


def test_checkpoints_and_final_adapter_load_in_vanilla_peft(uninterrupted, tiny_llama_dir, tmp_path):
    out, probe = uninterrupted["workdir"] / "out", uninterrupted["probe"]
    tokens = probe_tokens(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config.vocab_size)
    for adapter_dir, trained in [(out / "checkpoint-2", probe / "logits_step2.pt"),
                                 (out, probe / "logits_end.pt")]:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["r"] == 2 * uninterrupted["config"]["lora_r"]
        reloaded = vanilla_peft_logits(tiny_llama_dir, adapter_dir, tokens, tmp_path / adapter_dir.name)
        difference = (reloaded - torch.load(trained)).abs().max().item()
        assert difference <= EXPORT_TOLERANCE, (adapter_dir, difference)
    begin = torch.load(probe / "logits_begin.pt")
    assert (torch.load(probe / "logits_end.pt") - begin["on"]).abs().max() > 1e-3  # training moved it


def test_logged_terms_are_the_mean_over_ranks(uninterrupted, single_process_logs):
    logs = uninterrupted["logs"]
    assert len(logs) == len(single_process_logs) == 4
    for step, (got, expected) in enumerate(zip(logs, single_process_logs), start=1):
        for key in TERMS[1:]:  # consistency starts at ~0: compared in absolute terms below
            assert got[key] == pytest.approx(expected[key], rel=LOG_RELATIVE_TOLERANCE), (step, key)
        assert got[TERMS[0]] == pytest.approx(expected[TERMS[0]], rel=1e-2, abs=1e-7), step


def _resume(uninterrupted, tmp_path: Path, **overrides):
    source = uninterrupted["workdir"] / "out" / "checkpoint-2"
    output = tmp_path / "out"
    output.mkdir(parents=True)
    # What a run interrupted right after its step-2 checkpoint leaves behind.
    shutil.copytree(source, output / "checkpoint-2")
    config = {**uninterrupted["config"], "output_dir": str(output),
              "resume_from_checkpoint": str(output / "checkpoint-2"), **overrides}
    result, _ = deepspeed_run(config, tmp_path)
    return result, output


def test_resumed_run_ends_with_the_uninterrupted_adapter(uninterrupted, tmp_path):
    result, output = _resume(uninterrupted, tmp_path)
    logs = training_logs(_ok(result))
    assert len(logs) == 2  # steps 3 and 4 only
    expected = safetensors.torch.load_file(uninterrupted["workdir"] / "out" / "adapter_model.safetensors")
    got = safetensors.torch.load_file(output / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= RESUME_TOLERANCE


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"lora_r": 8}, "r: checkpoint 4, config 8"),
     ({"balora_init": "pissa_niter_4"}, "balora_init: checkpoint 'pissa', config 'pissa_niter_4'")],
    ids=["other-rank", "other-init"],
)
def test_resume_with_another_adapter_is_refused(uninterrupted, tmp_path, overrides, message):
    result, output = _resume(uninterrupted, tmp_path, **overrides)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot resume" in text and message in text, text[-3000:]
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
    _ok(result)
    begin = torch.load(probe / "logits_begin.pt")
    assert begin["engine_bf16"] is True and begin["zero_stage"] == 3
    assert weights_dtype in begin["dtypes"]
    scale = begin["off"].abs().max()
    assert (begin["on"] - begin["off"]).abs().max() <= 1e-6 * scale
    assert torch.equal(begin["off"], pretrained_logits(tiny_llama_dir, probe))
    assert_factors_match_unsharded(probe, tiny_llama_dir, tmp_path / "out" / "balora_state", exact=False)
