"""Keep-masks from importance scores, and measured sparsity. Pure tensor math, no I/O.

Scores are compared *per output row* (Wanda, Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
Language Models", arXiv:2306.11695, §3: the metric S_ij = |W_ij| · ‖X_j‖₂ is ranked among the weights that feed the
same output i, not over the whole matrix). The semi-structured N:M pattern zeroes the N lowest-scoring of every M
consecutive input weights of a row (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks",
arXiv:2104.08378; Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
arXiv:2102.04010), which is what 2:4 sparse tensor cores accelerate.

Ties are broken deterministically: among equal scores the entry with the lower input index is pruned first
(the order of a stable ascending sort), so the same scores always give the same mask.
"""

from __future__ import annotations

import math

import torch


def prune_count(in_features: int, sparsity: float) -> int:
    """Weights pruned per row for an unstructured target: round-half-up of sparsity · in_features."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return min(in_features, math.floor(sparsity * in_features + 0.5))


def lowest_k(score: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Bool tensor, True at the ``k`` lowest entries along ``dim``; among equal scores the lower index first.

    The same selection as the first ``k`` of a stable ascending sort, without the sort: the k-th value is the
    threshold, everything below it is taken, and the ties at it are taken in index order until ``k`` are.
    O(n) per row instead of O(n log n), which is most of the mask time for the wide matrices of an LLM."""
    n = score.shape[dim]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thr = torch.kthvalue(score, k, dim=dim, keepdim=True).values
    below = score < thr
    tie = score == thr
    need = k - below.sum(dim=dim, keepdim=True)
    return below | (tie & (tie.cumsum(dim=dim) <= need))


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = keep) pruning the ``prune_count(in, sparsity)`` lowest scores of every output row.

    score: (out_features, in_features); returns a bool tensor of the same shape and device.
    """
    if score.ndim != 2:
        raise ValueError(f"score must be 2-D (out_features, in_features), got shape {tuple(score.shape)}")
    return ~lowest_k(score, prune_count(score.shape[1], sparsity), dim=1)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask zeroing the ``n`` lowest scores in every group of ``m`` consecutive inputs of each row.

    score: (out_features, in_features) with in_features divisible by m; returns bool, same shape.
    """
    if score.ndim != 2:
        raise ValueError(f"score must be 2-D (out_features, in_features), got shape {tuple(score.shape)}")
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    out_f, in_f = score.shape
    if in_f % m != 0:
        raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {in_f}")
    groups = score.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, :n], False)
    return mask.reshape(out_f, in_f)


def measured_sparsity(weight: torch.Tensor) -> float:
    """Share of exactly-zero entries in ``weight`` (0.0 for an empty tensor)."""
    numel = weight.numel()
    return int((weight == 0).sum()) / numel if numel else 0.0
