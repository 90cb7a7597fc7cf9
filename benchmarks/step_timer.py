"""An Axolotl plugin for benchmarks: per-step wall time and the process's peak memory.

Listed in every row's YAML by `overhead_cli.py` (plain LoRA and BA-LoRA alike, so
the rows differ only in their adapter keys). At the end of training it writes
`<output_dir>/step_timer.json`: each optimizer step's seconds (from the callback's
step begin to its step end: forward, backward, optimizer), the peak RSS of the
training process (CPU) or the peak allocated CUDA memory, and the RSS when the
trainer started (after model load and adapter init).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

RESULT_FILE = "step_timer.json"


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimerCallback(TrainerCallback):
    """Times optimizer steps; the file is written by the main process only."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.step_times: list[float] = []
        self.started: float | None = None
        self.train_begin_rss = 0.0
        self.peak_at_train_begin = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin_rss = _rss_mib()
        self.peak_at_train_begin = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        if self.started is not None:
            self.step_times.append(time.perf_counter() - self.started)
        self.started = None

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        result = {
            "step_times_s": self.step_times,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_at_train_begin_mib": self.peak_at_train_begin,
            "rss_at_train_begin_mib": self.train_begin_rss,
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))


class StepTimerPlugin(BasePlugin):
    """`plugins: [step_timer.StepTimerPlugin]` with benchmarks/ on PYTHONPATH."""

    def add_callbacks_pre_trainer(self, cfg, model):
        return [StepTimerCallback(cfg.output_dir)]
