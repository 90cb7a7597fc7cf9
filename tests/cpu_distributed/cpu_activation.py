"""Test-only: a CPU stand-in for the Triton SwiGLU activation of axolotl's `lora_mlp_kernel`.

Axolotl's MLP kernel (`LoRA_MLP`) runs its gate/up/down projections as torch autograd code
and only its SwiGLU activation as a Triton kernel that allocates on a literal "cuda" device.
The BA-LoRA side of that kernel (the stacked rank-2r factors) does not depend on the
activation, so the tests swap in this plain torch version with the Triton one's contract:
`forward(gate, up) -> silu(gate) * up`; `backward(grad, gate, up) -> (h, d_gate, d_up)`.

`plugins: [..., cpu_activation.CPUActivationPlugin]` (this folder on PYTHONPATH) installs it
in an `axolotl train` process; `install()` does it in-process. Never part of the package.
"""

from __future__ import annotations

import importlib

import torch
from axolotl.integrations.base import BasePlugin


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor,
                    up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sigmoid = torch.sigmoid(gate.float())
    silu = (gate.float() * sigmoid).to(grad.dtype)
    d_gate = (grad * up).float() * sigmoid * (1.0 + gate.float() * (1.0 - sigmoid))
    return silu * up, d_gate.to(grad.dtype), grad * silu


def install() -> int:
    """Replace the Triton SwiGLU wherever this axolotl reads it from; how many places changed.

    axolotl 0.19 binds the functions into `axolotl.kernels.lora` at import; 0.21 imports
    them from `axolotl.kernels.swiglu` at each call.
    """
    changed = 0
    for module_name in ("axolotl.kernels.swiglu", "axolotl.kernels.lora"):
        module = importlib.import_module(module_name)
        if hasattr(module, "swiglu_forward"):
            module.swiglu_forward, module.swiglu_backward = swiglu_forward, swiglu_backward
            changed += 1
    if not changed:
        raise RuntimeError("no swiglu_forward found in axolotl.kernels: the stand-in no longer applies")
    return changed


class CPUActivationPlugin(BasePlugin):
    def pre_model_load(self, cfg) -> None:
        install()
