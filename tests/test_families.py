"""The whole road (calibrate, prune, trim_vocab, save, export, validate) for every non-Llama family in arch.py:
a tiny model of each family built from its config in code, saved with a real tokenizer of the matching kind,
then ``langconvert`` on a recipe, as a user runs it. And ``langconvert check`` refusing what a family cannot do.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import CORPORA, TOKENIZERS, require_shared

from converter.cli import main

GPT2_EOS = 50_256  # <|endoftext|>: GPT-2's bos, eos (and here pad)
# Byte-level BPE (GPT-2) for the families whose released models use one; XLM-R's Unigram for XGLM, whose
# released tokenizer is a SentencePiece model with the same fairseq layout (<s> 0, <pad> 1, </s> 2, <unk> 3).
BPE = dict(
    tokenizer="gpt2", vocab_size=50_257, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS
)
UNIGRAM = dict(tokenizer="xlm-roberta", vocab_size=250_002, bos_token_id=0, pad_token_id=1, eos_token_id=2)
EXPERTS = {"method": "experts", "sparsity": 0.2, "experts": 15, "batch_size": 4}  # 75 -> 60 neurons


@dataclass
class Family:
    model_type: str
    config: dict  # hidden 64, 4 heads of 16, 2 layers, FFN 75 wide where the config has a key for it
    prune: dict
    width_key: str | None = None  # config key that must hold the shrunken FFN width
    tokens: dict = field(default_factory=lambda: BPE)


FAMILIES = [
    Family("gpt2", dict(n_embd=64, n_head=4, n_layer=2, n_inner=75, n_positions=512), EXPERTS, "n_inner"),
    # Conv1D weights through the (out, in) view: unstructured masks and the SparseGPT update
    Family(
        "gpt2",
        dict(n_embd=64, n_head=4, n_layer=2, n_inner=75, n_positions=512),
        {"method": "sparsegpt", "sparsity": 0.5, "sparsegpt_blocksize": 16, "batch_size": 4},
    ),
    # word_embed_proj_dim 32: project_in / project_out around the layers, embedding and head 32 wide
    Family(
        "opt",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            ffn_dim=75,
            word_embed_proj_dim=32,
            max_position_embeddings=512,
        ),
        EXPERTS,
        "ffn_dim",
    ),
    # BLOOM's FFN is 4 x hidden by construction: unstructured pruning only
    Family(
        "bloom",
        dict(hidden_size=64, n_head=4, n_layer=2),
        {"method": "wanda", "sparsity": 0.5, "batch_size": 4},
    ),
    Family(
        "xglm",
        dict(d_model=64, attention_heads=4, num_layers=2, ffn_dim=75, max_position_embeddings=512),
        EXPERTS,
        "ffn_dim",
        UNIGRAM,
    ),
    # Aya 23's family: tied head, logits scaled by logit_scale (not 1) inside the model
    Family(
        "cohere",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=75,
            max_position_embeddings=512,
            logit_scale=0.5,
        ),
        EXPERTS,
        "intermediate_size",
    ),
]
IDS = [f"{f.model_type}-{f.prune['method']}" for f in FAMILIES]


def save_tiny(family: Family, d: Path, weights: bool = True) -> Path:
    """A randomly initialised tiny model of ``family`` (tied head) with its real tokenizer, saved into ``d``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = dict(family.tokens)
    tok_dir = TOKENIZERS / tok.pop("tokenizer")
    config = AutoConfig.for_model(family.model_type, tie_word_embeddings=True, **tok, **family.config)
    if weights:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().save_pretrained(d)
    else:
        config.save_pretrained(d)
    shutil.copy(tok_dir / "tokenizer.json", d / "tokenizer.json")
    if (tok_dir / "tokenizer_config.json").is_file():
        shutil.copy(tok_dir / "tokenizer_config.json", d / "tokenizer_config.json")
    else:  # XLM-R's folder has tokenizer.json alone: name its special tokens as XGLM's tokenizer does
        specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_input_names": ["input_ids", "attention_mask"],
        }
        cfg.update(specials)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def recipe_for(tmp: Path, ckpt: Path, prune: dict, **over) -> Path:
    ntrex = CORPORA / "ntrex128"
    recipe = {
        "name": "tiny",
        "model": {"source": str(ckpt)},
        "languages": [
            {"code": "ko", "weight": 3, "sources": [str(ntrex / "newstest2019-ref.kor.txt")]},
            {
                "code": "en",
                "script_tokens": False,
                "top_tokens": 500,
                "sources": [str(ntrex / "newstest2019-ref.eng-US.txt")],
            },
        ],
        "calibration": {"num_samples": 8, "seq_len": 32, "max_heldout_docs": 12},
        "prune": prune,
        "vocab": {"min_count": 1},
        "export": {"format": "optimum", "quantize": "none"},
        # the gates of the tiny Gemma 3 run (test_pipeline.py)
        "validate": {
            "greedy_tokens": 8,
            "long_prompt_tokens": 100,
            "speed_prompts": 0,  # timing is no gate; the greedy gates already decode with the KV cache
            "eval_seq_len": 48,
        },
        "output": {"dir": str(tmp / "dist")},
        **over,
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_family_end_to_end(family: Family, tmp_path):
    require_shared()
    ckpt = save_tiny(family, tmp_path / f"tiny-{family.model_type}")
    before = json.loads((ckpt / "config.json").read_text())
    recipe = recipe_for(tmp_path, ckpt, family.prune)

    checked = CliRunner().invoke(main, ["check", str(recipe)])
    assert checked.exit_code == 0, checked.output
    assert f"{family.model_type} model, export.format optimum" in checked.output

    result = CliRunner().invoke(main, [str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "dist" / "tiny"
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["failed_gates"] == []
    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["ONNX float vs PyTorch max |Δlogit|"]["value"] < 1e-3
    for label in ("short", "long"):
        assert checks[f"ONNX float greedy tokens with KV cache identical, {label} prompt"]["passed"]

    cfg = json.loads((out / "model" / "config.json").read_text())
    token_map = json.loads((out / "model" / "token_map.json").read_text())["new_to_old"]
    assert cfg["model_type"] == family.model_type
    assert cfg["vocab_size"] == len(token_map) < before["vocab_size"]
    assert cfg["eos_token_id"] == token_map.index(before["eos_token_id"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["stages"]["export"]["metrics"]["tied_embedding"] is True  # the tied head is stored once
    if family.width_key:  # the shrunken FFN width is in the config the checkpoint reloads with
        assert cfg[family.width_key] == 60
        assert rep["prune"]["ffn"]["width_after"] == 60
    else:
        assert rep["prune"]["measured_sparsity"] == pytest.approx(family.prune["sparsity"], abs=0.02)


BLOOM = next(f for f in FAMILIES if f.model_type == "bloom")


@pytest.mark.parametrize(
    ("family", "over", "sentence"),
    [
        (
            BLOOM,
            {"export": {"format": "genai"}},
            "export.format 'genai' cannot carry a bloom model; use export.format: optimum.",
        ),
        (
            FAMILIES[0],
            {"export": {"format": "genai"}},
            "export.format 'genai' cannot carry a gpt2 model; use export.format: optimum.",
        ),
        (
            BLOOM,
            {"prune": EXPERTS},
            "prune.method 'experts' cannot shrink this model: a bloom model's FFN width cannot change (BloomMLP is "
            "4 × hidden_size wide by construction and its config has no key for another width); use prune.method "
            "magnitude, wanda or sparsegpt.",
        ),
    ],
    ids=["bloom-genai", "gpt2-genai", "bloom-experts"],
)
def test_check_refuses_what_a_family_cannot_do(family: Family, over: dict, sentence: str, tmp_path):
    require_shared()
    ckpt = save_tiny(family, tmp_path / "ckpt", weights=False)  # check reads config.json only
    prune = over.pop("prune", family.prune)
    recipe = recipe_for(tmp_path, ckpt, prune, **over)
    result = CliRunner().invoke(main, ["check", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {sentence}"


@pytest.mark.parametrize("family", [FAMILIES[0], FAMILIES[2]], ids=["gpt2", "opt"])
def test_weight_only_quantization_reaches_gemm_linears(family: Family, tmp_path):
    """GPT-2's Conv1D and OPT's FFN (tokens flattened to 2-D first) export as Gemm: int8 still quantizes them."""
    import onnx
    from transformers import AutoConfig, AutoModelForCausalLM

    from converter.export import export_onnx
    from converter.recipe import ExportConfig
    from converter.runtime import open_artifact

    config = AutoConfig.for_model(
        family.model_type, vocab_size=512, tie_word_embeddings=True, **family.config
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "ckpt")
    res = export_onnx(
        tmp_path / "ckpt", tmp_path / "onnx", ExportConfig(format="optimum", quantize="int8"), tmp_path
    )
    ops = [n.op_type for n in onnx.load(str(res.onnx_dir / "model.onnx")).graph.node]
    assert "Gemm" not in ops
    from transformers.pytorch_utils import Conv1D

    linears = [
        m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))
    ]  # lm_head and project_in/out too
    assert ops.count("MatMulNBits") == len(linears)
    assert res.tied_embedding and res.quantization["lm_head"]["tied_embedding"]
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits[0]
    got = torch.from_numpy(open_artifact(res.onnx_dir).logits(ids[0].tolist()))
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item() + 0.02
