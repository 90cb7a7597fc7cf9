"""The fused loss under FSDP2 and ZeRO-3 through the real `axolotl train` CLI on 2 CPU ranks.

The output layer's weight is sharded outside its forward; the fused loss gathers it
(`axolotl_balora/core/parallel/output_layer.py`). Each engine trains the same 2 steps twice:
fused, and with `balora_chunk_size: 0` (the plain path, full logits). Same batches,
same initial adapters, float32: the logged task loss, terms and gradient norm must
agree, at step 1 (values) and at step 2 (after an update from the fused gradients).
The values are read at full precision from the checkpoint's trainer_state.json (the
console prints 4 digits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from axolotl_cli import base_config, run_axolotl_on_cpu_ranks
from probe_checks import ok

pytestmark = pytest.mark.slow

COMPARED = ("loss", "grad_norm", "balora/diversity", "balora/svd")
# Fused vs plain, float32: chunked vs whole-vocabulary reductions and another matmul
# shape give a few units of rounding (measured 2026-12-03: at most 5.2e-7 relative).
RELATIVE_TOLERANCE = 1e-5
# The consistency KL starts at ~0 (the exact PiSSA init is the pre-trained model) and is
# a difference of log-probabilities of ~-6: float32 cancellation, measured <= 5.3e-8 at
# step 2 (a KL of 6.5e-5).
CONSISTENCY_ABSOLUTE_TOLERANCE = 2e-7

FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "offload_params": False,
        "state_dict_type": "FULL_STATE_DICT",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "reshard_after_forward": True,  # the root too: the head is a shard when the loss runs
    },
}


def zero3_json(directory: Path) -> Path:
    """ZeRO-3 that partitions every parameter: the tiny head (400 x 64) is below the
    default persistence threshold, which would keep it whole on every rank."""
    config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "zero3.json"
    path.write_text(json.dumps(config))
    return path


def _run(engine: str, chunk_size: int, model_dir: Path, dataset: Path, workdir: Path) -> dict:
    sharding = FSDP2 if engine == "fsdp" else {"deepspeed": str(zero3_json(workdir))}
    config = base_config(
        model_dir, dataset, workdir, balora_init="pissa", balora_chunk_size=chunk_size,
        balora_lambda_consistency=0.5, balora_lambda_diversity=0.3,
        balora_lambda_svd=0.2, gradient_accumulation_steps=1, max_steps=2,
        save_strategy="steps", save_steps=2, **sharding,
    )
    text = ok(run_axolotl_on_cpu_ranks(config, workdir, engine))
    state = json.loads((workdir / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    return {"text": text, "logs": [entry for entry in state["log_history"] if "loss" in entry]}


@pytest.fixture(scope="module", params=["fsdp", "deepspeed"], ids=["fsdp2", "zero3"])
def runs(request, tiny_llama_dir, tiny_dataset, tmp_path_factory):
    engine = request.param
    return {
        path: _run(engine, chunk, tiny_llama_dir, tiny_dataset, tmp_path_factory.mktemp(f"{engine}-{path}"))
        for path, chunk in (("fused", 64), ("plain", 0))
    }


def test_sharded_head_takes_the_fused_path(runs):
    fused, plain = runs["fused"]["text"], runs["plain"]["text"]
    assert "fused chunked loss (chunk 64 tokens)" in fused, fused[-3000:]
    assert "the fused loss gathers it for each micro-batch" in fused
    assert "plain path" not in fused
    assert "plain path): balora_chunk_size is 0" in plain


def test_sharded_fused_path_equals_the_plain_path(runs):
    assert "fused chunked loss" in runs["fused"]["text"], "the comparison needs the fused path to run"
    fused, plain = runs["fused"]["logs"], runs["plain"]["logs"]
    assert len(fused) == len(plain) == 2
    for step, (got, expected) in enumerate(zip(fused, plain), start=1):
        for key in COMPARED:
            assert got[key] == pytest.approx(expected[key], rel=RELATIVE_TOLERANCE), (step, key)
        assert got["balora/consistency"] == pytest.approx(
            expected["balora/consistency"], rel=RELATIVE_TOLERANCE, abs=CONSISTENCY_ABSOLUTE_TOLERANCE), step
