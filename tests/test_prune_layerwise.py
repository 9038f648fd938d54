"""Layer-wise pruning on tiny models: exact per-row / N:M sparsity, untouched embeddings and head, skipped layers,
and proof that each layer is calibrated on the outputs of the already-pruned layers before it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model

from converter.arch import Arch
from converter.calibrate import CalibrationResult
from converter.errors import DataError, ModelError, RecipeError
from converter.load import LoadedModel
from converter.prune import PruneResult, prune
from converter.prune.masks import prune_count, unstructured_mask
from converter.prune.wanda import ActivationNorms, magnitude_scores, wanda_scores
from converter.recipe import PruneConfig

VOCAB = 512


def loaded_of(model) -> LoadedModel:
    return LoadedModel(
        model=model,
        tokenizer=None,
        original_tokenizer=None,
        arch=Arch.of(model),
        source="tiny",
        checkpoint_dir=None,
        tokenizer_dir=None,
    )


def calib_of(seed: int = 0, n: int = 5, seq_len: int = 24) -> CalibrationResult:
    # seq_len 24 > the tiny Gemma's sliding window 16, so sliding and full attention layers see different masks
    g = torch.Generator().manual_seed(seed)
    return CalibrationResult(languages={}, windows=torch.randint(0, VOCAB, (n, seq_len), generator=g))


def linears(model, i: int) -> dict[str, torch.nn.Linear]:
    arch = Arch.of(model)
    return arch.prunable_linears(arch.decoder_layers()[i])


def keep_masks(model, i: int) -> dict[str, torch.Tensor]:
    return {name: lin.weight != 0 for name, lin in linears(model, i).items()}


def nonlinear_state(model) -> dict[str, torch.Tensor]:
    """Every parameter that is not a decoder-layer linear weight (embeddings, norms, lm_head)."""
    linear_weights = {
        f"model.layers.{i}.{name}.weight"
        for i in range(len(Arch.of(model).decoder_layers()))
        for name in linears(model, i)
    }
    return {k: v.clone() for k, v in model.state_dict().items() if k not in linear_weights}


def layer_act_norms(model, layer_idx: int, windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Σ x² per input channel of every linear of one layer, from full forwards of ``model``."""
    accs, handles = {}, []
    for name, lin in linears(model, layer_idx).items():
        acc = accs[name] = ActivationNorms(lin.in_features)
        handles.append(lin.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add_batch(args[0])))
    with torch.no_grad():
        for ids in windows.split(batch_size):
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {name: acc.sq_sum for name, acc in accs.items()}


def wanda_masks(
    model, layer_idx: int, norms: dict[str, torch.Tensor], sparsity: float
) -> dict[str, torch.Tensor]:
    return {
        name: unstructured_mask(wanda_scores(lin.weight, norms[name]), sparsity)
        for name, lin in linears(model, layer_idx).items()
    }


@pytest.mark.parametrize("model_type,tie", [("gemma3_text", True), ("llama", False), ("qwen2", False)])
def test_unstructured_exact_per_row_and_rest_untouched(model_type, tie):
    model = tiny_model(model_type, vocab_size=VOCAB, tie=tie)
    before = nonlinear_state(model)
    res = prune(loaded_of(model), calib_of(), PruneConfig(method="wanda", sparsity=0.5, batch_size=2))

    for i in range(2):
        for name, lin in linears(model, i).items():
            k = prune_count(lin.in_features, 0.5)
            zeros_per_row = (lin.weight == 0).sum(dim=1)
            assert torch.all(zeros_per_row == k), (i, name)
            assert res.per_layer[i][name] == pytest.approx(k / lin.in_features)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # embeddings, lm_head, norms unchanged

    summary = json.loads(json.dumps(res.summary()))
    assert isinstance(res, PruneResult)
    assert res.num_linears == 14
    assert summary["headline"].startswith("wanda 50% unstructured: measured 5")
    assert summary["headline"].endswith("over 14 linears")
    assert summary["zeroed_params"] == res.zeroed_params > 0
    assert set(summary["per_layer"]) == {"0", "1"}
    # the model still runs
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib_of().windows[:1]).logits).all()


def test_nm_2_4_pattern_holds_in_every_group():
    config = tiny_model("llama").config
    config.intermediate_size = 40  # every in_features divisible by 4
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    res = prune(loaded_of(model), calib_of(), PruneConfig(method="wanda", sparsity=0.5, pattern="2:4"))
    for i in range(2):
        for name, lin in linears(model, i).items():
            groups = (lin.weight == 0).reshape(lin.out_features, -1, 4).sum(dim=2)
            assert torch.all(groups == 2), (i, name)
    assert res.overall_sparsity == 0.5
    assert "wanda 50% 2:4: measured 50.0% over 14 linears" == res.summary()["headline"]


def test_nm_rejects_indivisible_linears_before_touching_weights():
    model = tiny_model("gemma3_text")  # intermediate 37: down_proj in_features not divisible by 4
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match=r"divisible by 4.*mlp\.down_proj.*skip_layers"):
        prune(loaded_of(model), calib_of(), PruneConfig(method="wanda", sparsity=0.5, pattern="2:4"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("skip", [[0], [-2]])
def test_skip_layers_left_dense(skip):
    model = tiny_model("gemma3_text")
    dense0 = {k: v.weight.clone() for k, v in linears(model, 0).items()}
    res = prune(loaded_of(model), calib_of(), PruneConfig(method="wanda", sparsity=0.5, skip_layers=skip))
    assert res.skipped_layers == [0]
    assert set(res.per_layer) == {1}
    for name, lin in linears(model, 0).items():
        assert torch.equal(lin.weight, dense0[name])
    assert all((lin.weight == 0).any() for lin in linears(model, 1).values())
    assert res.summary()["skipped_layers"] == [0]


def test_skip_layers_out_of_range():
    with pytest.raises(RecipeError, match="skip_layers contains 5"):
        prune(loaded_of(tiny_model("llama")), calib_of(), PruneConfig(method="wanda", skip_layers=[5]))


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_each_layer_is_calibrated_on_pruned_previous_layers(model_type):
    """Layer 1's masks equal Wanda masks from activations of (pruned layer 0 -> dense layer 1), not of the dense
    model. Batch size 2 over 5 windows also exercises a remainder batch with its own recorded kwargs."""
    model = tiny_model(model_type)
    dense = copy.deepcopy(model)
    calib = calib_of(n=5)
    prune(loaded_of(model), calib, PruneConfig(method="wanda", sparsity=0.5, batch_size=2))

    # layer 0 sees the embeddings only: its masks come from the dense model's activations
    norms0 = layer_act_norms(dense, 0, calib.windows, 2)
    for name, mask in wanda_masks(dense, 0, norms0, 0.5).items():
        assert torch.equal(keep_masks(model, 0)[name], mask), name

    # pruned layer 0 followed by the dense layer 1: what layer 1 saw while it was being pruned
    hybrid = copy.deepcopy(model)
    hybrid_l1 = Arch.of(hybrid).decoder_layers()[1]
    hybrid_l1.load_state_dict(Arch.of(dense).decoder_layers()[1].state_dict())
    expected = wanda_masks(hybrid, 1, layer_act_norms(hybrid, 1, calib.windows, 2), 0.5)
    got = keep_masks(model, 1)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    # and the test discriminates: the fully dense model's activations would give other masks
    from_dense = wanda_masks(dense, 1, layer_act_norms(dense, 1, calib.windows, 2), 0.5)
    assert any(not torch.equal(got[name], from_dense[name]) for name in got)


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "experts"])
def test_dense_propagation_calibrates_every_layer_on_the_original_model_in_one_pass(model_type, method):
    """prune.propagate: dense. Each layer runs once per batch (the default walk: twice, except the last), and with
    Wanda layer 1's masks equal those from the dense model's own activations, not from pruned layer 0's."""
    model = tiny_model(model_type)
    dense = copy.deepcopy(model)
    calib = calib_of(n=5)
    layers = Arch.of(model).decoder_layers()
    extra = {"experts": 37, "sparsity": 0.25} if method == "experts" else {"sparsity": 0.5}  # FFN width 37
    calls = {}
    for propagate in ("pruned", "dense"):
        m = copy.deepcopy(dense) if propagate == "pruned" else model
        count = [0] * len(layers)
        hs = [
            layer.register_forward_pre_hook(lambda *_a, i=i, count=count: count.__setitem__(i, count[i] + 1))
            for i, layer in enumerate(Arch.of(m).decoder_layers())
        ]
        prune(loaded_of(m), calib, PruneConfig(method=method, batch_size=2, propagate=propagate, **extra))
        for h in hs:
            h.remove()
        calls[propagate] = count
    # 5 windows in batches of 2: 3 batches of two sizes. The capture pass before the walk enters layer 0 once to
    # learn how layers return (one token), then once per batch, and every later layer once per batch size
    # (stopping at the last one's entrance).
    batches, n = 3, len(layers)
    capture = [1 + batches] + [2] * (n - 1)
    assert calls["pruned"] == [c + 2 * batches for c in capture[:-1]] + [capture[-1] + batches]
    assert calls["dense"] == [c + batches for c in capture]
    if method != "wanda":
        return
    from_dense = wanda_masks(dense, 1, layer_act_norms(dense, 1, calib.windows, 2), 0.5)
    got = keep_masks(model, 1)
    for name in from_dense:
        assert torch.equal(got[name], from_dense[name]), name


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "experts"])
def test_bfloat16_compute_runs_the_linears_in_bfloat16_and_keeps_float32_weights(model_type, method):
    """prune.compute_dtype bfloat16: every linear of the calibration passes computes in bfloat16 (float32 by
    default), weights and the states passed between layers stay float32, and the result prunes as the float32
    walk does (same sparsity, nearly the same masks or the same width)."""
    calib = calib_of(n=5)
    extra = {"experts": 37, "sparsity": 0.25} if method == "experts" else {"sparsity": 0.5}
    got = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_model(model_type)
        seen, states = set(), set()
        hs = [
            m.register_forward_hook(lambda _m, _a, out, seen=seen: seen.add(out.dtype))
            for m in model.modules()
            if isinstance(m, torch.nn.Linear)
        ]
        hs += [
            layer.register_forward_pre_hook(lambda _m, args, kw, states=states: states.add(
                (args[0] if args else kw["hidden_states"]).dtype), with_kwargs=True)
            for layer in Arch.of(model).decoder_layers()
        ]
        prune(loaded_of(model), calib, PruneConfig(method=method, batch_size=2, compute_dtype=dtype, **extra))
        for h in hs:
            h.remove()
        assert seen == {getattr(torch, dtype)}, (dtype, seen)
        assert states == {torch.float32}
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        got[dtype] = model
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    n = len(Arch.of(got["float32"]).decoder_layers())
    for i in range(n):
        a, b = keep_masks(got["float32"], i), keep_masks(got["bfloat16"], i)
        for name in a:
            assert a[name].shape == b[name].shape
            if method != "experts":
                if method == "wanda":  # per row; SparseGPT counts per block of columns
                    assert a[name].sum(1).tolist() == b[name].sum(1).tolist()
                assert int(a[name].sum()) == int(b[name].sum())
                assert (a[name] == b[name]).float().mean() > 0.8, (i, name)


def test_wanda_masks_depend_on_calibration_data():
    a, b = tiny_model("gemma3_text", seed=3), tiny_model("gemma3_text", seed=3)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    cfg = PruneConfig(method="wanda", sparsity=0.5)
    prune(loaded_of(a), calib_of(seed=1), cfg)
    prune(loaded_of(b), calib_of(seed=2), cfg)
    ma, mb = keep_masks(a, 0), keep_masks(b, 0)
    assert any(not torch.equal(ma[n], mb[n]) for n in ma)


def test_magnitude_needs_no_calibration_and_matches_weights():
    model = tiny_model("llama", tie=False)
    dense = copy.deepcopy(model)
    empty = CalibrationResult(languages={}, windows=torch.empty(0, 0, dtype=torch.long))
    res = prune(loaded_of(model), empty, PruneConfig(method="magnitude", sparsity=0.25))
    for i in range(2):
        for name, lin in linears(dense, i).items():
            assert torch.equal(
                keep_masks(model, i)[name], unstructured_mask(magnitude_scores(lin.weight), 0.25)
            )
    assert res.summary()["headline"].startswith("magnitude 25% unstructured: measured 2")


def test_wanda_without_windows_is_a_data_error():
    empty = CalibrationResult(languages={}, windows=torch.empty(0, 0, dtype=torch.long))
    with pytest.raises(DataError, match="calibration windows"):
        prune(loaded_of(tiny_model("llama")), empty, PruneConfig(method="wanda"))


def test_method_none_changes_nothing():
    model = tiny_model("qwen2")
    before = copy.deepcopy(model.state_dict())
    res = prune(loaded_of(model), calib_of(), PruneConfig(method="none"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    s = json.loads(json.dumps(res.summary()))
    assert s["num_linears"] == 0 and s["zeroed_params"] == 0 and s["per_layer"] == {}
    assert "no pruning" in s["headline"]


OTHER_LAYOUTS = {  # families whose configs do not take tiny_model's Llama-style keys
    "gpt2": dict(n_embd=64, n_head=4, n_layer=2, n_inner=75, n_positions=512),
    "opt": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=75, word_embed_proj_dim=32,
                max_position_embeddings=512),
    "xglm": dict(d_model=64, attention_heads=4, num_layers=2, ffn_dim=75, max_position_embeddings=512),
    "bloom": dict(hidden_size=64, n_head=4, n_layer=2),
}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_capture_with_idle_layers_records_what_real_layers_do_in_every_family(monkeypatch):
    """The capture pass replaces every layer's computation by returning its input; for every family langconvert
    supports, the layer-0 inputs and every layer's call arguments must equal those of a pass through the real
    layers (window length 24 > the tiny Gemma's sliding window, 5 windows in batches of 2 and a last one of 1).
    Five layers: a model that indexes a layer's tuple output would take an idle layer's bare tensor apart one
    dimension per layer and fail only from the fourth layer on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from converter.arch import supported_model_types
    from converter.prune import layerwise

    real_idle = layerwise._forward_with_idle_layers
    for mt in supported_model_types():
        if mt in OTHER_LAYOUTS:
            torch.manual_seed(0)
            layout = {k: (5 if k in ("n_layer", "num_hidden_layers", "num_layers") else v) for k, v in OTHER_LAYOUTS[mt].items()}
            cfg = AutoConfig.for_model(mt, vocab_size=VOCAB, **layout)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        else:
            model = tiny_model(mt, VOCAB, layers=5)
        layers = Arch.of(model).decoder_layers()
        assert len(layers) == 5, mt
        windows = calib_of(n=5).windows
        used: list[bool] = []
        monkeypatch.setattr(layerwise, "_forward_with_idle_layers", lambda *a, used=used: used.append(real_idle(*a)) or used[-1])
        with torch.no_grad():
            states, calls = layerwise._capture(model, layers, windows, 2)
        monkeypatch.setattr(layerwise, "_forward_with_idle_layers", lambda *a: False)
        with torch.no_grad():
            ref_states, ref_calls = layerwise._capture(model, layers, windows, 2)
        assert used == [True, True], mt  # batch sizes 2 and 1, both recorded with idle layers
        assert sorted(calls) == sorted(ref_calls) == [1, 2], mt
        assert _same(states, ref_states), mt
        for size in calls:
            for i, (c, r) in enumerate(zip(calls[size], ref_calls[size])):
                assert _same(c.args, r.args) and _same(c.kwargs, r.kwargs), (mt, size, i)
        assert all("forward" not in vars(layer) for layer in layers), mt  # the layers' own forward is back
