"""The model inputs exactly as the parent trainer prepares them, and a replayable random state.

Trainers edit the batch inside their own `compute_loss` before calling the
model: Axolotl removes the attention mask of packed Gemma 3/4 batches (so the
model builds per-sequence masks from `position_ids`) and adds
`mm_token_type_ids` for Gemma 4; HF's Trainer adds `num_items_in_batch`. The
BA-LoRA forwards (the reference forward, and both forwards of the fused path)
must see the same inputs, so instead of copying each trainer's rules, the
parent's `compute_loss` is run with the outermost model's `forward` replaced
for that one call: it records what it receives and either stops the parent
there (`inputs_from_parent`) or runs the reference forward first and then the
real forward (`reference_before_forward`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

# Keys the parent adds for its own task loss: not inputs of the BA-LoRA forwards.
TASK_ONLY_KEYS = ("labels", "num_items_in_batch")


class _ModelCalled(Exception):
    """Stops the parent's compute_loss at its model call (nothing has run yet)."""


def without_task_keys(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in inputs.items() if key not in TASK_ONLY_KEYS}


@contextlib.contextmanager
def _forward_replaced(model: nn.Module, make_forward: Callable[[Callable], Callable]) -> Iterator[None]:
    """Shadow `model.forward` by `make_forward(original)` on the instance, restored on exit.

    nn.Module.__call__ looks `forward` up on the instance, so this reaches the
    parent's `model(**inputs)` whatever wraps the model (DDP, DeepSpeed, PEFT).
    """
    own = vars(model).get("forward")
    model.forward = make_forward(model.forward)
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _keywords_only(args: tuple, name: str) -> None:
    if args:
        raise TypeError(
            f"BA-LoRA: the trainer's compute_loss passed {len(args)} positional argument(s) to the "
            f"model; {name} needs keyword inputs (as transformers' Trainer passes them)"
        )


def inputs_from_parent(parent_compute_loss: Callable, model: nn.Module, inputs: Mapping[str, Any],
                       num_items_in_batch: Any) -> dict[str, Any]:
    """The keyword inputs the parent's compute_loss would pass to `model`; the model is not run.

    The parent works on a shallow copy, so its in-place edits never reach the caller's batch.
    """
    received: dict[str, Any] = {}

    def make_forward(_original: Callable) -> Callable:
        def record_and_stop(*args: Any, **kwargs: Any) -> None:
            _keywords_only(args, "the fused loss")
            received.update(kwargs)
            raise _ModelCalled

        return record_and_stop

    with _forward_replaced(model, make_forward):
        try:
            parent_compute_loss(model, dict(inputs), return_outputs=False, num_items_in_batch=num_items_in_batch)
        except _ModelCalled:
            return received
    raise RuntimeError(
        "BA-LoRA: the trainer's compute_loss returned without calling the model, so the inputs "
        "of the BA-LoRA forwards are unknown; set balora_chunk_size: 0 to use the plain path"
    )


@contextlib.contextmanager
def reference_before_forward(model: nn.Module, run_reference: Callable[[Callable, dict[str, Any]], None]
                             ) -> Iterator[None]:
    """Inside the block, the parent's model call first runs `run_reference(forward, inputs)`.

    `forward` is the model's own forward (calling `model` again would recurse),
    `inputs` what the parent passes, so the reference sees the parent's edits.
    """

    def make_forward(original: Callable) -> Callable:
        def reference_then_forward(*args: Any, **kwargs: Any) -> Any:
            _keywords_only(args, "the reference forward")
            run_reference(original, kwargs)
            return original(**kwargs)

        return reference_then_forward

    with _forward_replaced(model, make_forward):
        yield


@contextlib.contextmanager
def replayed_random_state(inputs: Mapping[str, Any]) -> Iterator[None]:
    """Run the block, then restore the random state it started from.

    A reference forward run inside draws the dropout masks that the trained
    forward after it draws again, so the consistency term compares what the
    adapters changed, not two dropout draws (exactly so with lora_dropout 0:
    the LoRA dropout is then not called and both forwards draw the same
    numbers in the same order).
    """
    cuda_devices = sorted(
        {value.device for value in inputs.values()
         if isinstance(value, torch.Tensor) and value.device.type == "cuda"},
        key=str,
    )
    with torch.random.fork_rng(devices=cuda_devices):
        yield
