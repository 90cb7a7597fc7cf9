"""The reference forward's recipe, shared by the SFT loss paths (`loss_paths.py`).

The consistency term compares the trained model with the pre-trained one, which for
BA-LoRA is the same model with every adapter disabled. That forward runs just before the
trained one, on the same inputs; its own module, below the paths, so any module that runs
such a forward can import it without importing the paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import PeftModel

from .model_inputs import replayed_random_state


@contextlib.contextmanager
def reference_forward(peft_model: PeftModel, inputs: Mapping[str, Any]) -> Iterator[None]:
    """Run the block as the pre-trained model: every adapter disabled, no gradient, and the
    random state restored after, so the trained forward that follows draws the same dropout masks."""
    with replayed_random_state(inputs), torch.no_grad(), peft_model.disable_adapter():
        yield
