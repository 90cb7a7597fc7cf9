"""Run the real `axolotl train` CLI in a subprocess and read back what it logged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "ci"))

from demo_summary import training_logs  # noqa: E402  (re-exported for the tests)
from ports import free_port  # noqa: E402  (re-exported for the tests)

__all__ = ["axolotl_command", "base_config", "free_port", "pythonpath_with", "run_axolotl", "run_axolotl_on_cpu_nodes",
           "run_axolotl_on_cpu_ranks", "run_axolotl_train",
           "resume_after_step2", "subprocess_tmpdir", "training_logs"]

# Where the runs of a test session keep their prepared datasets (set by tests/conftest.py).
PREPARED_DATASETS_ENV = "BALORA_TEST_PREPARED_DATASETS"
# The session's temporary folder for test subprocesses (set by tests/conftest.py).
SUBPROCESS_TMPDIR_ENV = "BALORA_TEST_SUBPROCESS_TMPDIR"
# The test-only patch that lets accelerate/axolotl run DeepSpeed and FSDP2 on CPU ranks.
CPU_DISTRIBUTED_DIR = Path(__file__).with_name("cpu_distributed")


def pythonpath_with(folder: Path) -> str:
    """This process's PYTHONPATH with `folder` first (and only once), for a subprocess that imports from it."""
    others = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry and entry != str(folder)]
    return os.pathsep.join([str(folder), *others])


def subprocess_tmpdir() -> dict[str, str]:
    """TMPDIR of a test subprocess: the session's folder (tests/conftest.py) when there is one, so
    what torchrun and its ranks leave in it (empty `torchelastic_*` folders, `pymp-*`) goes when
    the session ends instead of piling up in /tmp. It is short on purpose: multiprocessing listens
    on Unix sockets there, whose paths may not exceed 107 characters."""
    folder = os.environ.get(SUBPROCESS_TMPDIR_ENV)
    return {"TMPDIR": folder} if folder else {}


ENGINE_ENV = {
    "deepspeed": {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true"},
    "fsdp": {},  # axolotl sets ACCELERATE_USE_FSDP from fsdp_config itself
}


def base_config(model_dir: Path, dataset: Path, workdir: Path, **overrides: Any) -> dict[str, Any]:
    """A small CPU BA-LoRA config; overrides replace keys (None removes one)."""
    config: dict[str, Any] = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_balora.BALoRAPlugin"],
        "adapter": "balora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "balora_lambda_schedule": "constant",
        "datasets": [{"path": str(dataset), "type": "alpaca", "ds_type": "json"}],
        # One prepared folder per test session (tests/conftest.py): axolotl keys each prepared
        # dataset by the dataset, tokenizer and settings and prepares it under a file lock, so
        # the runs of one tiny model share a tokenization instead of each redoing it.
        "dataset_prepared_path": os.environ.get(PREPARED_DATASETS_ENV) or str(workdir / "prepared"),
        "val_set_size": 0,
        "sequence_len": 128,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "learning_rate": 0.001,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "output_dir": str(workdir / "out"),
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 42,
        # float32, as a CPU user writes it (example_configs/quickstart.yml). Left unset, axolotl
        # turns fp16 on wherever it finds no bf16 GPU, and float16 matmuls on a CPU without
        # native fp16 (AVX2-only hosts) made the suite ~3x slower; test_axolotl_cli keeps one run
        # on that default.
        "bf16": False,
        "fp16": False,
        # Triton LoRA kernels auto-enable for lora and crash without CUDA.
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
    }
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def run_axolotl_train(config: dict[str, Any], workdir: Path, timeout: int = 900,
                      extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`axolotl train config.yml --launcher python` with the venv's bin first on PATH."""
    return run_axolotl("train", config, workdir, ["--launcher", "python"], timeout=timeout, extra_env=extra_env)


def resume_after_step2(config: dict[str, Any], source_output: Path, workdir: Path,
                       **overrides: Any) -> tuple[dict[str, Any], Path]:
    """(config, output_dir) of a run interrupted right after its step-2 checkpoint, set to resume.

    Only `checkpoint-2/` of `source_output` is copied into a fresh `workdir/out`.
    """
    output = workdir / "out"
    output.mkdir(parents=True)
    shutil.copytree(source_output / "checkpoint-2", output / "checkpoint-2")
    resumed = {**config, "output_dir": str(output), "resume_from_checkpoint": str(output / "checkpoint-2"),
               **overrides}
    return resumed, output


def _cpu_ranks(config: dict[str, Any], engine: str, extra_env: dict[str, str] | None
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """(config, environment) of CPU ranks (gloo) running the real `engine`.

    The test-only patch in tests/cpu_distributed is on PYTHONPATH of every rank, and
    `max_memory` keeps axolotl from forcing a CUDA device map.
    """
    env = {
        "ACCELERATE_USE_CPU": "true",
        "BALORA_CPU_DISTRIBUTED_PATCH": "1",
        "PYTHONPATH": pythonpath_with(CPU_DISTRIBUTED_DIR),
        "OMP_NUM_THREADS": "1",
        **ENGINE_ENV[engine],
        **(extra_env or {}),
    }
    return {"max_memory": {"cpu": "8GiB"}, **config}, env


def run_axolotl_on_cpu_ranks(config: dict[str, Any], workdir: Path, engine: str, ranks: int = 2,
                             extra_env: dict[str, str] | None = None,
                             timeout: int = 900) -> subprocess.CompletedProcess:
    """`axolotl train --launcher torchrun` on `ranks` CPU processes (gloo) with the real `engine`."""
    config, env = _cpu_ranks(config, engine, extra_env)
    launcher = ["--launcher", "torchrun", "--", "--nproc_per_node", str(ranks),
                "--master_port", str(free_port())]
    return run_axolotl("train", config, workdir, launcher, timeout=timeout, extra_env=env)


def run_axolotl_on_cpu_nodes(configs: list[dict[str, Any]], workdirs: list[Path], engine: str,
                             node_envs: list[dict[str, str]], timeout: int = 900
                             ) -> list[subprocess.CompletedProcess]:
    """One `axolotl train --launcher torchrun` per "node" (one rank each), all at once, meeting at
    a static rendezvous on localhost as the nodes of a cluster do at their master's address."""
    port = str(free_port())
    processes = []
    for node, (config, workdir, node_env) in enumerate(zip(configs, workdirs, node_envs)):
        node_config, env = _cpu_ranks(config, engine, node_env)
        launcher = ["--launcher", "torchrun", "--", "--nnodes", str(len(configs)), "--nproc_per_node", "1",
                    "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port]
        argv, full_env = axolotl_command("train", node_config, workdir, launcher, env)
        processes.append((argv, subprocess.Popen(argv, cwd=workdir, env=full_env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)))
    results = []
    for argv, process in processes:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for _, other in processes:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr))
    return results


def axolotl_command(command: str, config: dict[str, Any], workdir: Path, extra_args: list[str] = (),
                    extra_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `axolotl <command> config.yml [extra_args]`, offline, with the venv's
    bin first on PATH; writes the config into `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{command}.yml"
    config_path.write_text(yaml.safe_dump(config))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        **subprocess_tmpdir(),
        # The PiSSA factor cache (`balora_init_cache: auto`) lives in the run's folder: factors
        # cached by one test never feed another, so checks that compare a run's factors bit for
        # bit with a one-thread recomputation see factors the run computed itself.
        "BALORA_INIT_CACHE_DIR": str(workdir / "init-cache"),
        **(extra_env or {}),
    }
    return [str(Path(bin_dir) / "axolotl"), command, str(config_path), *extra_args], env


def run_axolotl(command: str, config: dict[str, Any], workdir: Path, extra_args: list[str] = (),
                stdin: str | None = None, timeout: int = 900,
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`axolotl <command> config.yml [extra_args]`, offline, with the venv's bin first on PATH."""
    argv, env = axolotl_command(command, config, workdir, extra_args, extra_env)
    return subprocess.run(argv, cwd=workdir, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
