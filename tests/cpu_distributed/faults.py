"""Test-only axolotl plugin: SIGKILL one rank at a chosen point of a run, with no clean-up.

`plugins: [..., faults.FaultPlugin]` with BALORA_FAULT set to

* `step:N` — the rank dies as training step N begins (checkpoints before it are complete);
* `save:N` — the rank dies in the middle of writing `checkpoint-N`: after the adapters are
  written, before the optimizer, RNG and trainer state (so the folder is torn);

and BALORA_FAULT_RANK (default 1) naming the global rank that dies. The other ranks are
left in a collective; torchrun's agent stops them, as it would on a cluster.
"""

from __future__ import annotations

import os
import signal

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


def _fault() -> tuple[str, int] | None:
    value = os.environ.get("BALORA_FAULT")
    if not value:
        return None
    kind, _, step = value.partition(":")
    if kind not in ("step", "save") or not step.isdigit():
        raise ValueError(f"BALORA_FAULT: {value!r}; use step:N or save:N")
    return kind, int(step)


def _this_rank_dies() -> bool:
    return int(os.environ.get("RANK", "0")) == int(os.environ.get("BALORA_FAULT_RANK", "1"))


def _die(where: str) -> None:
    print(f"[faults] rank {os.environ.get('RANK', '0')}: SIGKILL {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and _this_rank_dies():
            _die(f"as step {self.step} begins")


class FaultPlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        fault = _fault()
        return [_KillAtStep(fault[1])] if fault and fault[0] == "step" else []

    def post_trainer_create(self, cfg, trainer):
        fault = _fault()
        if not fault or fault[0] != "save" or not _this_rank_dies():
            return
        save_optimizer = trainer._save_optimizer_and_scheduler

        def save_then_maybe_die(output_dir):
            if trainer.state.global_step == fault[1]:
                _die(f"while writing {output_dir} (adapters written, optimizer and trainer state not)")
            return save_optimizer(output_dir)

        trainer._save_optimizer_and_scheduler = save_then_maybe_die
