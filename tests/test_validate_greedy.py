"""The greedy gate's near-tie rule (validate.greedy_tie_margin) on hand-worked token lists and logits."""

from __future__ import annotations

import pytest
import torch

from converter.validate import greedy_margins, greedy_verdict, lead_moved, lead_moved_stats, tie_margin_hint


def test_identical_runs_pass_whatever_the_margins():
    assert greedy_verdict([5, 6, 7], [5, 6, 7], [0.0, 0.0, 0.0], 0.0) == (True, "first 3/3 tokens equal")


def test_a_departure_passes_only_at_a_near_tie():
    margins = [2.0, 0.04, 1.5]
    ok, detail = greedy_verdict([5, 6, 7], [5, 9, 9], margins, 0.1)
    assert ok and detail.startswith("first 1/3 tokens equal") and "0.040" in detail and "near-tie" in detail
    # the same departure with the strict default, or at a clear choice, fails
    assert greedy_verdict([5, 6, 7], [5, 9, 9], margins, 0.0)[0] is False
    ok, detail = greedy_verdict([5, 6, 7], [8, 6, 7], margins, 0.1)
    assert not ok and "2.000" in detail and "near-tie" not in detail
    # a run cut short is never a tie
    assert greedy_verdict([5, 6, 7], [5, 6], margins, 10.0)[0] is False


def test_margins_are_the_lead_of_the_chosen_token_at_each_step():
    # a logits function over a 4-token vocabulary whose logits depend on the position only
    table = torch.tensor(
        [
            [0.0, 3.0, 1.0, 0.0],  # position 0
            [0.0, 0.0, 2.0, 1.5],  # position 1: predicts tokens[0] = 2, lead 0.5
            [4.0, 0.0, 0.0, 1.0],  # position 2: predicts tokens[1] = 0, lead 3.0
            [0.0, 1.0, 1.0, 0.9],  # position 3: predicts tokens[2], a tie (lead 0.0)
        ]
    )

    def fn(ids, mask):
        assert ids.shape == (1, 4) and mask.shape == (1, 4)
        return table[: ids.shape[1]].unsqueeze(0)

    assert greedy_margins(fn, [1, 3], [2, 0, 1]) == pytest.approx([0.5, 3.0, 0.0])
    assert greedy_margins(fn, [1, 3], []) == []


def test_lead_moved_is_the_change_of_pytorchs_top1_lead_on_the_same_two_tokens():
    # PyTorch: position 0 prefers token 2 over 0 by 1.0, position 1 token 1 over 3 by 0.5
    ref = torch.tensor([[2.0, -1.0, 3.0, 0.0], [0.0, 4.0, -2.0, 3.5]])
    top2 = ref.topk(2, dim=-1)
    lead = top2.values[:, 0] - top2.values[:, 1]
    other = torch.tensor([[2.5, 9.0, 2.7, 0.0], [0.0, 4.0, -2.0, 4.25]])  # other tokens' logits do not count
    got = lead_moved(lead, top2.indices, other)
    assert got.tolist() == pytest.approx([1.0 - 0.2, 0.5 - (-0.25)])
    assert lead_moved(lead, top2.indices, ref).tolist() == [0.0, 0.0]


def test_lead_moved_stats_and_the_hint_for_a_failed_greedy_gate():
    stats = lead_moved_stats(torch.arange(101, dtype=torch.float32) / 100)  # 0.00, 0.01, ..., 1.00
    assert stats["median"] == pytest.approx(0.5) and stats["p90"] == pytest.approx(0.9)
    assert stats["p99"] == pytest.approx(0.99) and stats["max"] == 1.0 and stats["positions"] == 101
    hint = tie_margin_hint(stats, 0.1)
    assert "0.900" in hint and "validate.greedy_tie_margin" in hint and "more than 0.1" in hint
    assert tie_margin_hint(stats, 0.95) == ""  # the margin covers the noise: a departure is a real finding
    assert tie_margin_hint(None, 0.1) == ""
