"""Task loss and regularizers from final hidden states, chunk by chunk: no [tokens, vocab] tensor.

The frozen lm_head W (vocab x hidden) is shared by the trained and the
reference forward, so every per-position quantity can be computed from the
hidden states one chunk of rows at a time, in float32. Gradients with
respect to the hidden states are formed analytically inside the same loop
(the logits of a chunk are recomputed, never stored), as Liger's fused
linear losses do:

* cross-entropy:   dCE/dz  = softmax(z) - onehot(y)
* consistency:     dKL/dz  = T (softmax(z/T) - softmax(z_ref/T))      (T^2-scaled KL)
* top-k entropy:   d(-H)/dz_K = pi (log pi + H), 0 outside the top K

The SVD term needs no vocabulary columns: with W = Q R (QR, Q orthonormal
columns), the singular values and the Frobenius norm of Z = H W^T equal those
of H R^T, an |M| x hidden matrix. The reference implementations in `losses`
are the oracle these are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import IGNORE_INDEX


@dataclass
class FusedSums:
    """Per-micro-batch sums over the scored positions (divide by `count` for means)."""

    cross_entropy: torch.Tensor
    consistency: torch.Tensor | None
    neg_entropy: torch.Tensor | None
    count: int


def scored_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden rows h_t, next-token targets) for the positions the causal-LM loss scores."""
    targets = labels[..., 1:]
    mask = targets != IGNORE_INDEX
    return hidden[..., :-1, :][mask], targets[mask]


def _chunk_sums_and_grads(
    rows: torch.Tensor,
    ref_rows: torch.Tensor | None,
    targets: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    top_k: int | None,
):
    """Sums of CE / KL / -H over one chunk and their gradients w.r.t. the chunk's logits.

    The matmul runs in the lm_head's dtype, as the model's own lm_head does;
    everything after it in float32.
    """
    logits = (rows.to(weight.dtype) @ weight.T).float()
    log_probs = F.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    ce = -log_probs.gather(-1, targets[:, None]).sum()
    grad_ce = probs
    grad_ce.scatter_add_(-1, targets[:, None], -torch.ones_like(targets[:, None], dtype=probs.dtype))

    kl = grad_kl = None
    if ref_rows is not None:
        ref_logits = (ref_rows.to(weight.dtype) @ weight.T).float()
        ref_log_probs = F.log_softmax(ref_logits / temperature, dim=-1)
        model_log_probs = F.log_softmax(logits / temperature, dim=-1)
        ref_probs = ref_log_probs.exp()
        kl = temperature**2 * (ref_probs * (ref_log_probs - model_log_probs)).sum()
        grad_kl = temperature * (model_log_probs.exp() - ref_probs)
        del ref_log_probs, model_log_probs, ref_probs

    neg_entropy = grad_neg_entropy = None
    if top_k is not None:
        if 0 < top_k < logits.shape[-1]:
            top_values, top_indices = logits.topk(top_k, dim=-1)
        else:
            top_values, top_indices = logits, None
        top_log_probs = F.log_softmax(top_values, dim=-1)
        top_probs = top_log_probs.exp()
        entropy = -(top_probs * top_log_probs).sum(-1, keepdim=True)
        neg_entropy = -entropy.sum()
        grad_top = top_probs * (top_log_probs + entropy)
        if top_indices is None:
            grad_neg_entropy = grad_top
        else:
            grad_neg_entropy = torch.zeros_like(logits).scatter_(-1, top_indices, grad_top)
    return (ce, kl, neg_entropy), (grad_ce, grad_kl, grad_neg_entropy)


class _FusedLosses(torch.autograd.Function):
    """Returns the three sums; keeps only per-term [rows, hidden] gradients for backward.

    A sum left out of the loss (a skipped term, a scheduled lambda of 0) gets
    no incoming gradient (None, not zeros): its saved gradient is never
    touched, so a NaN in it (say, an overflowed reference) cannot leak in as 0 * NaN.
    """

    @staticmethod
    def forward(ctx, rows, ref_rows, targets, weight, temperature, top_k, chunk_size):
        ctx.set_materialize_grads(False)
        sums = [rows.new_zeros((), dtype=torch.float32) for _ in range(3)]
        grads = [torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) for _ in range(3)]
        for start in range(0, rows.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            values, logit_grads = _chunk_sums_and_grads(
                rows[chunk],
                None if ref_rows is None else ref_rows[chunk],
                targets[chunk],
                weight,
                temperature,
                top_k,
            )
            for index, (value, logit_grad) in enumerate(zip(values, logit_grads)):
                if value is not None:
                    sums[index] = sums[index] + value
                    grads[index][chunk] = (logit_grad.to(weight.dtype) @ weight).float()
        ctx.save_for_backward(*grads)
        ctx.input_dtype = rows.dtype
        return tuple(sums)

    @staticmethod
    def backward(ctx, *incoming):
        grad_rows = None
        for grad_sum, grad_of_rows in zip(incoming, ctx.saved_tensors):
            if grad_sum is not None:
                term = grad_sum * grad_of_rows
                grad_rows = term if grad_rows is None else grad_rows + term
        if grad_rows is not None:
            grad_rows = grad_rows.to(ctx.input_dtype)
        return grad_rows, None, None, None, None, None, None


def fused_sums(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor | None,
    labels: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 2.0,
    top_k: int | None = 20,
    chunk_size: int = 256,
) -> FusedSums:
    """CE, consistency and negative top-k entropy sums over the scored positions.

    `hidden`/`ref_hidden`: final hidden states [batch, seq, hidden] (the inputs
    of the frozen `weight` = lm_head.weight, no bias, no softcap);
    `ref_hidden=None` skips the consistency term, `top_k=None` the entropy term.
    """
    rows, targets = scored_rows(hidden, labels)
    ref_rows = None if ref_hidden is None else scored_rows(ref_hidden.detach(), labels)[0]
    weight = weight.detach()
    if rows.shape[0] == 0:
        zero = hidden[..., :0].sum().float()  # 0, still in the graph, never NaN
        return FusedSums(zero, None if ref_rows is None else zero, None if top_k is None else zero, 0)
    ce, kl, neg_entropy = _FusedLosses.apply(
        rows, ref_rows, targets, weight, temperature, top_k, chunk_size
    )
    return FusedSums(
        cross_entropy=ce,
        consistency=None if ref_rows is None else kl,
        neg_entropy=None if top_k is None else neg_entropy,
        count=rows.shape[0],
    )


class LmHeadFactor:
    """R of lm_head.weight = Q R, computed once in float32 and recomputed if the weight changes."""

    def __init__(self) -> None:
        self._key: tuple[int, int, torch.device] | None = None
        self._r: torch.Tensor | None = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.device)
        if key != self._key:
            self._r = torch.linalg.qr(weight.detach().float(), mode="r").R
            self._key = key
        return self._r


def svd_ratio_from_hidden(
    hidden: torch.Tensor, labels: torch.Tensor, r_factor: torch.Tensor, k: int = 10,
    norm: str = "frobenius",
) -> torch.Tensor:
    """L_SVDR of Z = H W^T computed exactly from H R^T (|M| x hidden), W = Q R."""
    rows, _ = scored_rows(hidden, labels)
    if rows.shape[0] == 0:
        return hidden[..., :0].sum().float()
    projected = rows.float() @ r_factor.T
    singular_values = torch.linalg.svdvals(projected)
    denominator = singular_values.sum() if norm == "nuclear" else torch.linalg.norm(projected)
    if denominator.item() == 0.0:
        return hidden[..., :0].sum().float()
    return -singular_values[:k].sum() / denominator
