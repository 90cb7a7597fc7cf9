"""The fused loss against the plain path on a sharded output layer, read from two CLI runs.

FSDP2 and ZeRO-3 shard the output layer's weight outside its forward; the fused loss gathers it
(`axolotl_balora/core/parallel/output_layer.py`). tests/test_fsdp2.py and tests/test_deepspeed.py
each train their uninterrupted run on the fused path (`balora_chunk_size: 64`, large lambdas so
that every term moves the gradients) and the same config's first 2 steps with
`balora_chunk_size: 0` (the plain path, full logits). Same batches, same initial adapters,
float32: the logged task loss, terms and gradient norm must agree at step 1 (values) and at
step 2 (after an update from the fused gradients). Values are read at full precision from
`checkpoint-2/trainer_state.json` (the console prints 4 digits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# What the fused path must be exercised with: two chunks of 64 tokens per micro-batch, and
# lambdas large enough that a wrong term gradient shows in step 2.
FUSED_SETTINGS: dict[str, Any] = {"balora_chunk_size": 64, "balora_lambda_consistency": 0.5,
                                  "balora_lambda_diversity": 0.3, "balora_lambda_svd": 0.2}
COMPARED = ("loss", "grad_norm", "balora/diversity", "balora/svd")
# Fused vs plain, float32: chunked vs whole-vocabulary reductions and another matmul
# shape give a few units of rounding (measured 2026-12-03: at most 5.2e-7 relative).
RELATIVE_TOLERANCE = 1e-5
# The consistency KL starts at ~0 (the exact PiSSA init is the pre-trained model) and is
# a difference of log-probabilities of ~-6: float32 cancellation, measured <= 5.3e-8 at
# step 2 (a KL of 6.5e-5).
CONSISTENCY_ABSOLUTE_TOLERANCE = 2e-7


def plain_config(fused_config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The fused run's config on the plain path, its first 2 steps, checkpoint at step 2."""
    return {**fused_config, "balora_chunk_size": 0, "max_steps": 2, "save_strategy": "steps", "save_steps": 2,
            "output_dir": str(workdir / "out")}


def _first_two_logs(run: dict[str, Any]) -> list[dict[str, float]]:
    state = json.loads((run["workdir"] / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def assert_sharded_head_took_the_fused_path(fused: dict[str, Any], plain: dict[str, Any]) -> None:
    """`fused` / `plain`: the runs, as {"text": their output, "workdir": their folder}."""
    assert "fused chunked loss (chunk 64 tokens)" in fused["text"], fused["text"][-3000:]
    assert "the fused loss gathers it for each micro-batch" in fused["text"]
    assert "plain path" not in fused["text"]
    assert "plain path): balora_chunk_size is 0" in plain["text"]


def assert_fused_equals_plain(fused: dict[str, Any], plain: dict[str, Any]) -> None:
    assert "fused chunked loss" in fused["text"], "the comparison needs the fused path to run"
    fused_logs, plain_logs = _first_two_logs(fused), _first_two_logs(plain)
    assert len(fused_logs) == len(plain_logs) == 2
    for step, (got, expected) in enumerate(zip(fused_logs, plain_logs), start=1):
        for key in COMPARED:
            assert got[key] == pytest.approx(expected[key], rel=RELATIVE_TOLERANCE), (step, key)
        assert got["balora/consistency"] == pytest.approx(
            expected["balora/consistency"], rel=RELATIVE_TOLERANCE, abs=CONSISTENCY_ABSOLUTE_TOLERANCE), step
