"""Check on the real batch that the fused loss sees the logits the model itself computes.

The fused loss assumes logits = lm_head(decoder output). Models that scale
or cap their logits after the head (Granite, Cohere, FalconH1), transform the
hidden states before it (MiniCPM3), or mask vocabulary entries break that
assumption, and a list of known exceptions can never be complete. So before
the first fused step the model is run once more without gradient, with
`logits_to_keep` selecting a few scored positions, and its log-probabilities
are compared with those of lm_head applied to the decoder output recorded in
the same forward. The model stays in training mode (switching to eval makes
bitsandbytes' CPU backend repack 4-bit weights in place): dropout, if any,
acts on both sides of the comparison alike, and the random state is
restored afterwards so the check draws nothing from the training's stream.
A second short forward (one row, at most 64 tokens) compares the model's own
loss with the fused cross-entropy, which catches a task loss of another form.
Under ZeRO-3 / FSDP2 the head's weight is gathered after each check forward
(`parallel/output_layer.py`), as the fused loss gathers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from ..ops.fused import fused_losses
from .hidden_states import recorded_output
from ..ops.losses import IGNORE_INDEX
from .model_inputs import replayed_random_state
from ..parallel.output_layer import full_head_weight, output_layer_of
from ..parallel.ranks import several_ranks

CHECKED_POSITIONS = 8
LOSS_CHECK_TOKENS = 64


@dataclass
class HeadCheck:
    """Largest difference found (log-probabilities over the logits' range, or the loss's
    relative difference) and the verdict."""

    error: float
    tolerance: float
    positions: int
    reason: str | None  # None: the fused loss sees the model's own logits


def tolerance_for(dtype: torch.dtype) -> float:
    """1e-4 in float32; 8 units of rounding for half precision (bf16 0.0625, fp16 0.0078)."""
    return max(1e-4, 8 * torch.finfo(dtype).eps)


def checked_positions(labels: torch.Tensor, count: int = CHECKED_POSITIONS) -> torch.Tensor:
    """Up to `count` sequence positions, spread out, whose next token some row scores."""
    scored = (labels[..., 1:] != IGNORE_INDEX).reshape(-1, labels.shape[-1] - 1).any(0)
    positions = scored.nonzero().flatten()
    if positions.numel() == 0:  # nothing scored: the head is the same function everywhere
        positions = torch.arange(labels.shape[-1], device=labels.device)
    if positions.numel() > count:
        positions = positions[torch.linspace(0, positions.numel() - 1, count, device=labels.device).long()]
    return positions


def _error(value: torch.Tensor) -> float:
    """A check's error as a float; NaN (masked or non-finite logits) counts as a failure."""
    error = value.item()
    return error if error == error else float("inf")


def _log_prob_error(fused_logits: torch.Tensor, model_logits: torch.Tensor) -> float:
    """max |log_softmax(fused) - log_softmax(model)| over the logits' largest range."""
    difference = (F.log_softmax(fused_logits, -1) - F.log_softmax(model_logits, -1)).abs().amax()
    spread = (model_logits.amax(-1) - model_logits.amin(-1)).amax().clamp_min(torch.finfo(torch.float32).tiny)
    return _error(difference / spread)


def _recorded_forward(model: nn.Module, peft_model: PeftModel, inputs: dict) -> tuple[object, torch.Tensor | None]:
    """(model output, decoder output of the same forward), no gradient, random state replayed."""
    with (
        replayed_random_state(inputs),
        torch.no_grad(),
        recorded_output(peft_model.get_base_model().get_decoder()) as recorded,
    ):
        output = model(**inputs)
    return output, recorded[-1] if recorded else None


def _run_check(model: nn.Module, peft_model: PeftModel, model_inputs: dict, positions: torch.Tensor
               ) -> tuple[float, str | None, torch.dtype]:
    dtype = output_layer_of(peft_model).weight.dtype
    output, hidden = _recorded_forward(model, peft_model, {**model_inputs, "logits_to_keep": positions})
    logits = getattr(output, "logits", None)
    if logits is None or hidden is None:
        return float("inf"), "the check forward returned no logits or no decoder output", dtype
    if logits.dim() != 3 or logits.shape[1] != positions.numel() or hidden.dim() != 3:
        return float("inf"), "the model does not select logits by a logits_to_keep index tensor", dtype
    with torch.no_grad(), full_head_weight(peft_model) as weight:  # after the forward: it reshards
        fused = (hidden[:, positions].to(weight.dtype) @ weight.T).float()
    coarsest = max((weight.dtype, hidden.dtype, logits.dtype), key=lambda dtype: torch.finfo(dtype).eps)
    return _log_prob_error(fused, logits.float()), None, coarsest


def loss_window(labels: torch.Tensor, length: int = LOSS_CHECK_TOKENS) -> tuple[int, slice]:
    """(row, positions) of a short window ending at the last scored label of the most-scored row."""
    scored = labels.reshape(-1, labels.shape[-1]) != IGNORE_INDEX
    row = int(scored[:, 1:].sum(-1).argmax())
    indices = scored[row].nonzero().flatten()
    end = int(indices[-1]) + 1 if indices.numel() else labels.shape[-1]
    return row, slice(max(0, end - length), end)


def _window_inputs(model_inputs: dict, labels: torch.Tensor, row: int, window: slice) -> dict:
    """The inputs cut to one row and the window: every [batch-or-1, seq] tensor is sliced."""
    batch, seq = labels.shape[0], labels.shape[-1]

    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[-1] == seq:
            return value[row if value.shape[0] == batch else 0][None, window]
        return value

    return {key: cut(value) for key, value in model_inputs.items()}


def _run_loss_check(model: nn.Module, peft_model: PeftModel, model_inputs: dict, labels: torch.Tensor) -> float:
    """|model's own loss - fused cross-entropy| / max(1, |loss|) on a short window of the batch.

    Catches a task loss that is not the shifted next-token cross-entropy of
    those logits (the decoders of encoder-decoder models score unshifted
    labels, for example), which the logits comparison cannot see. The window
    keeps the full logits it needs small.
    """
    row, window = loss_window(labels)
    short_labels = labels[row][None, window]
    output, hidden = _recorded_forward(
        model, peft_model, {**_window_inputs(model_inputs, labels, row, window), "labels": short_labels}
    )
    loss = getattr(output, "loss", None)
    if loss is None or hidden is None:
        return float("inf")
    with torch.no_grad(), full_head_weight(peft_model) as weight:
        losses = fused_losses(hidden, None, short_labels, weight, top_k=None)
    if losses.count == 0:
        return 0.0
    return _error((loss.float() - losses.cross_entropy).abs() / loss.float().abs().clamp_min(1.0))


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Every rank must take the same path (their forwards and collectives must match)."""
    if not several_ranks():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def check_fused_head(model: nn.Module, peft_model: PeftModel, model_inputs: dict, labels: torch.Tensor
                     ) -> HeadCheck:
    """Compare the fused path's log-probabilities and task loss with the model's own on this batch.

    `model` is what the trainer calls (possibly wrapped), `model_inputs` the
    parent's prepared inputs without labels. Collective under torch.distributed:
    every rank must call it at the same step.
    """
    positions = checked_positions(labels)
    reason = None
    try:
        error, reason, dtype = _run_check(model, peft_model, model_inputs, positions)
        loss_error = _run_loss_check(model, peft_model, model_inputs, labels) if reason is None else float("inf")
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError) as failure:
        error = loss_error = float("inf")
        reason = reason or f"a check forward failed ({type(failure).__name__}: {failure})"
        dtype = torch.float32
    error, loss_error = _max_over_ranks([error, loss_error], labels.device)
    tolerance = tolerance_for(dtype)
    precision = f"tolerance {tolerance:.3g} for {str(dtype).removeprefix('torch.')}"
    if reason is None and not error <= tolerance:
        reason = (
            f"the model's own log-probabilities differ from lm_head(final hidden states) by {error:.3g} "
            f"of the logits' range ({precision}): it transforms its hidden states or logits around "
            "the output layer"
        )
    elif reason is None and not loss_error <= tolerance:
        reason = (
            f"the model's own loss differs from the shifted next-token cross-entropy of its logits by "
            f"{loss_error:.3g} relative ({precision}): its task loss is not the one the fused path computes"
        )
    return HeadCheck(error=max(error, loss_error), tolerance=tolerance, positions=positions.numel(), reason=reason)
