"""Structured FFN pruning: choose the neurons to keep, shrink gate/up/down, refit down_proj (pure tensor math).

Removing FFN neurons j (rows of gate_proj and up_proj, columns of down_proj) gives a smaller
``intermediate_size`` that every runtime computes less for, unlike zeros stored densely.

Compensation without retraining: with A (T, I) the down-projection's inputs on calibration tokens and W (H, I)
its weight, the kept columns K get W'_K = argmin ‖A_K W'^T − A W^T‖², i.e.

    W'^T = (G_KK + λ I)^-1 G_K: W^T,      G = A^T A,   λ = damp · mean(diag G_KK)

so the output the removed neurons contributed is taken up by the kept ones where they correlate with them.

Choosing what to remove by that same objective (``obs_remove``): with H = G + λI and H⁻¹ its inverse, removing
the neurons E (one expert, or one neuron) and refitting the rest optimally adds

    ΔE = tr(W_:E ([H⁻¹]_EE)⁻¹ W_:Eᵀ)

to the error (the Optimal Brain Surgeon cost, Hassibi & Stork 1993, taken over a group of columns as in
structured OBS pruning of LLMs, e.g. Kurtic et al. 2023 ZipLM, arXiv:2302.04089). Experts are removed one at a
time, cheapest first, and after each removal W and H⁻¹ are updated exactly as the least squares would
(W ← W − W_:E [H⁻¹]_EE⁻¹ [H⁻¹]_E:, H⁻¹ ← H⁻¹ − [H⁻¹]_:E [H⁻¹]_EE⁻¹ [H⁻¹]_E:), so the next cost accounts for what
the neurons already removed took with them.
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


def obs_remove(
    w_down: torch.Tensor,
    gram: torch.Tensor,
    labels: torch.Tensor,
    n_remove: int,
    damp: float = 0.01,
    max_rounds: int = 64,
) -> torch.Tensor:
    """Neuron indices (sorted) kept after removing ``n_remove`` experts greedily by their OBS cost (module doc).

    ``w_down`` (H, I), ``gram`` (I, I) = Σ a aᵀ, ``labels`` (I,) expert of each neuron, every expert the same
    size (one neuron each when ``labels`` is ``arange(I)``). Ties break towards the lower expert index. At most
    ``max_rounds`` greedy rounds: up to that many removals every expert goes on its own; beyond it each round
    removes the ⌈n_remove / max_rounds⌉ cheapest together (their joint cost and update are exact), which keeps
    single-neuron selection on a 2048-wide FFN to seconds.
    """
    n_experts = int(labels.max()) + 1 if labels.numel() else 0
    if not 0 <= n_remove < n_experts:
        raise ValueError(f"n_remove must be in 0..{n_experts - 1}, got {n_remove}")
    counts = torch.bincount(labels, minlength=n_experts)
    if int(counts.min()) != int(counts.max()):
        raise ValueError("obs_remove needs experts of equal size")
    size = int(counts[0])
    # neurons ordered expert by expert, so expert e is the contiguous slice [e*size, (e+1)*size)
    perm = torch.argsort(labels, stable=True)
    g = gram.double()[perm][:, perm]
    lam = damp * float(g.diagonal().mean().clamp_min(1e-12))
    h = g + lam * torch.eye(g.shape[0], dtype=torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))  # (I, I)
    w = w_down.double()[:, perm].contiguous()  # (H, I)
    alive = torch.ones(n_experts, dtype=torch.bool)
    per_round = max(1, -(-n_remove // max_rounds))
    eye = torch.eye(size, dtype=torch.float64)
    left = n_remove
    while left:
        # [H⁻¹]_EE of every expert: the diagonal blocks, (E, s, s)
        blocks = hinv.reshape(n_experts, size, n_experts, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        blocks = torch.where(alive[:, None, None], blocks, eye)  # removed experts' rows of H⁻¹ are zero
        w_e = w.reshape(-1, n_experts, size).permute(1, 2, 0)  # (E, s, H)
        if size == 1:
            cost = w_e.square().sum((1, 2)) / blocks[:, 0, 0]
        else:
            cost = (w_e * torch.cholesky_solve(w_e, torch.linalg.cholesky(blocks))).sum((1, 2))
        cost[~alive] = float("inf")
        take = min(per_round, left)
        chosen = sorted(sorted(range(n_experts), key=lambda e: (float(cost[e]), e))[:take])
        cols = torch.cat([torch.arange(e * size, (e + 1) * size) for e in chosen])
        rows = hinv[cols, :]  # (c, I)
        solved = torch.linalg.solve(rows[:, cols], rows)  # [H⁻¹]_RR⁻¹ [H⁻¹]_R:
        w -= w[:, cols] @ solved
        hinv -= rows.T @ solved
        w[:, cols] = 0.0
        alive[chosen] = False
        left -= take
    kept = alive.repeat_interleave(size)
    return perm[kept].sort().values


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
