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

from .losses import IGNORE_INDEX, svd_ratio_rows


@dataclass
class ChunkedLosses:
    """One micro-batch's fused losses; everything stays on the device (no host sync).

    `objective` is the only differentiable output: mean CE + lambda_consistency
    * mean KL + lambda_diversity * mean(-H) over the kept terms. The others are
    detached values for the logs; `*_kept` say whether a term entered the loss.
    """

    objective: torch.Tensor
    cross_entropy: torch.Tensor
    consistency: torch.Tensor | None
    neg_entropy: torch.Tensor | None
    consistency_kept: torch.Tensor | None
    diversity_kept: torch.Tensor | None
    count: torch.Tensor


def scored_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows h_t [N, hidden], next-token targets [N], scored mask [N]) over every position t < seq - 1.

    Every position is kept, the ignored ones zeroed and masked, instead of being
    gathered with a boolean index: that gather has a data-dependent size, which
    the host must read (a sync per micro-batch). The cost is computing the
    ignored rows too, as the model's own lm_head and Liger's fused losses do.
    """
    targets = labels[..., 1:].reshape(-1)
    mask = targets != IGNORE_INDEX
    rows = hidden[..., :-1, :].reshape(-1, hidden.shape[-1])
    rows = torch.where(mask[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return rows, torch.where(mask, targets, torch.zeros_like(targets)), mask


# Largest |logit| the fused math admits: below half the head dtype's range (the
# matmul's rounding) and small enough that float32 sums over any batch stay finite.
_LOGIT_LIMIT = 2.0**60


def logits_are_safe(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Device bool: `rows @ weight.T` is finite and every term computed from it is too.

    |h . w_v| <= ||h|| ||w_v|| (Cauchy-Schwarz), so finite rows under this bound
    cannot overflow the head's dtype; finite logits give finite log-softmax,
    KL, entropy and their gradients. A false answer is conservative (the rows
    may still be fine), never the other way round.
    """
    limit = min(torch.finfo(weight.dtype).max / 2, _LOGIT_LIMIT)
    row_norm = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).max()
    weight_norm = torch.linalg.vector_norm(weight, dim=-1, dtype=torch.float32).max()
    return torch.isfinite(rows).all() & (row_norm * weight_norm < limit)


class _ChunkBuffers:
    """The [chunk, vocab] float32 work tensors, allocated once per call and reused by every chunk.

    A fresh tensor of that size is a fresh mapping from the allocator on CPU
    (above glibc's mmap threshold), and touching it page-faults: measured here,
    an out-of-place exp over 256 x 49,152 floats took 14 ms, into a reused
    buffer 2.5 ms. Five buffers: the logits, the gradient, and three for the
    consistency term (reference log-probs, model log-probs at T, a scratch).
    """

    def __init__(self, rows: int, vocab: int, device: torch.device, consistency: bool) -> None:
        count = 5 if consistency else 2
        self._buffers = [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(count)]

    def take(self, rows: int) -> list[torch.Tensor]:
        return [buffer[:rows] for buffer in self._buffers]


def _logits_into(out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows @ weight.T in the lm_head's dtype (as the model's own lm_head), stored as float32."""
    if weight.dtype == torch.float32:
        return torch.mm(rows, weight.T, out=out)
    return out.copy_(rows @ weight.T)


def _chunk_values_and_gradient(rows, ref_rows, targets, weight, temperature, top_k, coefficients, entropy_gate,
                               buffers: _ChunkBuffers):
    """Per-row CE / KL / -H of one chunk and d(objective)/d(logits), one [rows, vocab] gradient.

    coefficients = (lambda_consistency, lambda_diversity) for the objective
    CE + lambda_c KL + lambda_d (-H); `entropy_gate` (a device 0/1) switches
    the entropy's gradient off when its input failed the safety check. The
    matmul runs in the lm_head's dtype, as the model's own lm_head does;
    everything after it in float32.
    """
    lambda_consistency, lambda_diversity = coefficients
    logits, gradient, *consistency_buffers = buffers.take(rows.shape[0])
    _logits_into(logits, rows, weight)
    # torch.log_softmax takes no out=; its aten form does, and writes into the reused buffer.
    torch._log_softmax(logits, -1, False, out=gradient)
    ce = -gradient.gather(-1, targets[:, None]).view(-1)
    gradient.exp_()  # softmax(z): dCE/dz before the one-hot
    gradient.scatter_add_(-1, targets[:, None], torch.full_like(targets[:, None], -1, dtype=gradient.dtype))

    kl = None
    if ref_rows is not None:
        # KL(p_ref || q), q = softmax(z/T), p_ref = softmax(z_ref/T): T^2 sum_v p_ref (log p_ref - log q).
        ref_log_probs, model_log_probs, scratch = consistency_buffers
        _logits_into(scratch, ref_rows, weight).div_(temperature)
        torch._log_softmax(scratch, -1, False, out=ref_log_probs)
        torch._log_softmax(torch.div(logits, temperature, out=scratch), -1, False, out=model_log_probs)
        torch.sub(ref_log_probs, model_log_probs, out=scratch)
        ref_probs = ref_log_probs.exp_()
        kl = temperature**2 * scratch.mul_(ref_probs).sum(-1)
        if lambda_consistency:  # dKL/dz = T (q - p_ref)
            gradient.add_(model_log_probs.exp_().sub_(ref_probs), alpha=lambda_consistency * temperature)

    neg_entropy = None
    if top_k is not None:
        top_values, top_indices = logits.topk(top_k, dim=-1) if 0 < top_k < logits.shape[-1] else (logits, None)
        top_log_probs = F.log_softmax(top_values, dim=-1)
        top_probs = top_log_probs.exp()
        entropy = -(top_probs * top_log_probs).sum(-1, keepdim=True)
        neg_entropy = -entropy.view(-1)
        if lambda_diversity:  # d(-H)/dz_K = pi (log pi + H), 0 outside the top K
            entropy_gradient = top_probs.mul_(top_log_probs.add_(entropy)).mul_(lambda_diversity * entropy_gate)
            if top_indices is None:
                gradient.add_(entropy_gradient)
            else:
                gradient.scatter_add_(-1, top_indices, entropy_gradient)
    return (ce, kl, neg_entropy), gradient


class _FusedObjective(torch.autograd.Function):
    """Sum over scored rows of CE + lambda_c KL + lambda_d (-H); keeps one [rows, hidden] gradient.

    The three terms' logit gradients are added (with their lambdas) before the
    one matmul with the head, so backward costs one head matmul per chunk, not
    one per term. A term's lambda must therefore be known, and its skip
    decided, before the loop: the trainer passes the lambdas of this step, and
    a term whose input fails `logits_are_safe` is switched off on the device
    (the consistency by comparing the trained rows with themselves, which is
    exactly 0 with exactly 0 gradient; the entropy by a 0 gate).
    Returns (objective sum, CE sum, KL sum, -H sum, consistency kept, diversity kept).
    """

    @staticmethod
    def forward(ctx, rows, ref_rows, targets, mask, weight, temperature, top_k, coefficients, chunk_size):
        lambda_consistency, lambda_diversity = coefficients
        input_dtype = rows.dtype
        rows = rows.to(weight.dtype)
        rows_safe = logits_are_safe(rows, weight)
        consistency_kept = diversity_kept = None
        if ref_rows is not None:
            ref_rows = ref_rows.to(weight.dtype)
            consistency_kept = rows_safe & logits_are_safe(ref_rows, weight)
            ref_rows = torch.where(consistency_kept, ref_rows, rows)
        if top_k is not None:
            diversity_kept = rows_safe
        entropy_gate = rows_safe.float()
        scale = mask.to(torch.float32)
        sums = [rows.new_zeros((), dtype=torch.float32) for _ in range(3)]
        grad_rows = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
        buffers = _ChunkBuffers(min(chunk_size, rows.shape[0]), weight.shape[0], rows.device, ref_rows is not None)
        for start in range(0, rows.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            values, logit_gradient = _chunk_values_and_gradient(
                rows[chunk], None if ref_rows is None else ref_rows[chunk], targets[chunk], weight,
                temperature, top_k, coefficients, entropy_gate, buffers,
            )
            for index, value in enumerate(values):
                if value is not None:
                    sums[index] = sums[index] + (value * scale[chunk]).sum()
            if weight.dtype == torch.float32:
                torch.mm(logit_gradient, weight, out=grad_rows[chunk])
            else:
                grad_rows[chunk] = logit_gradient.to(weight.dtype) @ weight
            grad_rows[chunk] *= scale[chunk, None]
        del buffers
        ce, kl, neg_entropy = sums[0], sums[1] if ref_rows is not None else None, sums[2] if top_k is not None else None
        if consistency_kept is not None:
            consistency_kept = consistency_kept & torch.isfinite(kl)
        if diversity_kept is not None:
            diversity_kept = diversity_kept & torch.isfinite(neg_entropy)
        objective = ce.clone()  # its own tensor: the logged sums are marked non-differentiable
        for kept, value, weight_of_term in ((consistency_kept, kl, lambda_consistency),
                                            (diversity_kept, neg_entropy, lambda_diversity)):
            if kept is not None and weight_of_term:
                objective = objective + weight_of_term * torch.where(kept, value, torch.zeros_like(value))
        ctx.save_for_backward(grad_rows)
        ctx.input_dtype = input_dtype
        outputs = (objective, ce, kl, neg_entropy, consistency_kept, diversity_kept)
        ctx.mark_non_differentiable(*(output for output in outputs[1:] if output is not None))
        return outputs

    @staticmethod
    def backward(ctx, grad_objective, *_unused):
        (grad_rows,) = ctx.saved_tensors
        return (grad_objective * grad_rows).to(ctx.input_dtype), *(None,) * 8


def fused_losses(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor | None,
    labels: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 2.0,
    top_k: int | None = 20,
    lambda_consistency: float = 0.0,
    lambda_diversity: float = 0.0,
    chunk_size: int = 256,
) -> ChunkedLosses:
    """Mean CE, consistency and negative top-k entropy over the scored positions, and their objective.

    `hidden`/`ref_hidden`: final hidden states [batch, seq, hidden] (the inputs
    of the frozen `weight` = lm_head.weight, no bias, no softcap);
    `ref_hidden=None` skips the consistency term, `top_k=None` the entropy term.
    The lambdas weight the terms in `objective` (0: computed for the logs only).
    """
    rows, targets, mask = scored_positions(hidden, labels)
    ref_rows = None if ref_hidden is None else scored_positions(ref_hidden.detach(), labels)[0]
    objective, ce, kl, neg_entropy, consistency_kept, diversity_kept = _FusedObjective.apply(
        rows, ref_rows, targets, mask, weight.detach(), temperature, top_k,
        (lambda_consistency, lambda_diversity), chunk_size,
    )
    count = mask.sum()
    denominator = count.clamp_min(1).to(torch.float32)
    return ChunkedLosses(
        objective=objective / denominator,
        cross_entropy=ce / denominator,
        consistency=None if kl is None else kl / denominator,
        neg_entropy=None if neg_entropy is None else neg_entropy / denominator,
        consistency_kept=consistency_kept,
        diversity_kept=diversity_kept,
        count=count,
    )


class LmHeadFactor:
    """R of lm_head.weight = Q R, in float32, recomputed if the weight changes.

    `fixed=True` computes it once, for a sharded (frozen) head: each gather brings new storage,
    which the storage-and-version key would take for a changed weight (one QR per step).
    """

    def __init__(self, fixed: bool = False) -> None:
        self._fixed = fixed
        self._key: tuple[int, int, torch.device] | None = None
        self._r: torch.Tensor | None = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        key = None if self._fixed else (weight.data_ptr(), weight._version, weight.device)
        if self._r is None or key != self._key:
            self._r = torch.linalg.qr(weight.detach().float(), mode="r").R
            self._key = key
        return self._r


def svd_ratio_from_hidden(
    hidden: torch.Tensor, labels: torch.Tensor, r_factor: torch.Tensor, k: int = 10,
    norm: str = "frobenius",
) -> torch.Tensor:
    """L_SVDR of Z = H W^T computed exactly from H R^T, W = Q R.

    The ignored positions enter as zero rows, which change neither the
    singular values nor the norm (and need no data-dependent gather).
    """
    rows, _, _ = scored_positions(hidden, labels)
    return svd_ratio_rows(rows.float() @ r_factor.T, k, norm)
