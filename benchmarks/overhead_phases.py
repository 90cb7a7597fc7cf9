"""Where BA-LoRA's extra time and memory go: a per-phase breakdown of one training run.

One process per row (default glibc allocator, as users run). A sampler thread reads
/proc/self/status every 2 ms and keeps, per phase, the peak RSS (anonymous and file-
backed); each phase also records its wall time and glibc's heap statistics at its end
(mallinfo2: bytes in use, bytes free but kept in the heap, bytes in mmapped blocks).
Phases: model load, adapter build (PEFT LoRA, or the BA-LoRA init), then per step the
trained forward, the reference forward, the fused loss, backward and the optimizer.

    python benchmarks/overhead_phases.py --rows lora pissa balora-fused --steps 3 \\
        --out outputs/benchmarks/overhead-phases.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

import axolotl_balora.core.training.loss_paths as loss_paths_module
from overhead import DEFAULT_INIT, ROW_BUILDERS, load_model, random_batch, smollm2_spec

PHASES = ("load", "adapter", "compute_loss (whole)", "trained forward", "reference forward", "fused loss", "backward", "optimizer")


MODEL_LOSS_ROWS = ("lora", "pissa")  # their loss is the model's own: compute_loss is the forward


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def heap_mib() -> dict[str, float]:
    """glibc's view: in use, free but kept (fragmentation), mmapped (returned on free)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"heap_in_use": info.uordblks / 2**20, "heap_free_kept": info.fordblks / 2**20,
            "mmapped": info.hblkhd / 2**20}


def _status_mib() -> dict[str, float]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                name, value, _ = line.split()
                fields[name.rstrip(":")] = int(value) / 1024
    return fields


class PhaseRecorder:
    """Wall time, peak RSS and end-of-phase heap statistics per phase label."""

    def __init__(self) -> None:
        self.current = "start"
        self.seconds: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.heap_at_end: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._note()

    def _note(self) -> None:
        peaks = self.peaks[self.current]
        for name, value in _status_mib().items():
            peaks[name] = max(peaks[name], value)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer, self.current = self.current, name
        started = time.perf_counter()
        try:
            yield
        finally:
            self._note()
            self.seconds[name] += time.perf_counter() - started
            self.heap_at_end[name] = heap_mib()
            self.current = outer

    def __enter__(self) -> PhaseRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _instrument(recorder: PhaseRecorder) -> None:
    """Label the trainer's forwards and its fused loss (wrapping the names its fused path calls)."""
    hidden_states = loss_paths_module.final_hidden_states
    fused_terms = loss_paths_module.fused_regularizer_terms

    def timed_hidden_states(*args: Any, **kwargs: Any):
        name = "trained forward" if torch.is_grad_enabled() else "reference forward"
        with recorder.phase(name):
            return hidden_states(*args, **kwargs)

    def timed_fused_terms(*args: Any, **kwargs: Any):
        with recorder.phase("fused loss"):
            return fused_terms(*args, **kwargs)

    loss_paths_module.final_hidden_states = timed_hidden_states
    loss_paths_module.fused_regularizer_terms = timed_fused_terms


def run_row(row: str, batch: int, seq: int, steps: int, init: str) -> dict[str, Any]:
    """Load, build, 1 + `steps` steps; the phases of the timed steps are averaged per step."""
    torch.manual_seed(0)
    with PhaseRecorder() as warmup, tempfile.TemporaryDirectory() as output_dir:
        with warmup.phase("load"):
            model = load_model(smollm2_spec("sdpa"), "cpu")
        with warmup.phase("adapter"):
            built = ROW_BUILDERS[row](model, init, output_dir)
        trainable = [p for p in built.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        data = random_batch(model.config.vocab_size, batch, seq, 0, "cpu")
        recorder = warmup
        step_seconds = []
        for step in range(steps + 1):
            if step == 1:
                recorder = PhaseRecorder().__enter__()
                _instrument(recorder)
            started = time.perf_counter()
            # The LoRA / terms-off rows call the model inside compute_loss: that is their forward.
            label = "trained forward" if row in MODEL_LOSS_ROWS or step == 0 else "compute_loss (whole)"
            with recorder.phase(label):
                loss = built.loss(data)
            with recorder.phase("backward"):
                loss.backward()
            with recorder.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if step > 0:
                step_seconds.append(time.perf_counter() - started)
        recorder.__exit__()
    phases = {}
    for name in PHASES:
        source = warmup if name in ("load", "adapter") else recorder
        if name not in source.seconds:
            continue
        divisor = 1 if source is warmup else steps
        phases[name] = {"seconds": source.seconds[name] / divisor, "peak": dict(source.peaks[name]),
                        "heap_at_end": source.heap_at_end[name]}
    return {"row": row, "loss_path": built.loss_path(), "step_seconds": step_seconds, "phases": phases}


def markdown(results: list[dict[str, Any]]) -> str:
    """One table: seconds per phase (per step for the step phases) and each phase's peak RSS."""
    lines = ["| row | phase | seconds | peak RSS MiB (anon + file) | heap free but kept MiB at end |",
             "|---|---|---|---|---|"]
    for result in results:
        for name, phase in result["phases"].items():
            peak = phase["peak"]
            lines.append(
                f"| {result['row']} | {name} | {phase['seconds']:.2f} | {peak.get('VmRSS', 0):.0f} "
                f"({peak.get('RssAnon', 0):.0f} + {peak.get('RssFile', 0):.0f}) "
                f"| {phase['heap_at_end']['heap_free_kept']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROW_BUILDERS), default=["lora", "pissa", "balora-fused"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    parser.add_argument("--init", default=DEFAULT_INIT)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_row(args.worker, args.batch, args.seq, args.steps, args.init)))
        return
    results = []
    for row in args.rows:  # each row in a fresh interpreter: peak RSS is per process
        command = [sys.executable, __file__, "--worker", row, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--init", args.init]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {row}: {sum(results[-1]['step_seconds']) / args.steps:.2f} s/step", flush=True)
    print("\n" + markdown(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
