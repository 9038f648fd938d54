"""SparseGPT: one-shot pruning with a second-order weight update. Pure tensor math, no I/O.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774, Algorithm 1. For a linear layer with weight W (rows, cols) and calibration inputs X (tokens,
cols), H = X^T X (the factor 2 of the paper does not change the result). Columns are visited left to right in
blocks of ``blocksize``; within a block the mask is chosen from the scores w² / [H^-1]_jj² (unstructured: the
smallest ``sparsity`` share of the whole block; N:M: the N smallest of every M consecutive columns of a row),
and each pruned weight's error is spread over the not yet visited columns of its row through the upper
Cholesky factor of H^-1 (Eq. 3), so the kept weights take up what the pruned ones contributed. Columns no
calibration token touched (H_jj = 0) are dead: set to zero, with H_jj = 1 so H stays invertible. Dampening adds
``percdamp`` · mean(diag H) to the diagonal.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running H = Σ_t x_t x_tᵀ over calibration tokens, in float64. add_batch takes (..., in_features)."""

    def __init__(self, in_features: int, device: str | torch.device = "cpu") -> None:
        self.in_features = in_features
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, self.in_features).float()
        self.h += (flat.T @ flat).double().to(self.h.device)
        self.tokens += flat.shape[0]


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned weight (same dtype) and keep-mask (True = kept) for ``weight`` (rows, cols), ``hessian`` (cols, cols).

    ``nm`` (N, M): N zeros in every M consecutive columns of each row (``sparsity`` is then N/M); M must divide
    ``blocksize``.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for weight {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")
    w = weight.detach().double().clone(memory_format=torch.contiguous_format)  # also for a transposed view
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        if nm is None:
            score = w1.square() / d.square().unsqueeze(0)
            k = int(score.numel() * sparsity)
            pruned = torch.zeros_like(w1, dtype=torch.bool)
            if k:
                order = torch.argsort(score.flatten(), stable=True)[:k]
                pruned.view(-1)[order] = True
        else:
            pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                s = w1[:, i : i + nm[1]].square() / d[i : i + nm[1]].square().unsqueeze(0)
                idx = torch.argsort(s, dim=1, stable=True)[:, : nm[0]]
                pruned[:, i : i + nm[1]].scatter_(1, idx, True)
            col = w1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~pruned
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep &= ~dead.unsqueeze(0)
    return w.to(weight.dtype), keep
