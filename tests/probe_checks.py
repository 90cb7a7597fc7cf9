"""Checks shared by the multi-rank CLI tests: what a probed run held vs what it should.

The probe plugin (tests/cpu_distributed/balora_probe.py) records, inside an
`axolotl train` run, the frozen factors of each rank and logits of fixed tokens;
these helpers compare them with an unsharded build, the pre-trained model and
vanilla PEFT loading what the run saved.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from axolotl_balora.core.adapter.pissa_init import apply_balora
from cpu_distributed.balora_probe import probe_tokens
from vanilla_peft import vanilla_peft_logits

PROBE = "balora_probe.ProbePlugin"
# Vanilla PEFT on the rank-2r export vs the trained model, float32.
EXPORT_TOLERANCE = 1e-4


def ok(result) -> str:
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


def assert_saved_adapters_reproduce_the_run(workdir: Path, model_dir: Path, tmp_path: Path, lora_r: int) -> None:
    """checkpoint-2 and the final output_dir, loaded by vanilla PEFT, give the run's own logits."""
    out, probe = workdir / "out", workdir / "probe"
    tokens = probe_tokens(AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size)
    for adapter_dir, trained in [(out / "checkpoint-2", probe / "logits_step2.pt"), (out, probe / "logits_end.pt")]:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["r"] == 2 * lora_r, adapter_dir
        assert (adapter_dir / "balora_state" / "balora.json").is_file(), adapter_dir
        reloaded = vanilla_peft_logits(model_dir, adapter_dir, tokens, tmp_path / adapter_dir.name)
        difference = (reloaded - torch.load(trained)).abs().max().item()
        assert difference <= EXPORT_TOLERANCE, (adapter_dir, difference)
    begin = torch.load(probe / "logits_begin.pt")
    assert (torch.load(probe / "logits_end.pt") - begin["on"]).abs().max() > 1e-3  # training moved it
