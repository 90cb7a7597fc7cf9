"""Test-only: move what survives each full garbage collection out of later collections' way.

An `axolotl train` process imports torch, transformers, peft, trl, datasets and axolotl: millions
of objects that live until exit. Each full (generation-2) collection walks all of them, and a
process makes ~15 automatic ones while importing, plus the explicit `gc.collect()` of axolotl's
model loader and of accelerate's `clear_device_cache`. Profiled on 2026-12-07 (tiny llama, 4 steps,
`--launcher python`, Python 3.12, axolotl 0.21): ~4 s of the process's 19 s.

With `BALORA_TEST_GC_FREEZE=1` (tests/conftest.py sets it for the test session, so the pytest
process and every subprocess get it) a gc callback calls `gc.freeze()` after each full
collection: the survivors go to the permanent generation, which later collections skip. Same
`axolotl train` run (a one-off profile, not a benchmark): 19 s -> 14 s wall, peak RSS unchanged
(1.26 GB), and a faster interpreter exit; the 0.21 fast suite in one process,
`BALORA_TEST_GC_FREEZE=0` / `1` alternated, `python -m pytest -m "not slow"`: 165 / 147 s ->
118 / 126 s, max RSS 1.76-1.88 GB either way; `benchmarks/subprocess_startup.py` measures the
import alone. What becomes cyclic garbage after being frozen stays until exit; garbage made after a
freeze is collected as usual (`tests/test_gc_freeze.py`). Never part of the package.
"""

from __future__ import annotations

import gc
import os

ENV_VAR = "BALORA_TEST_GC_FREEZE"


def freeze_after_full_collection(phase: str, info: dict[str, int]) -> None:
    """gc callback: freeze the survivors when a generation-2 collection ends."""
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def installed() -> bool:
    """Whether this process has the callback, under either of its import names: a pytest process
    may import this file as `gc_freeze` (sitecustomize) and as `cpu_distributed.gc_freeze`."""
    name = freeze_after_full_collection.__qualname__
    return any(getattr(callback, "__qualname__", None) == name for callback in gc.callbacks)


def install() -> None:
    """Register the callback when `BALORA_TEST_GC_FREEZE=1`, once per process."""
    if os.environ.get(ENV_VAR) == "1" and not installed():
        gc.callbacks.append(freeze_after_full_collection)
