"""export_onnx on tiny checkpoints of three families (gemma3_text tied, llama untied, qwen2 tied), both formats
(genai: onnxruntime-genai's fused decoder run in onnxruntime_genai; optimum: ORTModelForCausalLM), float and
weight-only int8/int4, plus dynamic int8; and the block-quantization math on hand-worked tensors."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from converter import ort
from converter.errors import ExportError, ModelError, RecipeError
from converter.export import export_onnx, genai
from converter.export.quantize import block_quantize, dequantize, pack_codes
from converter.recipe import ExportConfig
from converter.runtime import GenaiDecoder, OrtArtifact, open_artifact

VOCAB = 320  # not 512, the tiny models' max_position_embeddings, so shapes tell the matrices apart
HIDDEN = 64
FAMILIES = {"gemma3_text": True, "llama": False, "qwen2": True}  # model_type -> tied embedding
FORMATS = ("genai", "optimum")


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
    return {mt: tiny_model(mt, VOCAB, tie=tie) for mt, tie in FAMILIES.items()}


VARIANTS = [(f, q) for f in FORMATS for q in ("none", "int8", "int4")] + [("optimum", "int8-dynamic")]


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(model_type, format, quantize) -> ExportResult, each exported once per module."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for mt, model in models.items():
        ckpt = _save_checkpoint(model, root / f"{mt}-hf")
        for fmt, q in VARIANTS:
            name = f"{mt}-{fmt}-{q}"
            cfg = ExportConfig(format=fmt, quantize=q)
            out[mt, fmt, q] = export_onnx(ckpt, root / name / "onnx", cfg, root / name / "work")
    return out


def _ids(seed: int = 1, n: int = 40) -> torch.Tensor:
    return torch.randint(4, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mt", list(FAMILIES))
def test_float_logits_match_pytorch(models, exported, mt, fmt):
    res = exported[mt, fmt, "none"]
    assert res.float_dir == res.onnx_dir and not res.quantized and res.format == fmt
    art = open_artifact(res.onnx_dir)
    assert isinstance(art, GenaiDecoder if fmt == "genai" else OrtArtifact)
    ids = _ids()  # 40 tokens: past Gemma's 16-token sliding window
    with torch.no_grad():
        ref = models[mt](ids).logits[0]
    got = torch.from_numpy(art.logits(ids[0].tolist()))
    assert got.shape == (40, VOCAB)
    assert (got - ref).abs().max().item() < 1e-4
    # the float graph in plain onnxruntime too (what validation's float parity uses), with left padding
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    batch = torch.cat([ids[:, :20], ids[:, 20:]])
    with torch.no_grad():
        ref2 = models[mt](input_ids=batch, attention_mask=mask).logits
    got2 = ort.onnx_logits(res.onnx_dir, batch, mask)
    assert (got2[0] - ref2[0]).abs().max().item() < 1e-4
    if fmt == "optimum":  # the genai graph takes no position_ids, so left padding is optimum's alone
        assert (got2[1, 5:] - ref2[1, 5:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mt", list(FAMILIES))
def test_greedy_with_kv_cache_matches_pytorch(models, exported, mt, fmt):
    art = open_artifact(exported[mt, fmt, "none"].onnx_dir)
    # 12 prompt + 12 new tokens crosses gemma's sliding window of 16
    prompt = _ids(2, 12)
    want = ort.greedy_generate_torch(models[mt], prompt, 12)
    assert art.greedy(prompt[0].tolist(), 12) == want
    assert ort.greedy_generate_onnx(exported[mt, fmt, "none"].onnx_dir, prompt, 12) == want


def _fake_quantized(model, bits: int, block_size: int = 32, bits_of=None):
    """A copy whose every decoder linear, lm_head and embedding hold what the MatMulNBits blocks stand for;
    ``bits_of(module_name)``: a linear's own bits where they differ from ``bits``."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear):
                b = mod.weight.detach().T.numpy()  # MatMul's B (in=K, out=N)
                codes, scales = block_quantize(b, (bits_of and bits_of(name)) or bits, block_size)
                mod.weight.copy_(torch.from_numpy(dequantize(codes, scales, b.shape[0], block_size).T))
        if m.config.tie_word_embeddings:
            m.model.embed_tokens.weight = m.lm_head.weight
        else:  # an untied embedding is block-quantized on its own, along the hidden axis
            e = m.model.embed_tokens.weight.detach().numpy()
            codes, scales = block_quantize(e.T, bits, block_size)
            m.model.embed_tokens.weight.copy_(torch.from_numpy(dequantize(codes, scales, e.shape[1], block_size).T))
    return m.eval()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mt", list(FAMILIES))
def test_weight_only_artifact_computes_its_dequantized_weights(models, tmp_path, mt, bits):
    """With fp32 activations (accuracy_level 0) the artifact is exactly the model with quantized weights."""
    ckpt = _save_checkpoint(models[mt], tmp_path / "hf")
    cfg = ExportConfig(format="genai", quantize=f"int{bits}", accuracy_level=0)
    res = export_onnx(ckpt, tmp_path / "onnx", cfg, tmp_path / "work")
    ref_model = _fake_quantized(models[mt], bits)
    ids = _ids(3)
    with torch.no_grad():
        ref = ref_model(ids).logits[0]
    got = torch.from_numpy(open_artifact(res.onnx_dir).logits(ids[0].tolist()))
    assert (got - ref).abs().max().item() < 1e-4
    assert open_artifact(res.onnx_dir).greedy(ids[0, :10].tolist(), 10) == ort.greedy_generate_torch(
        ref_model, ids[:, :10], 10
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mt", list(FAMILIES))
def test_linear_bits_give_the_matching_linears_their_bits(models, tmp_path, mt, fmt):
    """export.linear_bits: every gate_proj and all of layer 1 at 4 bits, the rest at 8. The artifact (fp32
    activations) computes exactly that mixed model, in both formats, also where the exporter packs q/k/v or
    gate/up into one MatMul (then all of layer 1's parts are 4-bit, so the packed weight is too)."""
    import onnx

    ckpt = _save_checkpoint(models[mt], tmp_path / "hf")
    linear_bits = {"model.layers.*.mlp.gate_proj": 4, "model.layers.1.*": 4}
    cfg = ExportConfig(format=fmt, quantize="int8", accuracy_level=0, linear_bits=linear_bits)
    res = export_onnx(ckpt, tmp_path / "onnx", cfg, tmp_path / "work")

    def bits_of(name: str) -> int | None:
        return 4 if (name.endswith("mlp.gate_proj") or name.startswith("model.layers.1.")) else None

    ref_model = _fake_quantized(models[mt], 8, bits_of=bits_of)
    ids = _ids(5)
    with torch.no_grad():
        ref = ref_model(ids).logits[0]
    got = torch.from_numpy(open_artifact(res.onnx_dir).logits(ids[0].tolist()))
    assert (got - ref).abs().max().item() < 1e-4
    graph = onnx.load(str(res.onnx_dir / "model.onnx")).graph
    nbits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    four = sorted(n for n, b in nbits.items() if b == 4)
    assert four and all("gate_proj" in n or "layers.1/" in n for n in four), four
    assert res.quantization["matmuls_with_linear_bits"] == len(four)
    assert res.quantization["matmuls_by_bits"] == {"4": len(four), "8": len(nbits) - len(four)}


def test_linear_bits_pattern_that_matches_nothing_is_a_recipe_error(models, tmp_path):
    ckpt = _save_checkpoint(models["llama"], tmp_path / "hf")
    cfg = ExportConfig(quantize="int8", linear_bits={"layers.*.mlp.gate_proj": 4})  # no "model." prefix
    with pytest.raises(RecipeError, match=r"pattern 'layers\.\*\.mlp\.gate_proj' matches no linear .*model\.layers\.0\."):
        export_onnx(ckpt, tmp_path / "onnx", cfg, tmp_path / "work")
    assert not (tmp_path / "onnx").exists()
    # a 2-D weight that no quantized MatMul reads (the embedding is a Gather) is no linear either
    cfg = ExportConfig(quantize="int8", linear_bits={"model.embed_tokens": 4})
    with pytest.raises(RecipeError, match="'model.embed_tokens' matches no linear that the export quantizes"):
        export_onnx(ckpt, tmp_path / "onnx", cfg, tmp_path / "work")
    assert not (tmp_path / "onnx").exists()


def test_linear_bits_raise_a_packed_weight_and_read_bfloat16_checkpoints(tmp_path):
    """int4 with q_proj at 8 bits: onnxruntime-genai packs Llama's q/k/v into one MatMul, which then takes the
    most bits among its parts (8). The checkpoint is saved in bfloat16, which the patterns are resolved on too;
    a pattern giving the default bits changes nothing and is not counted."""
    import onnx

    model = tiny_model("llama", VOCAB, tie=False).to(torch.bfloat16)
    ckpt = _save_checkpoint(model, tmp_path / "hf")
    lb = {"model.layers.*.self_attn.q_proj": 8, "model.layers.*.mlp.up_proj": 4}
    res = export_onnx(ckpt, tmp_path / "onnx", ExportConfig(quantize="int4", linear_bits=lb), tmp_path / "work")
    graph = onnx.load(str(res.onnx_dir / "model.onnx")).graph
    nbits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    qkv = [n for n in nbits if "qkv_proj" in n]
    assert len(qkv) == len(model.model.layers) and all(nbits[n] == 8 for n in qkv)
    assert all(b == 4 for n, b in nbits.items() if "mlp" in n)
    assert res.quantization["matmuls_with_linear_bits"] == len(qkv)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("q", ["int8", "int4"])
@pytest.mark.parametrize("mt", list(FAMILIES))
def test_weight_only_exports_are_smaller_and_close(models, exported, mt, fmt, q):
    import onnx

    res, flt = exported[mt, fmt, q], exported[mt, fmt, "none"]
    assert res.quantized and res.float_dir != res.onnx_dir and (res.float_dir / "model.onnx").is_file()
    assert res.bytes < res.float_bytes and res.float_bytes == flt.bytes
    graph = onnx.load(str(res.onnx_dir / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in {t.name for t in graph.initializer}]
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {int(q[-1])}
    assert res.quantization["matmuls_by_bits"] == {q[-1]: len(nbits)}
    # the shipped weights are the quantized ones: no float matrix of vocab × hidden is left
    floats = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert not [t for t in floats if sorted(t.dims) == sorted([VOCAB, HIDDEN])]
    assert res.quantization["embedding"]["bits"] == int(q[-1])
    ids = _ids(4)
    with torch.no_grad():
        ref = _fake_quantized(models[mt], int(q[-1]))(ids).logits[0]
    got = torch.from_numpy(open_artifact(res.onnx_dir).logits(ids[0].tolist()))
    # accuracy_level 4 also quantizes activations to int8 per block: close, not exact
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item() + 0.02


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_embedding_stored_once(models, exported, fmt):
    import onnx

    model = models["gemma3_text"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for q in ("none", "int8", "int4"):
        res = exported["gemma3_text", fmt, q]
        assert res.tied_embedding, q
        graph = onnx.load(str(res.onnx_dir / "model.onnx")).graph
        big = [t for t in graph.initializer if VOCAB in t.dims]
        assert len(big) == (1 if q == "none" else 2), (q, [t.name for t in big])  # matrix (+ its block scales)
        assert sum(int(np.prod(t.dims)) for t in big) < VOCAB * HIDDEN * 1.2
        if q != "none":
            assert any(n.op_type == "GatherBlockQuantized" for n in graph.node)
            assert res.quantization["lm_head"]["tied_embedding"] is True


@pytest.mark.parametrize("fmt", FORMATS)
def test_untied_model_keeps_both_matrices(exported, fmt):
    import onnx

    res = exported["llama", fmt, "int8"]
    assert not exported["llama", fmt, "none"].tied_embedding
    graph = onnx.load(str(res.onnx_dir / "model.onnx")).graph
    # the embedding and the lm_head are quantized separately: two packed vocabulary matrices
    packed = [t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8 and t.dims[0] == VOCAB]
    assert len(packed) == 2 and any(n.op_type == "GatherBlockQuantized" for n in graph.node)
    assert res.quantization["embedding"]["bits"] == 8 and res.quantization["lm_head"]["tied_embedding"] is False


def test_lm_head_bits_keeps_the_head_at_8_bits(models, tmp_path):
    import onnx

    ckpt = _save_checkpoint(models["gemma3_text"], tmp_path / "hf")
    res = export_onnx(ckpt, tmp_path / "onnx", ExportConfig(quantize="int4", lm_head_bits=8), tmp_path / "w")
    graph = onnx.load(str(res.onnx_dir / "model.onnx")).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    head = [b for name, b in bits.items() if "lm_head" in name]
    assert head == [8] and set(bits.values()) == {4, 8} and list(bits.values()).count(8) == 1
    gbq = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert next(a.i for a in gbq.attribute if a.name == "bits") == 8
    assert res.quantization["head_bits"] == 8 and res.quantization["matmuls_by_bits"]["8"] == 1


@pytest.mark.parametrize("mt", ["gemma3_text", "llama"])
def test_int8_dynamic_export_is_smaller_and_runs(models, exported, mt):
    import onnx

    q, f = exported[mt, "optimum", "int8-dynamic"], exported[mt, "optimum", "none"]
    assert q.quantized and q.bytes < q.float_bytes == f.bytes
    graph = onnx.load(str(q.onnx_dir / "model.onnx")).graph
    assert any(n.op_type == "MatMulInteger" for n in graph.node)
    # export.int8_reduce_range (default): weights in [-64, 64], so a pair of u8×s8 products summed in 16 bits on
    # non-VNNI x86 stays within int16 (2 × 255 × 64 = 32,640 ≤ 32,767); full 8-bit weights reach 2 × 255 × 127.
    assert q.quantization["reduce_range"] is True
    int8 = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8 and all(w.min() >= -64 and w.max() <= 64 for w in int8)
    if mt == "gemma3_text":  # the tied matrix is stored once, in int8
        assert q.quantization["tied_embedding_int8"]
        assert sum(int(np.prod(t.dims)) == VOCAB * HIDDEN for t in graph.initializer) == 1
    ids = _ids()
    with torch.no_grad():
        ref = models[mt](ids).logits[0]
    got = ort.onnx_logits(q.onnx_dir, ids)[0]
    assert torch.isfinite(got).all() and (got - ref).abs().max().item() < 0.2
    assert len(ort.greedy_generate_onnx(q.onnx_dir, ids[:, :8], 8)) == 8


@pytest.mark.parametrize("key", [("gemma3_text", "none"), ("gemma3_text", "int8"), ("llama", "int4"), ("qwen2", "none")])
def test_optimum_format_loads_in_ortmodel(exported, key):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    onnx_dir = exported[key[0], "optimum", key[1]].onnx_dir
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (onnx_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    inputs = tok("w5 w6 w7 w8", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out[0, inputs.input_ids.shape[1] :].tolist() == ort.greedy_generate_onnx(onnx_dir, inputs.input_ids, 6)


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_genai_format_runs_the_readme_loop(models, exported, mt):
    """The README's onnxruntime-genai generate loop on the shipped directory, with its own tokenizer files."""
    import onnxruntime_genai as og

    onnx_dir = exported[mt, "genai", "none"].onnx_dir
    cfg = json.loads((onnx_dir / "genai_config.json").read_text())
    assert cfg["search"]["max_length"] == 512 == cfg["model"]["context_length"]  # max_position_embeddings 512
    # export.intra_op_threads' default: onnxruntime picks the thread count on the machine that loads it
    assert cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0
    assert (onnx_dir / "tokenizer.json").read_bytes() == (onnx_dir.parents[1] / f"{mt}-hf" / "tokenizer.json").read_bytes()
    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16, do_sample=False)
    gen = og.Generator(model, params)
    prompt = [2, 5, 6, 7, 8]
    gen.append_tokens(prompt)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == ort.greedy_generate_torch(models[mt], torch.tensor([prompt]), 11)


def test_rope_tables_cut_to_the_context_length(models, tmp_path):
    import onnx

    ckpt = _save_checkpoint(models["llama"], tmp_path / "hf")
    res = export_onnx(ckpt, tmp_path / "onnx", ExportConfig(context_length=64, intra_op_threads=1), tmp_path / "w")
    options = json.loads((res.onnx_dir / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert options["intra_op_num_threads"] == 1 == res.build["intra_op_threads"]
    graph = onnx.load(str(res.onnx_dir / "model.onnx")).graph
    caches = [t for t in graph.initializer if t.name.startswith(("cos_cache", "sin_cache"))]
    assert caches and all(t.dims[0] == 64 for t in caches)
    assert res.build["rope_cache_rows_removed"] == 2 * (512 - 64)
    art = open_artifact(res.onnx_dir)
    assert art.max_length == 64
    with pytest.raises(ValueError, match="context length 64"):
        art.greedy(list(range(4, 60)), 10)
    one_thread = art.greedy([2, 5, 6, 7], 8)
    del art
    genai.set_intra_op_threads(res.onnx_dir, None)  # null: the key left out, onnxruntime-genai's own default
    options = json.loads((res.onnx_dir / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert "intra_op_num_threads" not in options
    assert open_artifact(res.onnx_dir).greedy([2, 5, 6, 7], 8) == one_thread


def test_summary_is_json(exported):
    for res in exported.values():
        s = res.summary()
        json.dumps(s)
        assert s["headline"] and s["bytes"] == res.bytes > 0 and s["opset"]
        assert s["runtime"] == ("onnxruntime-genai" if res.format == "genai" else "onnxruntime")
    assert "int4" in exported["llama", "genai", "int4"].summary()["headline"]


def test_decode_speed_reports_the_same_keys(models, exported):
    prompts = [_ids(3, 6), _ids(4, 9)]
    a = open_artifact(exported["llama", "genai", "int8"].onnx_dir).decode_speed([p[0].tolist() for p in prompts], 4)
    b = ort.decode_speed_onnx(exported["llama", "optimum", "none"].onnx_dir, prompts, 4, warmup=1)
    c = ort.decode_speed_torch(models["llama"], prompts, 4, warmup=0)
    assert a.keys() - {"runtime"} == b.keys() == c.keys()
    for r in (a, b, c):
        assert r["runs"] == 2 and r["tokens_per_s"] > 0 and r["ttft_s"] > 0


# --------------------------------------------------------------------------------------------------- errors
def test_missing_config_is_export_error(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export_onnx(tmp_path / "model", tmp_path / "onnx", ExportConfig(), tmp_path / "work")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_weights_is_export_error(exported, tmp_path, fmt):
    src = exported["llama", fmt, "none"].onnx_dir.parents[1] / "llama-hf"
    ckpt = tmp_path / "broken"
    shutil.copytree(src, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="failed") as info:
        export_onnx(ckpt, tmp_path / "onnx", ExportConfig(format=fmt), tmp_path / "work")
    assert info.value.__cause__ is not None
    assert not (tmp_path / "onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]  # staging removed


def test_genai_refuses_what_its_builder_cannot_carry(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny_model("llama", VOCAB, tie=False)
    cfg = m.config
    cfg.head_dim = 8
    ckpt = _save_checkpoint(AutoModelForCausalLM.from_config(cfg), tmp_path / "hd8")
    with pytest.raises(ModelError, match="head_dim 8 is not a multiple of 16.*use export.format: optimum"):
        export_onnx(ckpt, tmp_path / "onnx", ExportConfig(), tmp_path / "work")
    g = tiny_model("gemma3_text", VOCAB).config
    g.layer_types = ["sliding_attention", "full_attention"]
    ckpt = _save_checkpoint(AutoModelForCausalLM.from_config(g), tmp_path / "g3")
    with pytest.raises(ModelError, match="layer_types differ"):
        export_onnx(ckpt, tmp_path / "onnx", ExportConfig(), tmp_path / "work")
    g.layer_types = ["sliding_attention"] * 2
    g.sliding_window = 32
    ckpt = _save_checkpoint(AutoModelForCausalLM.from_config(g), tmp_path / "g3b")
    with pytest.raises(RecipeError, match="context_length 16 is below the model's 32-token sliding window"):
        export_onnx(ckpt, tmp_path / "onnx", ExportConfig(context_length=16), tmp_path / "work")
    assert not (tmp_path / "onnx").exists()


def test_genai_architecture_comes_from_the_config_or_its_model_type():
    from converter.arch import genai_incompatibility

    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    assert genai_incompatibility(base) is None  # no `architectures`: the class AutoModelForCausalLM builds
    assert genai_incompatibility({**base, "architectures": ["LlamaForCausalLM"]}) is None
    assert "LlamaForSequenceClassification is not one" in genai_incompatibility(
        {**base, "architectures": ["LlamaForSequenceClassification"]}
    )
    assert "is not one" in genai_incompatibility({**base, "model_type": "olmo2"})  # a family the builder lacks


def test_export_recipe_combinations_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="int8-dynamic' needs export.format: optimum"):
        ExportConfig(format="genai", quantize="int8-dynamic")
    with pytest.raises(ValidationError, match="lm_head_bits needs export.quantize int8 or int4"):
        ExportConfig(lm_head_bits=8)
    with pytest.raises(ValidationError, match="opset applies to export.format optimum"):
        ExportConfig(opset=17)
    with pytest.raises(ValidationError, match="linear_bits needs export.quantize int8 or int4"):
        ExportConfig(linear_bits={"model.layers.*.mlp.up_proj": 4})
    with pytest.raises(ValidationError, match="linear_bits matches the lm_head; set its bits with export.lm_head_bits"):
        ExportConfig(quantize="int8", linear_bits={"*": 4})
    with pytest.raises(ValidationError):
        ExportConfig(quantize="int8", linear_bits={"model.layers.*.mlp.up_proj": 2})


# --------------------------------------------------------------------------------------------------- math
def test_block_quantize_hand_worked():
    # K=4, N=2, blocks of 2 along K. Column 0: blocks [1, -2] and [0.5, 0.25]; column 1: [3, 3] and [0, 0].
    w = np.array([[1.0, 3.0], [-2.0, 3.0], [0.5, 0.0], [0.25, 0.0]], np.float32)
    codes, scales = block_quantize(w, bits=4, block_size=2)
    # the largest-magnitude value of each block maps to -8: scale = value / -8
    np.testing.assert_array_equal(scales, np.array([[0.25, 0.5 / -8], [3 / -8, 0.0]], np.float32))
    np.testing.assert_array_equal(codes, np.array([[4, -8, -8, -4], [-8, -8, 0, 0]], np.int8))
    packed = pack_codes(codes, 4, 2)  # code + 8, even index in the low nibble
    np.testing.assert_array_equal(packed[:, :, 0], np.array([[0x0C, 0x40], [0x00, 0x88]], np.uint8))
    np.testing.assert_array_equal(dequantize(codes, scales, 4, 2), w)  # these values are representable
    codes8, scales8 = block_quantize(w, bits=8, block_size=2)
    np.testing.assert_array_equal(scales8[0], np.array([2 / 128, 0.5 / -128], np.float32))
    np.testing.assert_array_equal(codes8[0], np.array([64, -128, -128, -64], np.int8))
    np.testing.assert_array_equal(pack_codes(codes8, 8, 2)[0], np.array([[192, 0], [0, 64]], np.uint8))


def test_block_quantize_pads_k_and_mse_search_lowers_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 5)).astype(np.float32)
    w[3, 0] = 40.0  # an outlier
    codes, scales = block_quantize(w, 4, 16)
    assert codes.shape == (5, 48) and scales.shape == (5, 3) and not codes[:, 37:].any()
    err_abs = ((dequantize(codes, scales, 37, 16) - w) ** 2).sum()
    c2, s2 = block_quantize(w, 4, 16, scale_search="mse")
    err_mse = ((dequantize(c2, s2, 37, 16) - w) ** 2).sum()
    assert err_mse < err_abs


def test_matmulnbits_computes_x_times_dequantized_weight():
    """The packing contract with onnxruntime: one MatMulNBits node equals x @ dequantize(codes, scales)."""
    import onnxruntime as rt
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    k, n, bs = 70, 9, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    for bits in (4, 8):
        codes, scales = block_quantize(w, bits, bs)
        node = helper.make_node(
            "MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=bs
        )
        g = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
            [numpy_helper.from_array(pack_codes(codes, bits, bs), "B"), numpy_helper.from_array(scales, "s")],
        )
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        y = rt.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ dequantize(codes, scales, k, bs), rtol=1e-5, atol=1e-5)


def test_large_tensors_start_page_aligned_and_mapped_sessions_hold_no_copy(tmp_path):
    """io.save starts every tensor of >= 1 MiB at a multiple of 4 KiB of the data file, so onnxruntime maps it;
    a ``mapped`` session (validation's float parity) then computes from that mapping without a packed copy and
    gives the same outputs as a default session."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from converter.export.io import ALIGN_BYTES, ALIGN_MIN_BYTES, save

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((263, 1001), dtype=np.float32) / 16  # 1,053,052 bytes: not a multiple of 4 KiB
    mid = rng.standard_normal((500,), dtype=np.float32)  # 2,000 bytes: external, too small to align
    w2 = rng.standard_normal((1001, 11264), dtype=np.float32) / 32  # 43 MiB: onnxruntime packs a copy of it
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y0"]),
            helper.make_node("ReduceSum", ["mid"], ["s"], keepdims=0),
            helper.make_node("Add", ["y0", "s"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 263])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 11264])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (mid, "mid"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    save(model, path, data_name="model.onnx_data", external=True)

    saved = onnx.load(str(path), load_external_data=False)
    offsets = {
        t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in saved.graph.initializer
    }
    sizes = {"w1": w1.nbytes, "mid": mid.nbytes, "w2": w2.nbytes}
    assert set(offsets) == set(sizes)
    for name, n in sizes.items():
        if n >= ALIGN_MIN_BYTES:
            assert offsets[name] % ALIGN_BYTES == 0, name
    assert offsets["mid"] == w1.nbytes  # small tensors are packed without padding
    assert offsets["w2"] > offsets["mid"] + mid.nbytes  # padded up to the next page

    x = rng.standard_normal((3, 263), dtype=np.float32)
    expected = np.maximum(x @ w1, 0) @ w2 + mid.sum()
    mapped = ort.load_session(path, mapped=True)
    assert mapped.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    got_mapped = mapped.session.run(None, {"x": x})[0]
    got_packed = ort.load_session(path).session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got_mapped, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got_mapped, got_packed, rtol=1e-5, atol=1e-5)  # summation order only

    # The memory each session adds, in a fresh process (this one's heap may already hold freed pages): the
    # default session packs w2 into its own memory, the mapped one reads it from the file.
    probe = (
        "import sys\n"
        "from converter import ort\n"
        "def anon():\n"
        "    return [int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('RssAnon:')][0]\n"
        "ort.load_session(sys.argv[1], mapped=True)  # onnxruntime's own start-up (thread pools) paid here\n"
        "a = anon(); m = ort.load_session(sys.argv[1], mapped=True); b = anon()\n"
        "p = ort.load_session(sys.argv[1]); c = anon()\n"
        "print(b - a, c - b)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True, cwd=Path.cwd()
    )
    mapped_kib, packed_kib = (int(v) for v in out.stdout.split())
    assert packed_kib > 32 * 1024, packed_kib
    assert mapped_kib < 8 * 1024, mapped_kib
