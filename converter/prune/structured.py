"""Structured FFN pruning: choose the neurons to keep, shrink gate/up/down, refit down_proj (pure tensor math).

Removing FFN neurons j (rows of gate_proj and up_proj, columns of down_proj) gives a smaller
``intermediate_size`` that every runtime computes less for, unlike zeros stored densely.

Compensation without retraining: with A (T, I) the down-projection's inputs on calibration tokens and W (H, I)
its weight, the kept columns K get W'_K = argmin ‖A_K W'^T − A W^T‖², i.e.

    W'^T = (G_KK + λ I)^-1 G_K: W^T,      G = A^T A,   λ = damp · mean(diag G_KK)

so the output the removed neurons contributed is taken up by the kept ones where they correlate with them.
"""

from __future__ import annotations

import torch
from torch import nn


def keep_from_experts(scores: torch.Tensor, labels: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Neuron indices (sorted) of every expert except the ``n_remove`` lowest-scoring ones.

    ``scores`` (E,) per expert, ``labels`` (I,) expert of each neuron. Ties break towards removing the
    higher expert index, so the choice is deterministic.
    """
    n_experts = scores.numel()
    if not 0 <= n_remove < n_experts:
        raise ValueError(f"n_remove must be in 0..{n_experts - 1}, got {n_remove}")
    order = sorted(range(n_experts), key=lambda e: (float(scores[e]), -e))
    removed = set(order[:n_remove])
    keep = [j for j in range(labels.numel()) if int(labels[j]) not in removed]
    return torch.tensor(keep, dtype=torch.long)


def keep_from_neurons(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (sorted) of the ``n_keep`` highest-scoring neurons; ties keep the lower index."""
    if not 0 < n_keep <= scores.numel():
        raise ValueError(f"n_keep must be in 1..{scores.numel()}, got {n_keep}")
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))
    return torch.tensor(sorted(order[:n_keep]), dtype=torch.long)


def wanda_sp_scores(
    gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, x_sq: torch.Tensor, a_sq: torch.Tensor
) -> torch.Tensor:
    """Per-neuron Wanda scores summed over the neuron's weights (An et al. 2024, Wanda-sp):
    Σ_h (|gate_jh| + |up_jh|)·‖x_h‖ + Σ_o |down_oj|·‖a_j‖, with ``x_sq`` (H,) and ``a_sq`` (I,) the summed
    squares of the FFN input and of the down-projection input over calibration tokens."""
    xn = x_sq.float().sqrt()
    s = up.abs().float() @ xn
    if gate is not None:
        s = s + gate.abs().float() @ xn
    return s + down.abs().float().sum(0) * a_sq.float().sqrt()


def refit_down(w_down: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Least-squares weight (H, |K|) for the kept columns (see module doc). ``gram`` (I, I) = Σ a aᵀ."""
    g = gram.double()
    gkk = g[keep][:, keep]
    lam = damp * float(gkk.diagonal().mean().clamp_min(1e-12))
    rhs = g[keep] @ w_down.double().T  # (|K|, H)
    sol = torch.linalg.solve(gkk + lam * torch.eye(len(keep), dtype=torch.float64), rhs)
    return sol.T.to(w_down.dtype).contiguous()


def reconstruction_error(w_down: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, w_new: torch.Tensor) -> float:
    """Σ_t ‖a_t,K w_newᵀ − a_t wᵀ‖² from the Gram matrix alone (no activations kept)."""
    g = gram.double()
    w = w_down.double()
    full = torch.zeros_like(w)
    full[:, keep] = w_new.double()
    d = full - w  # (H, I): error weight on the full activation vector
    return float(torch.einsum("hi,ij,hj->", d, g, d))


def shrink_linear(lin: nn.Linear, index: torch.Tensor, dim: int, weight: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping ``index`` along ``dim`` of the weight (0: output rows, 1: input columns)."""
    w = lin.weight.data.index_select(dim, index.to(lin.weight.device)) if weight is None else weight
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data if dim == 1 else lin.bias.data[index.to(lin.bias.device)])
    return new
