"""Wanda and magnitude importance scores. Pure tensor math, no I/O.

Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695,
Eq. 1): S_ij = |W_ij| · ‖X_j‖₂, where X_j is input channel j of the linear layer collected over every calibration
token, and S is compared within each output row i (see masks.py). locuslab/wanda computes it as
``|W| * sqrt(scaler_row)``, with scaler_row a running *mean* of the squared norms.

Here :class:`ActivationNorms` keeps the running *sum* Σ_t x_tj² in float64. A mean differs from the sum only by
one positive factor for the whole matrix, so both give exactly the same per-row ranking and the same masks.
Magnitude pruning is the data-free baseline S_ij = |W_ij|.
"""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32. weight: (out_features, in_features)."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · sqrt(act_sq_norm_j) in float32.

    weight: (out_features, in_features); act_sq_norm: (in_features,) squared L2 norm of each input channel.
    """
    if act_sq_norm.ndim != 1 or act_sq_norm.shape[0] != weight.shape[1]:
        raise ValueError(
            f"act_sq_norm must have shape ({weight.shape[1]},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(act_sq_norm.shape)}"
        )
    norm = act_sq_norm.to(device=weight.device, dtype=torch.float64).sqrt().float()  # (in,)
    return weight.detach().abs().float() * norm.unsqueeze(0)


class ActivationNorms:
    """Running Σ over tokens of x_j² per input channel j, fed batch by batch.

    ``add_batch`` takes activations of shape (..., in_features); every leading dimension counts as tokens.
    """

    def __init__(self, in_features: int, device: str | torch.device = "cpu") -> None:
        self.in_features = in_features
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)  # (in,)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected activations (..., {self.in_features}), got {tuple(x.shape)}")
        flat = x.detach().reshape(-1, self.in_features).float()  # (tokens, in)
        self.sq_sum += flat.square().sum(dim=0, dtype=torch.float64).to(self.sq_sum.device)
        self.tokens += flat.shape[0]

    @property
    def mean_sq(self) -> torch.Tensor:
        """Σ x² / tokens (Wanda's scaler_row, up to its per-sample weighting); same ranking as ``sq_sum``."""
        return self.sq_sum / max(self.tokens, 1)
