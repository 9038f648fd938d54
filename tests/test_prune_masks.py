"""Pure mask and score math on hand-worked tensors with exact expected values."""

from __future__ import annotations

import pytest
import torch

from converter.prune.masks import measured_sparsity, nm_mask, prune_count, unstructured_mask
from converter.prune.wanda import ActivationNorms, magnitude_scores, wanda_scores

T, F = True, False

# (out=2, in=4). Input-channel norms ‖X_j‖₂ = [4, 2, 1, 0.5] (squared: [16, 4, 1, 0.25]).
W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
ACT_SQ = torch.tensor([16.0, 4.0, 1.0, 0.25])


def test_magnitude_scores_and_mask():
    assert torch.equal(magnitude_scores(W), W.abs())
    # row 0 |W| = [1, 2, 3, 4] -> prune inputs 0, 1; row 1 |W| = [4, 3, 2, 1] -> prune inputs 2, 3
    assert unstructured_mask(magnitude_scores(W), 0.5).tolist() == [[F, F, T, T], [T, T, F, F]]


def test_wanda_scores_exact_and_mask_differs_from_magnitude():
    s = wanda_scores(W, ACT_SQ)
    # |W| * [4, 2, 1, 0.5]
    assert s.tolist() == [[4.0, 4.0, 3.0, 2.0], [16.0, 6.0, 2.0, 0.5]]
    # row 0 now prunes inputs 2, 3 (scores 3, 2): the large-activation channels 0, 1 survive although small
    assert unstructured_mask(s, 0.5).tolist() == [[T, T, F, F], [T, T, F, F]]


def test_wanda_scores_small_exact():
    s = wanda_scores(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.tensor([4.0, 9.0]))
    assert s.tolist() == [[2.0, 6.0], [6.0, 12.0]]


def test_wanda_scores_shape_mismatch():
    with pytest.raises(ValueError, match="act_sq_norm"):
        wanda_scores(W, torch.ones(3))


def test_unstructured_ties_prune_lower_index_first():
    assert unstructured_mask(torch.ones(1, 4), 0.5).tolist() == [[F, F, T, T]]
    assert unstructured_mask(torch.tensor([[2.0, 1.0, 1.0, 1.0]]), 0.5).tolist() == [[T, F, F, T]]


def test_unstructured_is_per_row_not_global():
    # row 1 is all larger than row 0, yet each row loses exactly its own 2 smallest
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 40.0, 20.0, 30.0]])
    assert unstructured_mask(s, 0.5).tolist() == [[F, F, T, T], [F, T, F, T]]


def test_unstructured_sparsity_zero_and_counts():
    assert unstructured_mask(W, 0.0).all()
    assert prune_count(4, 0.5) == 2
    assert prune_count(5, 0.5) == 3  # round half up
    assert prune_count(37, 0.5) == 19
    assert prune_count(10, 0.3) == 3
    assert prune_count(10, 0.0) == 0
    m = unstructured_mask(torch.arange(10.0).reshape(1, 10), 0.3)
    assert m.tolist() == [[F, F, F, T, T, T, T, T, T, T]]


def test_nm_2_4_exact():
    s = torch.tensor(
        [
            [5.0, 1.0, 4.0, 2.0, 0.0, 9.0, 8.0, 7.0],
            [1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0],
        ]
    )
    assert nm_mask(s, 2, 4).tolist() == [
        [T, F, T, F, F, T, T, F],
        [F, F, T, T, T, T, F, F],
    ]


def test_nm_1_4_and_ties():
    assert nm_mask(torch.ones(1, 8), 1, 4).tolist() == [[F, T, T, T, F, T, T, T]]


def test_nm_needs_divisible_in_features():
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.ones(2, 8), 4, 4)


def test_measured_sparsity():
    assert measured_sparsity(torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == 0.5
    assert measured_sparsity(torch.tensor([[0.0, -0.0, 3.0, 0.0]])) == 0.75
    assert measured_sparsity(torch.ones(3, 3)) == 0.0
    assert measured_sparsity(torch.empty(0, 4)) == 0.0


def test_activation_norms_accumulate_sum_of_squares():
    acc = ActivationNorms(2)
    acc.add_batch(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))  # (batch 1, seq 2, in 2)
    acc.add_batch(torch.tensor([[[0.0, 1.0]]]))  # (1, 1, 2)
    assert acc.sq_sum.dtype == torch.float64
    assert acc.sq_sum.tolist() == [10.0, 21.0]
    assert acc.tokens == 3
    assert torch.allclose(acc.mean_sq, torch.tensor([10 / 3, 7.0], dtype=torch.float64))
    # sum and mean rank identically
    w = torch.tensor([[1.0, 0.5], [0.2, 0.1]])
    assert torch.equal(
        unstructured_mask(wanda_scores(w, acc.sq_sum), 0.5),
        unstructured_mask(wanda_scores(w, acc.mean_sq), 0.5),
    )
    with pytest.raises(ValueError, match="activations"):
        acc.add_batch(torch.ones(3))


def test_lowest_k_is_the_first_k_of_a_stable_sort_for_every_k():
    """Against the definition, on scores with many ties (integers 0-3, signed zeros) and on distinct ones, for
    every k of rows of several widths, along either dimension."""
    from converter.prune.masks import lowest_k

    g = torch.Generator().manual_seed(0)
    cases = [torch.randint(0, 4, (5, n), generator=g).float() for n in (1, 2, 7, 16, 33)]
    cases += [torch.randn(3, 40, generator=g), torch.tensor([[0.0, -0.0, 0.0, -0.0, 1.0, -1.0]])]
    for score in cases:
        for dim in (1, 0):
            n = score.shape[dim]
            order = torch.sort(score, dim=dim, stable=True).indices
            for k in range(n + 1):
                want = torch.zeros_like(score, dtype=torch.bool)
                want.scatter_(dim, order.narrow(dim, 0, k), True)
                assert torch.equal(lowest_k(score, k, dim=dim), want), (score, k, dim)
    with pytest.raises(ValueError, match="k must be in"):
        lowest_k(torch.zeros(2, 3), 4)
