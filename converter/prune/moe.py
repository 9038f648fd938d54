"""MoE-fication of a dense FFN and per-language expert statistics (pure tensor math, no I/O).

After Zhang et al. 2022 (MoEfication, arXiv:2110.01786) and Liu et al. 2024 ("Unraveling Babel", arXiv:2402.16367):
the intermediate neurons of one FFN are split into E experts of equal size by balanced k-means over the rows of
the up-projection (gate and down follow the same assignment, since neuron j is row j of gate/up and column j of
down). An expert's activation on a token is the sum of |a_j| over its neurons, a = act(gate(x)) ⊙ up(x) the
input of down_proj; divided by the layer's total over experts it compares across layers. Its activation
frequency is the share of tokens on which it is among the top ``E/4`` experts of that token.
"""

from __future__ import annotations

import torch


def balanced_kmeans(rows: torch.Tensor, n_experts: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Assign each row of ``rows`` (I, H) to one of ``n_experts`` clusters of sizes ⌊I/E⌋ or ⌈I/E⌉.

    Rows are L2-normalised; centroids start at distinct random rows; each iteration assigns greedily by
    ascending distance (a row goes to its nearest centroid that still has room) and moves every centroid to the
    mean of its rows. Returns labels (I,) int64, deterministic for a given ``seed``.
    """
    n = rows.shape[0]
    if not 1 <= n_experts <= n:
        raise ValueError(f"n_experts must be in 1..{n}, got {n_experts}")
    if n_experts == n:  # one neuron per expert: the only balanced assignment, up to naming
        return torch.arange(n)
    x = torch.nn.functional.normalize(rows.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:n_experts]].clone()
    caps = torch.full((n_experts,), n // n_experts, dtype=torch.long)
    caps[: n % n_experts] += 1
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        d = torch.cdist(x, centroids)  # (I, E)
        new = _greedy_assign(d, caps)
        if torch.equal(new, labels):
            break
        labels = new
        for e in range(n_experts):
            centroids[e] = x[labels == e].mean(0)
    return labels


def _greedy_assign(dist: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Walk (row, centroid) pairs by ascending distance; a row takes the first centroid with room left."""
    n, e = dist.shape
    order = torch.argsort(dist.flatten(), stable=True).tolist()
    labels = [-1] * n
    room = caps.tolist()
    left = n
    for flat in order:
        i, j = divmod(flat, e)
        if labels[i] >= 0 or room[j] == 0:
            continue
        labels[i] = j
        room[j] -= 1
        left -= 1
        if left == 0:
            break
    return torch.tensor(labels, dtype=torch.long)


class ExpertStats:
    """Running per-group (language) sums over tokens of normalised expert activation and top-k frequency."""

    def __init__(self, labels: torch.Tensor, n_experts: int):
        self.labels = labels
        self.n_experts = n_experts
        self.topk = max(1, n_experts // 4)
        self.act: dict[str, torch.Tensor] = {}
        self.freq: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def expert_activation(self, a: torch.Tensor) -> torch.Tensor:
        """(T, I) intermediate activations -> (T, E) sum of |a_j| over each expert's neurons."""
        out = torch.zeros(a.shape[0], self.n_experts, dtype=torch.float32, device=a.device)
        out.index_add_(1, self.labels.to(a.device), a.abs().float())
        return out

    def add(self, group: str, a: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1])
        per = self.expert_activation(a)
        norm = per / per.sum(1, keepdim=True).clamp_min(1e-12)  # each token's shares sum to 1
        top = torch.zeros_like(per)
        top.scatter_(1, per.topk(self.topk, dim=1).indices, 1.0)
        self.act[group] = self.act.get(group, 0) + norm.sum(0).cpu()
        self.freq[group] = self.freq.get(group, 0) + top.sum(0).cpu()
        self.tokens[group] = self.tokens.get(group, 0) + a.shape[0]

    def mean_activation(self, group: str) -> torch.Tensor:
        """(E,) mean normalised activation share of each expert on ``group``'s tokens."""
        return self.act[group] / max(self.tokens[group], 1)

    def frequency(self, group: str) -> torch.Tensor:
        """(E,) share of ``group``'s tokens on which each expert is in the top E/4."""
        return self.freq[group] / max(self.tokens[group], 1)
