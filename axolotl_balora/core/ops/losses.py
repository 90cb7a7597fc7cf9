"""The three causal-LM regularizers of BA-LoRA, written plainly (spec section 2).

These are the reference definitions: readable, computed from full logits in
float32, and used by the trainer's plain path and as the oracle for any
faster implementation. The three term functions take logits `[batch, seq, vocab]`
and labels `[batch, seq]` (-100 = ignored) and apply the causal-LM shift
themselves, so the positions they average over are exactly those of the task
loss. The `*_rows` helpers compute on a plain matrix of rows; the
classification form (`classification_terms.py`) shares them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import SVD_NORM_CHOICES

IGNORE_INDEX = -100


def selected_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows z_t (float32) for the positions t whose next-token label is not ignored.

    Position t predicts labels[t + 1], as in the causal-LM cross-entropy.
    """
    shifted_labels = labels[..., 1:]
    mask = shifted_labels != IGNORE_INDEX
    return logits[..., :-1, :][mask].float()


def _zero_like(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=logits.device)


def consistency_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """L_CR = T^2 * mean_t KL(softmax(z_ref/T) || softmax(z/T)) over the task-loss positions."""
    model_rows = selected_logits(logits, labels)
    if model_rows.shape[0] == 0:
        return _zero_like(logits)
    return kl_rows(model_rows, selected_logits(ref_logits, labels), temperature)


def kl_rows(rows: torch.Tensor, ref_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_i KL(softmax(ref_i/T) || softmax(z_i/T)) over the rows of [n, classes], n >= 1.

    Shared by the causal-LM form (rows = scored positions) and the
    classification form (rows = examples).
    """
    ref_log_probs = F.log_softmax(ref_rows / temperature, dim=-1)
    model_log_probs = F.log_softmax(rows / temperature, dim=-1)
    kl_per_row = (ref_log_probs.exp() * (ref_log_probs - model_log_probs)).sum(-1)
    return temperature**2 * kl_per_row.mean()


def diversity_entropy(
    logits: torch.Tensor, labels: torch.Tensor, top_k: int = 20
) -> torch.Tensor:
    """L_DR = -mean_t H(softmax(topK(z_t))); minimizing it raises entropy. top_k=0: full vocab."""
    rows = selected_logits(logits, labels)
    if rows.shape[0] == 0:
        return _zero_like(logits)
    if 0 < top_k < rows.shape[-1]:
        rows = rows.topk(top_k, dim=-1).values
    log_probs = F.log_softmax(rows, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return -entropy.mean()


def svd_ratio(
    logits: torch.Tensor,
    labels: torch.Tensor,
    k: int = 10,
    norm: str = "frobenius",
) -> torch.Tensor:
    """L_SVDR = -(sum of the top-k singular values of Z) / ||Z||, Z = |M| x vocab.

    `norm="frobenius"` divides by ||Z||_F (the authors' code), `"nuclear"` by the
    sum of all singular values (the paper's formula). Fewer rows than k: all
    singular values are used. Raises torch.linalg.LinAlgError if the SVD fails;
    the trainer catches that and skips the term for the step.
    """
    return svd_ratio_rows(selected_logits(logits, labels), k, norm)


def svd_ratio_rows(rows: torch.Tensor, k: int, norm: str) -> torch.Tensor:
    """-(sum of the top-k singular values of `rows`) / its norm; 0 for no rows or a zero matrix.

    Shared by the causal-LM form (rows = scored positions) and the
    classification form (rows = examples, nuclear norm).
    """
    if norm not in SVD_NORM_CHOICES:
        raise ValueError(f"norm: {norm!r} is not allowed; allowed: {', '.join(SVD_NORM_CHOICES)}")
    if rows.shape[0] == 0:
        return _zero_like(rows)
    singular_values = torch.linalg.svdvals(rows)
    denominator = singular_values.sum() if norm == "nuclear" else torch.linalg.norm(rows)
    # A zero matrix gives 0 (not 0/0), decided on the device: no host sync.
    nonzero = denominator > 0
    ratio = -singular_values[:k].sum() / torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, ratio, torch.zeros_like(ratio))
