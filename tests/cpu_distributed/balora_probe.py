"""Test-only axolotl plugin: record what a distributed BA-LoRA run computes, from inside it.

`plugins: [axolotl_balora.BALoRAPlugin, balora_probe.ProbePlugin]` plus the
environment variable BALORA_PROBE_DIR make every rank write, under that folder:

* factors_rank{R}.safetensors: the frozen initial factors (A0, -B0) of every layer,
  as the rank holds them when training starts (after the engine wrapped the model);
* logits_begin.pt (rank 0): {"on", "off"} logits (as float32) of fixed tokens at
  step 0 with the adapters on and off, the dtypes of parameters and of each base tensor, the logits' own, and
  what the engine is (class, ZeRO stage, bf16 on);
* logits_step{N}.pt (rank 0): logits after each checkpoint save, and logits_end.pt
  at the end of training (what the saved adapters must reproduce).

Forwards run on every rank (ZeRO-3 gathers parameters collectively), in eval
mode and without gradient, on the unwrapped model the engine trains.
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

PROBE_TOKENS_SEED = 7
PROBE_TOKENS_SHAPE = (2, 16)


def probe_tokens(vocab_size: int) -> torch.Tensor:
    """The fixed inputs every probe forward (and the tests' reloads) use."""
    generator = torch.Generator().manual_seed(PROBE_TOKENS_SEED)
    return torch.randint(0, vocab_size, PROBE_TOKENS_SHAPE, generator=generator)


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tokens.to(model.device)).logits.float().cpu()
    model.train(was_training)
    return logits


class _ProbeCallback(TrainerCallback):
    def __init__(self, directory: Path, trainer):
        self.directory = directory
        self.trainer = trainer
        self.rank = int(os.environ.get("RANK", "0"))

    def _tokens(self, model) -> torch.Tensor:
        return probe_tokens(model.get_base_model().config.vocab_size)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        frozen = {name: buffer.detach().float().cpu().contiguous()
                  for name, buffer in model.named_buffers() if ".balora_init." in name}
        safetensors.torch.save_file(frozen, self.directory / f"factors_rank{self.rank}.safetensors")
        on = _logits(model, self._tokens(model))
        with model.disable_adapter():
            off = _logits(model, self._tokens(model))
        engine = self.trainer.model_wrapped
        facts = {
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "base_dtypes": {
                name.removeprefix("base_model.model.").replace(".base_layer.", "."): str(tensor.dtype)
                for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                if "lora_" not in name
            },
            "logits_dtype": str(self._raw_dtype(model)),  # a forward: every rank takes part
            "engine": type(engine).__name__,
            "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
            "engine_bf16": engine.bfloat16_enabled() if hasattr(engine, "bfloat16_enabled") else None,
        }
        if self.rank == 0:
            torch.save({"on": on, "off": off, **facts}, self.directory / "logits_begin.pt")

    def _raw_dtype(self, model) -> torch.dtype:
        with torch.no_grad():
            return model(input_ids=self._tokens(model).to(model.device)).logits.dtype

    def on_save(self, args, state, control, model=None, **kwargs):
        logits = _logits(model, self._tokens(model))
        if self.rank == 0:
            torch.save(logits, self.directory / f"logits_step{state.global_step}.pt")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        logits = _logits(model, self._tokens(model))
        if self.rank == 0:
            torch.save(logits, self.directory / "logits_end.pt")


class ProbePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        directory = Path(os.environ["BALORA_PROBE_DIR"])
        directory.mkdir(parents=True, exist_ok=True)
        return [_ProbeCallback(directory, trainer)]
