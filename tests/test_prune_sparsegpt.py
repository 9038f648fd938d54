"""SparseGPT on hand-worked tensors (exact masks and updates), its reconstruction against a mask without the
update, and the layer walk on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_prune_layerwise import calib_of, linears, loaded_of, nonlinear_state

from converter.prune import prune
from converter.prune.shared import SharedInputs
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


class _Block(torch.nn.Module):
    """q/k/v on one norm's output, o on another tensor, gate/up on a second norm's output of the same shape as
    the first (its memory is free for reuse once q/k/v have run: the grouping must not mistake it), and a
    third linear on the first buffer after an in-place write (same storage, new contents)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        names = ("q", "k", "v", "o", "gate", "up", "inplace")
        self.lin = torch.nn.ModuleDict({n: torch.nn.Linear(d, d, bias=False) for n in names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.normalize(x, dim=-1)
        a = self.lin["q"](h) + self.lin["k"](h) * self.lin["v"](h)
        b = self.lin["inplace"](h.mul_(2.0))
        del h
        a = self.lin["o"](torch.tanh(a + b))
        g = torch.nn.functional.normalize(x + a, dim=-1)
        return self.lin["gate"](g) * self.lin["up"](g)


def test_linears_fed_the_same_tensor_share_one_hessian():
    torch.manual_seed(0)
    block = _Block()
    hess = SharedInputs(lambda _name: HessianAccumulator(8))
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in block.lin}
    def hook(n: str):
        def pre(_m, args) -> None:
            hess.add(n, args[0])
            seen[n].append(args[0].clone())

        return pre

    for n, lin in block.lin.items():
        lin.register_forward_pre_hook(hook(n))
    block.register_forward_pre_hook(lambda _m, _a: hess.new_batch())
    with torch.no_grad():
        for _ in range(3):
            block(torch.randn(2, 5, 8))
    of = hess.of
    assert of["q"] is of["k"] is of["v"] and of["gate"] is of["up"]
    assert len({id(of["q"]), id(of["o"]), id(of["gate"]), id(of["inplace"])}) == 4 == hess.groups
    for n in block.lin:  # each H is exactly its own inputs' X^T X: 3 batches of 10 tokens, nothing twice
        x = torch.cat(seen[n]).reshape(-1, 8).double()
        assert of[n].tokens == 30
        assert torch.allclose(of[n].h, x.T @ x, atol=1e-5)


@pytest.mark.parametrize("width", [8, 512, 602])
def test_hessian_from_upper_strips_is_the_full_symmetric_product(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, 40, width, generator=g)
    acc = HessianAccumulator(width)
    for batch in x.split(1):
        acc.add_batch(batch)
    flat = x.reshape(-1, width).double()
    ref = flat.T @ flat
    assert acc.tokens == 120 and torch.equal(acc.h, acc.h.T)
    assert torch.allclose(acc.h, ref, rtol=1e-5, atol=1e-4)


def test_factor_falls_back_to_float64_where_float32_is_singular():
    from converter.prune.sparsegpt import inverse_hessian_factor

    h = torch.tensor([[1.0, 1 - 1e-9], [1 - 1e-9, 1.0]], dtype=torch.float64)  # rounds to singular in float32
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h.float())
    u, dead = inverse_hessian_factor(h, percdamp=0.0)
    assert not dead.any() and torch.isfinite(u).all()
    assert torch.allclose(u.double().T @ u.double(), torch.linalg.inv(h), rtol=1e-3)


def test_hessian_products_stay_float32_inside_bfloat16_autocast():
    """prune.compute_dtype bfloat16 runs the layers under autocast, where X^T X would come out rounded to bfloat16
    (not positive semi-definite: it broke Gemma 3's factorisation). The accumulator's products stay float32: exact
    for compute_dtype float32, the exact Gram matrix of the bfloat16-rounded inputs for bfloat16."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 300, 96, generator=g) * torch.rand(96, generator=g) * 50
    before = torch.backends.mkldnn.matmul.fp32_precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact, rounded = HessianAccumulator(96), HessianAccumulator(96, compute_dtype="bfloat16")
        for batch in x.split(1):
            exact.add_batch(batch)
            rounded.add_batch(batch)
    assert torch.backends.mkldnn.matmul.fp32_precision == before  # the math mode is restored

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    flat = x.reshape(-1, 96).double()
    assert rel(exact.h, flat.T @ flat) < 1e-6
    fb = x.reshape(-1, 96).bfloat16().double()
    # the rounded inputs' Gram matrix where the CPU has bfloat16 units (oneDNN ignores the mode elsewhere and
    # stays exact); autocast's bfloat16 results would be ~1e-3 off either
    assert min(rel(rounded.h, fb.T @ fb), rel(rounded.h, flat.T @ flat)) < 1e-6
    assert torch.linalg.eigvalsh(rounded.h).min() > 0
