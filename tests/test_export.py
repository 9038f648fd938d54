"""export_onnx + converter.ort on tiny gemma3_text (tied) and llama (untied) checkpoints built in code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from converter import ort
from converter.errors import ExportError
from converter.export import export_onnx
from converter.recipe import ExportConfig

VOCAB = 512


def _tokenizer(vocab_size: int = VOCAB):
    """A WordLevel PreTrainedTokenizerFast: ids 0-3 are <pad> <eos> <bos> <unk> like tiny_model's config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def _save_checkpoint(model, path: Path) -> Path:
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models():
    return {
        "gemma3_text": tiny_model("gemma3_text", VOCAB, tie=True),
        "llama": tiny_model("llama", VOCAB, tie=False),
    }


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(model_type, quantize) -> ExportResult, each exported once per module."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for mt, model in models.items():
        ckpt = _save_checkpoint(model, root / f"{mt}-hf")
        for q in ("none", "int8"):
            out[mt, q] = export_onnx(
                ckpt, root / f"{mt}-{q}" / "onnx", ExportConfig(quantize=q), root / f"{mt}-{q}" / "work"
            )
    return out


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    return ids, mask


@pytest.mark.parametrize("mt", ["gemma3_text", "llama"])
def test_float_logits_match_pytorch(models, exported, mt):
    res = exported[mt, "none"]
    assert res.float_dir == res.onnx_dir and not res.quantized
    assert (res.onnx_dir / "model.onnx").is_file()
    ids, mask = _batch()
    with torch.no_grad():
        ref = models[mt](input_ids=ids, attention_mask=mask).logits
    got = ort.onnx_logits(res.onnx_dir, ids, mask)
    assert got.shape == (2, 20, VOCAB) and got.dtype == torch.float32
    assert (got[0] - ref[0]).abs().max().item() < 1e-4
    assert (got[1, 5:] - ref[1, 5:]).abs().max().item() < 1e-4  # padded positions are undefined


@pytest.mark.parametrize("mt", ["gemma3_text", "llama"])
def test_greedy_with_kv_cache_matches_pytorch(models, exported, mt):
    dec = ort.load_session(exported[mt, "none"].onnx_dir)
    assert dec.providers[-1] == "CPUExecutionProvider"
    # 12 prompt + 8 new tokens crosses gemma's sliding window of 16
    prompt = _batch(2)[0][:1, :12]
    want = ort.greedy_generate_torch(models[mt], prompt, 8)
    assert len(want) == 8
    assert ort.greedy_generate_onnx(dec, prompt, 8) == want


def test_tied_embedding_stored_once(models, exported):
    import onnx

    model = models["gemma3_text"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())  # counts the tied matrix once
    res = exported["gemma3_text", "none"]
    assert res.tied_embedding
    graph = onnx.load(str(res.onnx_dir / "model.onnx")).graph
    sizes = [int(np.prod(t.dims)) for t in graph.initializer]
    emb = VOCAB * 32
    assert sum(s == emb for s in sizes) == 1
    assert abs(sum(sizes) - n_params) < 0.05 * n_params  # a stored copy would add 55%


def test_untied_model_keeps_both_matrices(exported):
    assert not exported["llama", "none"].tied_embedding


@pytest.mark.parametrize("mt", ["gemma3_text", "llama"])
def test_int8_export_is_smaller_and_runs(models, exported, mt):
    import onnx

    q, f = exported[mt, "int8"], exported[mt, "none"]
    assert q.quantized and q.float_dir != q.onnx_dir and (q.float_dir / "model.onnx").is_file()
    assert q.bytes < q.float_bytes and q.float_bytes == f.bytes
    graph = onnx.load(str(q.onnx_dir / "model.onnx")).graph
    assert any(n.op_type == "MatMulInteger" for n in graph.node)
    # export.int8_reduce_range (default): weights in [-64, 64], so a pair of u8×s8 products summed in 16 bits on
    # non-VNNI x86 stays within int16 (2 × 255 × 64 = 32,640 ≤ 32,767); full 8-bit weights reach 2 × 255 × 127.
    assert q.quantization["reduce_range"] is True
    int8 = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8 and all(w.min() >= -64 and w.max() <= 64 for w in int8)
    assert max(int(w.max()) for w in int8) == 64  # the range is used, not collapsed
    if mt == "gemma3_text":  # the tied matrix is stored once, in int8
        assert q.quantization["tied_embedding_int8"]
        assert sum(int(np.prod(t.dims)) == VOCAB * 32 for t in graph.initializer) == 1
    ids, mask = _batch()
    with torch.no_grad():
        ref = models[mt](input_ids=ids, attention_mask=mask).logits[0]
    got = ort.onnx_logits(q.onnx_dir, ids, mask)[0]
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < 0.2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.8
    assert len(ort.greedy_generate_onnx(q.onnx_dir, ids[:1, :8], 8)) == 8


@pytest.mark.parametrize("key", [("gemma3_text", "none"), ("gemma3_text", "int8"), ("llama", "none")])
def test_optimum_ortmodel_generates(exported, key):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    onnx_dir = exported[key].onnx_dir
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (onnx_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    inputs = tok("w5 w6 w7 w8", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, inputs.input_ids.shape[1] + 6)
    if key[1] == "none":  # optimum's cache handling agrees with ours
        assert out[0, inputs.input_ids.shape[1] :].tolist() == ort.greedy_generate_onnx(
            onnx_dir, inputs.input_ids, 6
        )


def test_summary_is_json(exported):
    for res in exported.values():
        s = res.summary()
        json.dumps(s)
        assert s["headline"] and s["bytes"] == res.bytes > 0 and s["opset"]
    assert "int8" in exported["llama", "int8"].summary()["headline"]


def test_decode_speed_reports_the_same_keys(models, exported):
    prompts = [_batch(3)[0][:1, :6], _batch(4)[0][:1, :9]]
    a = ort.decode_speed_onnx(exported["llama", "none"].onnx_dir, prompts, 4, warmup=1)
    b = ort.decode_speed_torch(models["llama"], prompts, 4, warmup=0)
    assert a.keys() == b.keys()
    for r in (a, b):
        assert r["runs"] == 2 and r["tokens_per_s"] > 0 and r["ttft_s"] > 0


def test_missing_config_is_export_error(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export_onnx(tmp_path / "model", tmp_path / "onnx", ExportConfig(), tmp_path / "work")
    assert not (tmp_path / "onnx").exists()


def test_corrupt_weights_is_export_error(models, exported, tmp_path):
    src = exported["llama", "none"].onnx_dir.parents[1] / "llama-hf"
    ckpt = tmp_path / "broken"
    shutil.copytree(src, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="ONNX export of .* failed") as info:
        export_onnx(ckpt, tmp_path / "onnx", ExportConfig(), tmp_path / "work")
    assert info.value.__cause__ is not None
    assert not (tmp_path / "onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]  # staging removed


def test_sessions_are_reused_per_directory(exported):
    ort.clear_session_cache()
    a = exported["llama", "none"].onnx_dir
    assert ort._decoder(a) is ort._decoder(a / "model.onnx")
    ort.clear_session_cache()
