"""SparseGPT on hand-worked tensors (exact masks and updates), its reconstruction against a mask without the
update, and the layer walk on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_prune_layerwise import calib_of, linears, loaded_of, nonlinear_state

from converter.prune import prune
from converter.prune.sparsegpt import HessianAccumulator, sparsegpt
from converter.recipe import PruneConfig

W = torch.tensor([[4.0, -1.0, 3.0, 0.5], [2.0, -6.0, 0.1, 1.0]])


def test_identity_hessian_is_magnitude_pruning_without_updates():
    # H = 5·I: every score is w²·const and no column is correlated with another, so nothing moves
    new, keep = sparsegpt(W, 5 * torch.eye(4), 0.5, blocksize=4)
    assert torch.equal(new, torch.tensor([[4.0, 0.0, 3.0, 0.0], [2.0, -6.0, 0.0, 0.0]]))
    assert torch.equal(keep, new != 0)


def test_pruned_weight_error_moves_to_the_correlated_column():
    # W = [1, 3], H = [[2, 1], [1, 1]]: H⁻¹ = [[1, -1], [-1, 2]], its upper Cholesky factor [[1, -1], [0, 1]].
    # Column 0 scores 1²/1² < 3²/1², so it goes; its error e = 1/1 spreads as w -= e·[1, -1] -> [0, 4], which is
    # argmin over w1 of (w' - w)ᵀ H (w' - w) with w'0 = 0: 2 - 2·δ + δ² is least at δ = 1.
    new, keep = sparsegpt(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 1.0], [1.0, 1.0]]), 0.5, percdamp=0.0)
    assert torch.allclose(new, torch.tensor([[0.0, 4.0]]), atol=1e-12)
    assert keep.tolist() == [[False, True]]


def test_nm_keeps_n_of_every_m_per_row_and_dead_columns_go():
    new, keep = sparsegpt(W, torch.eye(4), 0.5, nm=(2, 4), blocksize=4)
    assert torch.equal(new, torch.tensor([[4.0, 0.0, 3.0, 0.0], [2.0, -6.0, 0.0, 0.0]]))
    assert keep.sum(1).tolist() == [2, 2]
    h = torch.eye(4)
    h[3, 3] = 0.0  # no calibration token reached input 3
    new, keep = sparsegpt(W, h, 0.25, blocksize=4)
    assert (new[:, 3] == 0).all() and not keep[:, 3].any()
    with pytest.raises(ValueError, match="multiple of M=4"):
        sparsegpt(W, torch.eye(4), 0.5, nm=(2, 4), blocksize=6)


def test_update_reconstructs_better_than_the_same_mask_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated inputs
    w = torch.randn(16, 24, generator=g)
    acc = HessianAccumulator(24)
    for chunk in x.split(100):
        acc.add_batch(chunk)
    ref = (x.double().T @ x.double())
    assert acc.tokens == 512 and torch.allclose(acc.h, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    new, keep = sparsegpt(w, acc.h, 0.5, blocksize=8)
    assert keep.float().mean().item() == pytest.approx(0.5)
    err_update = ((x @ new.T - x @ w.T) ** 2).sum()
    err_mask = ((x @ (w * keep).T - x @ w.T) ** 2).sum()
    assert err_update < 0.8 * err_mask


def test_layer_walk_prunes_every_linear_and_nothing_else():
    model = tiny_model("llama", 512, tie=False)
    before = nonlinear_state(model)
    res = prune(loaded_of(model), calib_of(), PruneConfig(method="sparsegpt", sparsity=0.5, sparsegpt_blocksize=16))
    for i in range(2):
        for name, lin in linears(model, i).items():
            assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), (i, name)
    assert res.overall_sparsity == pytest.approx(0.5, abs=0.02)
    after = nonlinear_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="sparsegpt_blocksize 6 must be a multiple of M=4"):
        PruneConfig(method="sparsegpt", pattern="2:4", sparsity=0.5, sparsegpt_blocksize=6)
