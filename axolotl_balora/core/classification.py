"""The classification (NLU) form of BA-LoRA (spec section 3), written plainly.

For a sequence classifier the regularizers act on the batch's per-example
logits Z [N, C] rather than on token positions:

- diversity: (1/C) * sum_{i != j} Cov(Z)_ij^2 decorrelates the logit dimensions;
- svd: -(sum of the top-k singular values of Z) / (sum of all of them);
- consistency: a freshly initialized classification head has no pre-trained
  output (with adapters off its logits come from random weights), so logits
  cannot be compared with the pre-trained model's. The term compares the
  pooled features the head reads instead, with adapters on and off, as the
  mean squared distance of their L2-normalized vectors (the earlier BA-LoRA
  version's form). `logit_consistency_kl` is the logit form, for a head that
  is itself pre-trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from .losses import kl_rows, svd_ratio_rows
from .model_inputs import replayed_random_state

SEQUENCE_CLASSIFIER_SUFFIX = "ForSequenceClassification"
# Attribute names of the classification head, tried in order: BERT, DeBERTa, RoBERTa
# and most encoders call it `classifier`; Llama-like decoders call it `score`.
HEAD_NAMES = ("classifier", "score")


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_sequence_classifier(model: nn.Module) -> bool:
    return type(base_model_of(model)).__name__.endswith(SEQUENCE_CLASSIFIER_SUFFIX)


def uses_classification_form(model: nn.Module, task: str) -> bool:
    """Whether `task` (BALoRAConfig.task) selects the classification form for `model`."""
    if task == "auto":
        return is_sequence_classifier(model)
    return task == "classification"


# --------------------------------------------------------------------------- the terms


def feature_consistency(features: torch.Tensor, ref_features: torch.Tensor) -> torch.Tensor:
    """mean_i || f_i / |f_i| - r_i / |r_i| ||^2 over the N rows of [N, H] features.

    f = pooled features of the model being trained, r = those of the
    pre-trained model. Summed over the feature dimension and averaged over
    examples, so it equals 2 - 2 * mean cosine similarity, whatever the hidden
    size (an element-wise mean would shrink the term by 1/H and change what a
    given lambda means from one model to the next).
    """
    difference = F.normalize(features.float(), dim=-1) - F.normalize(ref_features.float(), dim=-1)
    return difference.pow(2).sum(-1).mean()


def logit_consistency_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """T^2 * mean_i KL(softmax(ref_i / T) || softmax(z_i / T)) over per-example logits [N, C].

    Only meaningful when the head itself is pre-trained, so that the
    reference logits mean something.
    """
    return kl_rows(logits.float(), ref_logits.float(), temperature)


def logit_decorrelation(logits: torch.Tensor) -> torch.Tensor:
    """(1/C) * sum_{i != j} Cov(Z)_ij^2, with the batch covariance (N - 1 denominator).

    A batch of fewer than two examples has no covariance: the term is 0.
    """
    rows = logits.float()
    examples, classes = rows.shape
    if examples < 2:
        return torch.zeros((), dtype=torch.float32, device=rows.device)
    centered = rows - rows.mean(dim=0, keepdim=True)
    covariance = centered.T @ centered / (examples - 1)
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    return off_diagonal.pow(2).sum() / classes


def logit_svd_ratio(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """-(sum_{i<=k} sigma_i(Z)) / (sum_i sigma_i(Z)), exact SVD; a zero matrix gives 0.

    With rank(Z) <= k every singular value counts and the term is -1.
    """
    return svd_ratio_rows(logits.float(), k, "nuclear")


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
