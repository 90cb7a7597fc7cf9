"""Two processes on CPU (torchrun, gloo): same initial factors everywhere, DDP = 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from axolotl_cli import (CPU_DISTRIBUTED_DIR, base_config, free_port, pythonpath_with, run_axolotl, run_axolotl_train,
                         subprocess_tmpdir)

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("ddp_worker.py")
FSDP2_WORKER = Path(__file__).with_name("fsdp2_worker.py")
# DDP averages two micro-batch gradients where one process sums two accumulated ones:
# the same math in another order, so float32 rounding only.
TOLERANCE = 1e-6
# Through axolotl: 4 SGD steps at lr 0.1 on the tiny model; measured 6.4e-6.
AXOLOTL_TOLERANCE = 5e-5
# axolotl's P2P probe for 2+ ranks, caught for a CUDA torch without a GPU (axolotl 0.21 on
# Python 3.12); test-only, tests/cpu_distributed/sitecustomize.py.
P2P_CHECK_ON_CPU = {
    "BALORA_CPU_DISTRIBUTED_PATCH": "p2p",
    "PYTHONPATH": pythonpath_with(CPU_DISTRIBUTED_DIR),
}


def _run(args: list[str], processes: int) -> None:
    _run_worker(WORKER, args, processes)


def _run_worker(worker: Path, args: list[str], processes: int) -> None:
    env = {**os.environ, "PYTHONPATH": pythonpath_with(worker.parent), "OMP_NUM_THREADS": "1", **subprocess_tmpdir()}
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), str(worker), *args]
    else:
        command = [sys.executable, str(worker), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "gaussian"])
def test_every_rank_builds_identical_factors(tmp_path, init):
    out = tmp_path / "result.json"
    _run(["init", "--init", init, "--out", str(out)], processes=2)
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["numel"] > 0
    if init == "gaussian":
        # Plain LoRA init draws A from the global RNG: ranks differ until DDP broadcasts
        # rank 0's parameters when it wraps the model (the train test covers that).
        assert result["identical"] is False
    else:
        assert result["identical"] is True


def test_ddp_two_processes_matches_one_process_with_accumulation(tmp_path):
    _run(["train", "--out", str(tmp_path / "ddp"), "--micro-batch", "2"], processes=2)
    _run(["train", "--out", str(tmp_path / "single"), "--micro-batch", "2", "--accumulation", "2"],
         processes=1)
    # What two ranks training independently on the same batches would produce.
    _run(["train", "--out", str(tmp_path / "half"), "--micro-batch", "2"], processes=1)
    ddp, single, half = (
        safetensors.torch.load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        for name in ("ddp", "single", "half")
    )
    assert ddp.keys() == single.keys()
    difference = max((ddp[k] - single[k]).abs().max().item() for k in ddp)
    assert difference <= TOLERANCE, difference
    assert max((half[k] - single[k]).abs().max().item() for k in half) > 100 * TOLERANCE


def test_axolotl_torchrun_two_ranks_matches_one_process(tiny_llama_dir, tiny_dataset, tmp_path):
    """`axolotl train --launcher torchrun` with 2 CPU ranks (gloo) = 1 process with accumulation 2.

    SGD, not Adam: Adam turns float32 reordering noise in near-zero gradients into
    lr-sized steps, which would hide a real difference behind a loose tolerance.
    """
    common = {"optimizer": "sgd", "learning_rate": 0.1, "micro_batch_size": 2,
              "max_memory": {"cpu": "8GiB"}}  # without it axolotl forces a CUDA device map
    ddp = base_config(tiny_llama_dir, tiny_dataset, tmp_path / "ddp", gradient_accumulation_steps=1,
                      **common)
    single = base_config(tiny_llama_dir, tiny_dataset, tmp_path / "single",
                         gradient_accumulation_steps=2, **common)
    # Without ACCELERATE_USE_CPU the two ranks would train independently and still exit 0.
    ddp_run = run_axolotl("train", ddp, tmp_path / "ddp",
                          ["--launcher", "torchrun", "--", "--nproc_per_node", "2",
                           "--master_port", str(free_port())],
                          extra_env={"ACCELERATE_USE_CPU": "true", **P2P_CHECK_ON_CPU})
    assert ddp_run.returncode == 0, (ddp_run.stdout + ddp_run.stderr)[-4000:]
    assert "balora/consistency" in ddp_run.stdout + ddp_run.stderr
    single_run = run_axolotl_train(single, tmp_path / "single")
    assert single_run.returncode == 0, (single_run.stdout + single_run.stderr)[-4000:]
    first, second = (
        safetensors.torch.load_file(tmp_path / name / "out" / "adapter_model.safetensors")
        for name in ("ddp", "single")
    )
    difference = max((first[k] - second[k]).abs().max().item() for k in first)
    assert difference <= AXOLOTL_TOLERANCE, difference


def test_fsdp2_fully_shard_reference_and_gradients(tmp_path):
    """FSDP2 (torch fully_shard over gloo, 2 CPU ranks): exact reference, same loss and grads.

    The core under torch's own FSDP2; axolotl's FSDP2 path is tested in test_fsdp2.py.
    """
    out = tmp_path / "fsdp2.json"
    _run_worker(FSDP2_WORKER, ["--out", str(out)], processes=2)
    result = json.loads(out.read_text())
    assert result["trainable"] > 0
    assert result["reference_vs_pretrained"] <= 1e-5
    assert result["loss_difference"] <= 1e-5
    assert result["grad_difference"] <= 1e-6
    assert result["blocker"] is None  # a sharded lm_head is gathered for the fused loss
