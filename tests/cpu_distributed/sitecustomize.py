"""Test-only: let accelerate and axolotl run DeepSpeed and FSDP2 on CPU ranks over gloo.

This folder is on PYTHONPATH of every test subprocess (tests/conftest.py), so Python imports
`sitecustomize` at start-up in the CLI and in every torchrun rank. With
`BALORA_CPU_DISTRIBUTED_PATCH=1` (set for CPU ranks by `tests/axolotl_cli.py`) it rewrites a few
exact spots of accelerate, transformers, DeepSpeed and axolotl source as those modules are
imported, and nothing else:

* accelerate `state.py`: DeepSpeed is selected only when `cpu` is off, yet CPU ranks
  need `cpu=True` to get the gloo backend; and FSDP is selected only for GPU-like
  distributed types. Both selections also accept CPU ranks here.
* transformers `training_args.py`: bf16 is refused without a bf16 GPU unless
  `use_cpu`, which axolotl never sets.
* deepspeed `comm/torch.py`: no shared-memory op for the CPU accelerator, which DeepSpeed would
  compile with ninja at each fresh environment's first run (1-2 min) for inference all-reduce
  only; training all-reduces through torch.distributed (gloo) with or without it.
* axolotl: the device mesh and two or three tensors (0.21 / 0.19) are built on a literal "cuda"
  device.
* axolotl `utils/environment.py`: with more than one rank it asks torch whether two
  CUDA devices can reach each other and catches only AssertionError, which a CPU build
  of torch raises; a CUDA build on a machine without a GPU (the only torch for Python
  3.12 with axolotl 0.21) raises RuntimeError ("Found no NVIDIA driver"). Caught too.
  `BALORA_CPU_DISTRIBUTED_PATCH=p2p` applies this one alone (plain DDP on CPU ranks).

At start-up it also installs two speed-ups of every test subprocess (each has this folder on
PYTHONPATH): the session's `packages_distributions` cache (`metadata_cache.py`) and a `gc.freeze()`
after each full garbage collection (`gc_freeze.py`).

A spot that is not found exactly once raises, so a changed upstream version fails
the tests loudly instead of silently running without the patch. Never part of the
package: on GPUs none of this is needed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import sys

_USE_DEEPSPEED = 'os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"'
# Literal `torch.device("cuda")` in axolotl's FSDP2 module, by axolotl version: 0.21 moved the
# expert-parallel one away (its FSDP2 checkpoint code picks "cpu" under gloo by itself).
_FSDP2_CUDA_DEVICES = {"0.19": 3, "0.20": 3, "0.21": 2}


def _axolotl_minor() -> str:
    return ".".join(importlib.metadata.version("axolotl").split(".")[:2])

# module -> [(exact old text, new text, how many times the old text occurs: a number, or one per
# axolotl minor version)]
PATCHES: dict[str, list[tuple[str, str, int | dict[str, int]]]] = {
    "accelerate.state": [
        # AcceleratorState: take the DeepSpeed branch on CPU ranks too.
        (f"elif {_USE_DEEPSPEED} and not cpu:", f"elif {_USE_DEEPSPEED}:", 1),
        # PartialState: after the MULTI_CPU gloo init, the run is a DeepSpeed run.
        (
            "            if use_deepspeed:\n                self.distributed_type = DistributedType.DEEPSPEED\n",
            "            if use_deepspeed or (cpu and self.backend is not None and "
            f"{_USE_DEEPSPEED}):\n"
            "                self.distributed_type = DistributedType.DEEPSPEED\n",
            1,
        ),
        # AcceleratorState: the FSDP selection also for CPU ranks.
        (
            "            elif self.distributed_type in [\n                DistributedType.MULTI_GPU,\n",
            "            elif self.distributed_type in [\n                DistributedType.MULTI_CPU,\n"
            "                DistributedType.MULTI_GPU,\n",
            1,
        ),
    ],
    # TrainingArguments refuses bf16 without a bf16 GPU unless use_cpu, which axolotl never
    # sets; CPU ranks (ACCELERATE_USE_CPU) compute bf16 fine.
    "transformers.training_args": [
        (
            "if not self.use_cpu and not is_torch_bf16_gpu_available()",
            "if not self.use_cpu and not is_torch_bf16_gpu_available()"
            ' and os.environ.get("ACCELERATE_USE_CPU") != "true"',
            1,
        ),
    ],
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory C++ op (ninja, into
    # ~/.cache/torch_extensions) in every rank's first `deepspeed.comm` set-up: 45-110 s per fresh
    # environment on the 2-core build machine. Only `inference_all_reduce` uses it; training's
    # all-reduce is torch.distributed's either way (gloo here, NCCL on GPUs).
    "deepspeed.comm.torch": [
        ("        self.shm_comm_op = build_shm_op()\n", "        self.shm_comm_op = None\n", 1),
    ],
    "axolotl.utils.distributed": [
        ('parallelism_config.build_device_mesh("cuda")', 'parallelism_config.build_device_mesh("cpu")', 1),
    ],
    "axolotl.monkeypatch.accelerate.fsdp2": [
        ('torch.device("cuda")', 'torch.device("cpu")', _FSDP2_CUDA_DEVICES),
    ],
}
P2P_PATCHES: dict[str, list[tuple[str, str, int | dict[str, int]]]] = {
    "axolotl.utils.environment": [
        ("        except AssertionError as exc:", "        except (AssertionError, RuntimeError) as exc:", 1),
    ],
}
PATCHES.update(P2P_PATCHES)


def patched_source(name: str, source: str, axolotl_minor: str | None = None) -> str:
    """`source` with every spot of PATCHES[name] rewritten; raises if a spot is missing.

    `axolotl_minor` ("0.21") picks the per-version counts; default: the installed axolotl.
    """
    for old, new, times in PATCHES[name]:
        if isinstance(times, dict):
            times = times.get(axolotl_minor or _axolotl_minor(), -1)
        count = source.count(old)
        if count != times:
            raise RuntimeError(
                f"cpu_distributed patch: {old!r} found {count} times in {name}, expected {times}"
            )
        source = source.replace(old, new)
    return source


class _PatchedSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the patched source; never reads or writes the bytecode cache."""

    def get_code(self, fullname: str):
        source = self.get_source(fullname)
        return compile(patched_source(fullname, source), self.path, "exec", dont_inherit=True)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _PatchedSourceLoader(fullname, spec.origin)
        return spec


if __name__ == "sitecustomize":  # at start-up only, not when a test imports this module
    import gc_freeze
    import metadata_cache

    gc_freeze.install()
    metadata_cache.install()

_MODE = os.environ.get("BALORA_CPU_DISTRIBUTED_PATCH")
if _MODE == "p2p":
    PATCHES = P2P_PATCHES
if _MODE in ("1", "p2p"):
    sys.meta_path.insert(0, _PatchingFinder())
