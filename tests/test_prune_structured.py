"""Structured FFN pruning (prune.method experts): MoE-fication, expert choice and least-squares refit on
hand-worked tensors, and the whole layer walk on tiny models of three families, which must stay loadable and
exportable with the new width."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from test_prune_layerwise import loaded_of

from converter.calibrate import CalibrationResult
from converter.errors import ModelError
from converter.export import export_onnx
from converter.prune import prune
from converter.prune.moe import ExpertStats, balanced_kmeans
from converter.prune.structured import (
    keep_from_experts,
    keep_from_neurons,
    obs_remove,
    reconstruction_error,
    refit_down,
    wanda_sp_scores,
)
from converter.recipe import ExportConfig, PruneConfig
from converter.runtime import open_artifact

VOCAB = 320
WIDTH = 45  # odd, so shape bugs show; 15 experts of 3 neurons


# --------------------------------------------------------------------------------------------------- math
def test_balanced_kmeans_finds_equal_clusters():
    # two obvious directions, three rows each, plus noise-free duplicates
    rows = torch.tensor([[1.0, 0], [0.9, 0.1], [1.0, 0.05], [0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    labels = balanced_kmeans(rows, 2, seed=0)
    assert sorted(torch.bincount(labels).tolist()) == [3, 3]
    assert len(set(labels[:3].tolist())) == 1 and len(set(labels[3:].tolist())) == 1
    assert labels[0] != labels[3]
    big = torch.randn(70, 8, generator=torch.Generator().manual_seed(0))
    lab = balanced_kmeans(big, 7, seed=3)
    assert torch.bincount(lab).tolist() == [10] * 7
    assert torch.equal(lab, balanced_kmeans(big, 7, seed=3))  # deterministic


def test_expert_stats_hand_worked():
    labels = torch.tensor([0, 0, 1, 1])
    st = ExpertStats(labels, 2)
    # token 1: |a| = [1, 1, 2, 0] -> expert sums [2, 2] -> shares [0.5, 0.5]; token 2: [0, 0, 3, 1] -> [0, 4] -> [0, 1]
    st.add("ko", torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.0, 0.0, -3.0, 1.0]]))
    assert torch.allclose(st.mean_activation("ko"), torch.tensor([0.25, 0.75]))
    # top E/4 = 1 expert per token: token 1 ties (topk picks one), token 2 expert 1
    assert st.frequency("ko").sum().item() == pytest.approx(1.0)
    assert st.frequency("ko")[1].item() >= 0.5


def test_keep_from_experts_and_neurons_hand_worked():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    scores = torch.tensor([0.5, 0.1, 0.4])
    assert keep_from_experts(scores, labels, 1).tolist() == [0, 2, 3, 5]  # expert 1 goes
    assert keep_from_experts(scores, labels, 2).tolist() == [0, 3]
    assert keep_from_experts(scores, labels, 0).tolist() == list(range(6))
    assert keep_from_experts(torch.tensor([1.0, 1.0, 2.0]), labels, 1).tolist() == [0, 2, 3, 5]  # tie: higher index
    assert keep_from_neurons(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2).tolist() == [0, 2]
    assert keep_from_neurons(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]


def test_wanda_sp_scores_hand_worked():
    up = torch.tensor([[1.0, -2.0], [0.0, 1.0]])  # (I=2, H=2)
    gate = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    down = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]])  # (H_out=3, I=2)
    x_sq = torch.tensor([4.0, 1.0])  # ‖x‖ = [2, 1]
    a_sq = torch.tensor([9.0, 16.0])  # ‖a‖ = [3, 4]
    # neuron 0: up |1|·2 + |-2|·1 = 4, gate |0|·2 + |1|·1 = 1, down (1+2+0)·3 = 9 -> 14
    # neuron 1: up |0|·2 + |1|·1 = 1, gate |1|·2 + |0|·1 = 2, down (1+0+3)·4 = 16 -> 19
    assert wanda_sp_scores(gate, up, down, x_sq, a_sq).tolist() == [14.0, 19.0]
    assert wanda_sp_scores(None, up, down, x_sq, a_sq).tolist() == [13.0, 17.0]


def test_refit_lowers_reconstruction_error_and_matches_activations():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 6, generator=g)
    a = torch.cat([base, base[:, :2] * 0.8 + 0.1 * torch.randn(400, 2, generator=g)], 1)  # (T, I=8), correlated
    w = torch.randn(5, 8, generator=g)  # (H, I)
    gram = (a.T @ a).double()
    keep = torch.tensor([0, 1, 2, 3, 4, 5])
    plain = w[:, keep]
    direct = float(((a[:, keep] @ plain.T - a @ w.T) ** 2).sum())
    assert reconstruction_error(w, gram, keep, plain) == pytest.approx(direct, rel=1e-6)
    new = refit_down(w, gram, keep, damp=0.0)
    best = torch.linalg.lstsq(a[:, keep].double(), (a @ w.T).double()).solution.T  # (H, |K|)
    assert torch.allclose(new.double(), best, atol=1e-4)
    assert reconstruction_error(w, gram, keep, new) < 0.2 * reconstruction_error(w, gram, keep, plain)
    # keeping everything reproduces the weight (up to the damping's tiny shrink)
    assert torch.allclose(refit_down(w, gram, torch.arange(8), damp=0.0), w, atol=1e-4)


def test_obs_remove_hand_worked():
    # uncorrelated neurons: [H⁻¹]_jj = 1/g_j, so the cost of neuron j is w_j²·g_j: [1·4, 9·1, 1·9] = [4, 9, 9]
    gram = torch.diag(torch.tensor([4.0, 1.0, 9.0]))
    w = torch.tensor([[1.0, 3.0, 1.0]])  # (H=1, I=3)
    one = torch.arange(3)
    assert obs_remove(w, gram, one, 1, damp=0.0).tolist() == [1, 2]
    assert obs_remove(w, gram, one, 2, damp=0.0).tolist() == [2]  # 9 vs 9: the lower index goes first
    # neurons 0 and 1 fire together (a0 = a1): either can stand in for the other once the refit moves its
    # weight over, so one of them goes at (almost) no cost although its |w|·‖a‖ is the largest
    gram = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    w = torch.tensor([[5.0, 5.0, 1.0]])
    keep = obs_remove(w, gram, one, 1, damp=1e-6)
    assert keep.tolist() == [1, 2]
    refit = refit_down(w, gram, keep, damp=1e-6)
    assert torch.allclose(refit, torch.tensor([[10.0, 1.0]]), atol=1e-4)
    assert reconstruction_error(w, gram, keep, refit) < 1e-3 < reconstruction_error(
        w, gram, torch.tensor([0, 1]), refit_down(w, gram, torch.tensor([0, 1]), damp=1e-6)
    )


def test_obs_remove_first_choice_is_the_best_single_expert_and_greedy_tracks_the_refit():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 9, generator=g)
    a = torch.cat([base, base[:, :3] * 0.7 + 0.2 * torch.randn(300, 3, generator=g)], 1)  # (T, I=12)
    w = torch.randn(4, 12, generator=g)
    gram = (a.T @ a).double()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])  # 4 experts of 3 neurons, interleaved
    errors = []
    for e in range(4):
        keep = (labels != e).nonzero().flatten()
        errors.append(reconstruction_error(w, gram, keep, refit_down(w, gram, keep, damp=0.0)))
    keep = obs_remove(w, gram, labels, 1, damp=0.0)
    assert keep.tolist() == (labels != min(range(4), key=errors.__getitem__)).nonzero().flatten().tolist()
    # two experts removed greedily: never worse than removing the two with the smallest single-removal error
    keep2 = obs_remove(w, gram, labels, 2, damp=0.0)
    order = sorted(range(4), key=errors.__getitem__)
    naive = ((labels != order[0]) & (labels != order[1])).nonzero().flatten()
    err = reconstruction_error(w, gram, keep2, refit_down(w, gram, keep2, damp=0.0))
    assert err <= reconstruction_error(w, gram, naive, refit_down(w, gram, naive, damp=0.0)) + 1e-9
    assert len(keep2) == 6


# --------------------------------------------------------------------------------------------------- walk
def _tiny(mt: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    cfg = tiny_model(mt, VOCAB, tie=mt != "llama").config
    cfg.intermediate_size = WIDTH
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _calib(langs=("ko", "en"), n: int = 6, seq_len: int = 24) -> CalibrationResult:
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(4, VOCAB, (n, seq_len), generator=g)
    return CalibrationResult(languages={}, windows=windows, window_langs=[langs[i % len(langs)] for i in range(n)])


FAMILIES = ["gemma3_text", "llama", "qwen2"]


@pytest.mark.parametrize("mt", FAMILIES)
def test_experts_shrink_every_ffn_and_stay_loadable_and_exportable(mt, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny(mt)
    cfg = PruneConfig(method="experts", sparsity=0.25, experts=15, batch_size=4)
    res = prune(loaded_of(model), _calib(), cfg)
    kept = WIDTH - 4 * 3  # round(0.25 * 15) = 4 experts of 3 neurons
    assert model.config.intermediate_size == kept == res.ffn["width_after"]
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (kept, 64) and layer.mlp.up_proj.weight.shape == (kept, 64)
        assert layer.mlp.down_proj.weight.shape == (64, kept)
    for stats in res.ffn["layers"].values():
        assert stats["error_refit"] < stats["error_removed"]  # the refit takes up what the removed neurons did
        assert set(stats["expert_share"]) == {"ko", "en"} and len(stats["expert_share"]["ko"]) == 15
    assert res.ffn["params_removed"] == 2 * 12 * 64 * 3
    model.save_pretrained(tmp_path / "ckpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(4, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits[0]
        assert torch.equal(again(ids).logits[0], ref)
    from test_export import _tokenizer

    _tokenizer(VOCAB).save_pretrained(tmp_path / "ckpt")
    for fmt in ("genai", "optimum"):
        out = export_onnx(tmp_path / "ckpt", tmp_path / fmt / "onnx", ExportConfig(format=fmt), tmp_path / fmt / "w")
        got = torch.from_numpy(open_artifact(out.onnx_dir).logits(ids[0].tolist()))
        assert (got - ref).abs().max().item() < 1e-4, fmt


@pytest.mark.parametrize("mt", FAMILIES)
def test_nothing_removed_changes_no_logit(mt):
    model = _tiny(mt)
    before = copy.deepcopy(model)
    prune(loaded_of(model), _calib(), PruneConfig(method="experts", sparsity=0.0, experts=15, batch_size=4))
    ids = torch.randint(4, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before(ids).logits)
    assert model.config.intermediate_size == WIDTH


def test_selections_differ_and_random_is_seeded():
    outs = {}
    for sel in ("activation", "random", "wanda-sp", "reconstruction"):
        model = _tiny("llama")
        prune(loaded_of(model), _calib(), PruneConfig(method="experts", sparsity=0.4, experts=15, expert_selection=sel))
        outs[sel] = model.model.layers[0].mlp.up_proj.weight.clone()
        assert outs[sel].shape[0] == WIDTH - 6 * 3
    assert not torch.equal(outs["activation"], outs["random"])
    assert not torch.equal(outs["activation"], outs["reconstruction"])
    again = _tiny("llama")
    prune(loaded_of(again), _calib(), PruneConfig(method="experts", sparsity=0.4, experts=15, expert_selection="random"))
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, outs["random"])


def test_experts_must_divide_the_width_and_keep_one_width():
    from pydantic import ValidationError

    with pytest.raises(ModelError, match="prune.experts 16 does not divide the FFN width 45"):
        prune(loaded_of(_tiny("llama")), _calib(), PruneConfig(method="experts", experts=16))
    with pytest.raises(ValidationError, match="keeps one FFN width for every layer"):
        PruneConfig(method="experts", skip_layers=[0])
    with pytest.raises(ValidationError, match="removes whole neurons"):
        PruneConfig(method="experts", pattern="2:4", sparsity=0.5)
