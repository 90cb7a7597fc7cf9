"""Final hidden states without logits, for the fused loss (admitted in `loss_path.py`).

The model is still called through its (possibly DDP/FSDP-wrapped) forward, so
the engine's hooks run as usual; a forward hook on the decoder records its
output, and `logits_to_keep=1` makes the model's own lm_head see one position
only, so the full [batch, seq, vocab] logits are never built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import PeftModel
from torch import nn


@contextlib.contextmanager
def recorded_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the first output (the hidden states) of each call of `module`."""
    recorded: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        recorded.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

    handle = module.register_forward_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()


def final_hidden_states(model: nn.Module, peft_model: PeftModel, inputs: dict) -> torch.Tensor:
    """Run `model` (wrapped or not) and return the decoder's last hidden state [batch, seq, hidden]."""
    with recorded_output(peft_model.get_base_model().get_decoder()) as recorded:
        model(**inputs, logits_to_keep=1)
    return recorded[-1]
