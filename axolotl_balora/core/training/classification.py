"""The classification (NLU) form in training: which models get it, and the pooled features.

The terms themselves are pure torch in `ops/classification_terms.py`. The consistency
term compares the pooled features a classification head reads, with adapters on and
off (a freshly initialized head has no pre-trained logits to compare); this module
finds the head, pools what it receives, and runs the reference forward for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from ..adapter.model_kind import HEAD_NAMES, base_model_of, is_sequence_classifier
from .model_inputs import replayed_random_state

def uses_classification_form(model: nn.Module, task: str) -> bool:
    """Whether `task` (BALoRAConfig.task) selects the classification form for `model`."""
    if task == "auto":
        return is_sequence_classifier(model)
    return task == "classification"


# --------------------------------------------------------------------------- pooled features


def classification_head(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the classification head: its input is what the pooled features are."""
    base = base_model_of(model)
    for name in HEAD_NAMES:
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return name, head
    raise ValueError(
        f"BA-LoRA classification form: {type(base).__name__} has no classification head "
        f"named {' or '.join(HEAD_NAMES)}, so the consistency term cannot read its pooled "
        "features. Set lambda_consistency (balora_lambda_consistency) to 0, or task "
        "(balora_task) to causal_lm if this is a language model."
    )


def _last_non_pad_index(input_ids: torch.Tensor | None, pad_token_id: int | None) -> torch.Tensor | int:
    """Position of the rightmost non-pad token of each row, the rule transformers' decoders use."""
    if input_ids is None or pad_token_id is None:
        return -1
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def pool(
    head_name: str,
    head_input: torch.Tensor,
    input_ids: torch.Tensor | None,
    pad_token_id: int | None,
) -> torch.Tensor:
    """The [N, H] rows that the head classifies, from what it received.

    BERT/DeBERTa heads receive pooled vectors already. RoBERTa-like `classifier`
    heads receive the sequence and read its first token; decoder `score` heads
    are applied to every position and read at the last non-pad token.
    """
    if head_input.dim() == 2:
        return head_input
    if head_name == "classifier":
        return head_input[:, 0]
    rows = torch.arange(head_input.shape[0], device=head_input.device)
    return head_input[rows, _last_non_pad_index(input_ids, pad_token_id)]


@contextlib.contextmanager
def recorded_pooled_features(
    model: nn.Module, inputs: Mapping[str, Any]
) -> Iterator[list[torch.Tensor]]:
    """Collect, for each forward inside the block, the pooled features [N, H] the head reads.

    A forward pre-hook on the head sees its input with its autograd graph, so
    the features carry gradients back into the adapters.
    """
    head_name, head = classification_head(model)
    pad_token_id = getattr(base_model_of(model).config.get_text_config(), "pad_token_id", None)
    recorded: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        recorded.append(pool(head_name, args[0], inputs.get("input_ids"), pad_token_id))

    handle = head.register_forward_pre_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()


def reference_features(
    model: nn.Module, peft_model: PeftModel, inputs: Mapping[str, Any]
) -> torch.Tensor:
    """Pooled features of the pre-trained model: every adapter disabled, no gradient.

    Run before the training forward with its random state replayed
    (`replayed_random_state`), so both draw the same dropout masks and the
    term is 0 at step 0 of a PiSSA run.
    """
    with (
        replayed_random_state(inputs),
        torch.no_grad(),
        peft_model.disable_adapter(),
        recorded_pooled_features(peft_model, inputs) as recorded,
    ):
        model(**inputs)
    return recorded[-1].detach()
