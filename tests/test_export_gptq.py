"""export.gptq: GPTQ codes on hand-made Hessians, the layer walk on tiny models of three families, and the
artifact computing exactly the codes the walk chose (fp32 activations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_export import VOCAB, _ids, _save_checkpoint
from test_prune_layerwise import loaded_of
from test_prune_structured import _calib

from converter.export import export_onnx
from converter.export.gptq import gptq_codes, gptq_quantize, output_error, weight_key
from converter.export.quantize import block_quantize, dequantize
from converter.recipe import ExportConfig
from converter.runtime import open_artifact


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scale_search", ["absmax", "mse"])
@pytest.mark.parametrize("bits", [4, 8])
def test_uncorrelated_inputs_give_round_to_nearest(bits, scale_search, act_order):
    # H diagonal: no input column can stand in for another, so no error is spread and GPTQ is round to nearest
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g)
    h = torch.diag(torch.rand(40, generator=g) + 0.5)
    codes, scales = gptq_quantize(w, h, bits, 16, scale_search, damp=0.0, act_order=act_order)
    rtn_codes, rtn_scales = block_quantize(w.numpy().T, bits, 16, scale_search)
    assert codes.shape == (6, 48) and scales.shape == (6, 3)  # 40 columns padded to 3 blocks of 16
    assert np.array_equal(codes, rtn_codes) and np.array_equal(scales, rtn_scales)


@pytest.mark.parametrize("bits", [4, 8])
def test_correlated_inputs_lower_the_output_error(bits):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(500, 16, generator=g)
    x = torch.cat([base, base @ torch.randn(16, 16, generator=g) * 0.5 + 0.1 * torch.randn(500, 16, generator=g)], 1)
    w = torch.randn(8, 32, generator=g)
    h = (x.T @ x).double()
    codes, scales = gptq_quantize(w, h, bits, 16)
    rtn_codes, rtn_scales = block_quantize(w.numpy().T, bits, 16)
    assert np.abs(codes).max() <= 2 ** (bits - 1)
    assert np.array_equal(scales[:, 0], rtn_scales[:, 0])  # the first block sees unchanged weights
    err, rtn = output_error(w, h, codes, scales, 16), output_error(w, h, rtn_codes, rtn_scales, 16)
    deq = torch.from_numpy(dequantize(codes, scales, 32, 16).T).double()
    direct = float((((w.double() - deq) @ x.double().T) ** 2).sum())
    assert err == pytest.approx(direct, rel=1e-6)
    assert err < 0.7 * rtn
    # act-order: the columns with the most input energy first, scales fixed before any update
    ao_codes, ao_scales = gptq_quantize(w, h, bits, 16, act_order=True)
    assert np.array_equal(ao_scales, rtn_scales)
    assert output_error(w, h, ao_codes, ao_scales, 16) < 0.7 * rtn
    # the walk hands act-order the round-to-nearest scales it already has: the same codes
    given_codes, given_scales = gptq_quantize(w, h, bits, 16, act_order=True, block_scales=rtn_scales)
    assert np.array_equal(given_codes, ao_codes) and np.array_equal(given_scales, ao_scales)


def test_weight_key_names_the_onnx_layout():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert weight_key(w) == weight_key(w.copy()) != weight_key(w.T) != weight_key(w.reshape(3, 2))


@pytest.mark.parametrize("mt", ["gemma3_text", "llama", "qwen2"])
def test_artifact_computes_the_gptq_codes(mt, tmp_path):
    model = tiny_model(mt, VOCAB, tie=mt != "llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ExportConfig(format="genai", quantize="int4", accuracy_level=0, block_size=32, gptq=True)
    res = gptq_codes(loaded_of(model), _calib(n=8, seq_len=32), cfg, "cpu", tmp_path)
    n_layers = len(model.model.layers)
    assert res.linears == 7 * n_layers and set(res.error_ratio) == {str(i) for i in range(n_layers)}
    assert all(r < 1.0 for r in res.error_ratio.values())  # GPTQ beats rounding on its own calibration inputs
    for k, v in model.state_dict().items():  # the checkpoint stays float
        assert torch.equal(v, before[k]), k
    ckpt = _save_checkpoint(model, tmp_path / "hf")
    out = export_onnx(ckpt, tmp_path / "onnx", cfg, tmp_path / "work", gptq=res)
    # every MatMul but the lm_head reads GPTQ codes, also those the builder packs from several linears (q/k/v)
    q = out.quantization
    assert q["matmuls_with_calibrated_codes"] == sum(q["matmuls_by_bits"].values()) - 1 >= 5 * n_layers
    # the PyTorch model with every layer linear replaced by its GPTQ dequantization and the lm_head rounded
    codes = res.load()
    ref = tiny_model(mt, VOCAB, tie=mt != "llama")
    ref.load_state_dict(before)
    with torch.no_grad():
        for layer in ref.model.layers:
            for lin in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]:
                w = lin.weight.detach().numpy()
                lin.weight.copy_(torch.from_numpy(dequantize(*codes[weight_key(w.T)], w.shape[1], 32).T))
        rounded = [ref.lm_head] + ([ref.model.embed_tokens] if mt == "llama" else [])  # untied: its own blocks
        for mod in rounded:
            w = mod.weight.detach().numpy()
            mod.weight.copy_(torch.from_numpy(dequantize(*block_quantize(w.T, 4, 32), w.shape[1], 32).T))
        ids = _ids(3)
        want = ref(ids).logits[0]
    got = torch.from_numpy(open_artifact(out.onnx_dir).logits(ids[0].tolist()))
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "base, own, names, rounded",
    [
        (4, 8, ["mlp.down_proj"], []),
        (8, 4, ["self_attn.o_proj", "mlp.down_proj"], []),
        # the genai builder packs Llama's q/k/v into one MatMul, which takes the most bits among them (8): the
        # 4-bit codes of q_proj do not fit it, so that MatMul is rounded at 8 bits
        (8, 4, ["self_attn.q_proj", "self_attn.o_proj"], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ],
)
def test_linears_given_other_bits_get_gptq_codes_at_those_bits(base, own, names, rounded, tmp_path, caplog):
    """export.gptq with export.linear_bits: the linears a pattern gives other bits get GPTQ codes at those bits
    (int4 with 8-bit down-projections; int8 with some 4-bit linears, as the Korean recipe mixes them), every
    layer MatMul reads the codes chosen at its bits, and the artifact computes exactly those dequantized codes."""
    model = tiny_model("llama", VOCAB, tie=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lb = {f"model.layers.*.{n}": own for n in names}
    cfg = ExportConfig(
        format="genai", quantize=f"int{base}", accuracy_level=0, block_size=32, gptq=True, linear_bits=lb
    )
    res = gptq_codes(loaded_of(model), _calib(n=8, seq_len=32), cfg, "cpu", tmp_path)
    n_layers = len(model.model.layers)
    assert res.linears == 7 * n_layers
    assert res.by_bits == {own: len(names) * n_layers, base: (7 - len(names)) * n_layers}
    codes, bits_of = res.load(), res.bits_of()
    for layer in model.model.layers:
        for name, lin in layer.named_modules():
            if isinstance(lin, torch.nn.Linear):
                key = weight_key(lin.weight.detach().numpy().T)
                b = own if name in names else base
                assert bits_of[key] == b, name
                assert codes[key][0].min() >= -(2 ** (b - 1)) and codes[key][0].max() <= 2 ** (b - 1) - 1, name
    ckpt = _save_checkpoint(model, tmp_path / "hf")
    with caplog.at_level("WARNING"):
        out = export_onnx(ckpt, tmp_path / "onnx", cfg, tmp_path / "work", gptq=res)
    q = out.quantization
    n_matmuls = sum(q["matmuls_by_bits"].values())
    packed = 1 if rounded else 0  # the q/k/v MatMul, rounded
    assert q["matmuls_by_bits"][str(own)] == (len(names) - packed) * n_layers
    assert q["matmuls_with_calibrated_codes"] == n_matmuls - 1 - packed * n_layers  # all but the lm_head
    assert ("matched no GPTQ codes at their bits" in caplog.text) == bool(rounded)
    ref = tiny_model("llama", VOCAB, tie=False)
    ref.load_state_dict(before)
    with torch.no_grad():
        for layer in ref.model.layers:
            for name, lin in layer.named_modules():
                if not isinstance(lin, torch.nn.Linear):
                    continue
                w = lin.weight.detach().numpy()
                c, sc = block_quantize(w.T, base, 32) if name in rounded else codes[weight_key(w.T)]
                lin.weight.copy_(torch.from_numpy(dequantize(c, sc, w.shape[1], 32).T))
        for mod in (ref.lm_head, ref.model.embed_tokens):  # untied: each rounded at export.quantize's bits
            w = mod.weight.detach().numpy()
            mod.weight.copy_(torch.from_numpy(dequantize(*block_quantize(w.T, base, 32), w.shape[1], 32).T))
        ids = _ids(3)
        want = ref(ids).logits[0]
    got = torch.from_numpy(open_artifact(out.onnx_dir).logits(ids[0].tolist()))
    assert (got - want).abs().max().item() < 1e-4
