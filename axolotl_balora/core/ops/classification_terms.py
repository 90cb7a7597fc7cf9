"""The classification (NLU) form's terms on per-example logits Z [N, C] (spec section 3).

Pure torch, the plain reference for the classification path: diversity decorrelates
the logit dimensions, svd is the top-k share of Z's singular values, and consistency
compares the pooled features the head reads (a fresh head has no pre-trained logits);
`logit_consistency_kl` is the logit form, for a head that is itself pre-trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import kl_rows, svd_ratio_rows


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
