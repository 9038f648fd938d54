"""The real thing: Gemma 3 270M (PyPI GGUF) -> Korean release through `langconvert recipes/korean.yaml`.

Slow (minutes on 2 cores: GGUF conversion, pruning 18 layers, ONNX export); CI runs it. Sample counts are
reduced with --set so the run fits CI, everything else is the shipped recipe.
"""

from __future__ import annotations

import json

import pytest
import regex
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
        "--set", "calibration.num_samples=16",
        "--set", "calibration.seq_len=128",
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
    tok = rep["tokenizer"]
    # One held-out Korean line quotes an unseen Latin word (see recipes/korean.yaml): 23/24 lines identical.
    assert tok["ko"]["parity"]["share"] >= 0.95 and tok["ko"]["parity"]["gated"]
    assert all(t["round_trip"]["share"] == 1.0 for t in tok.values())
    assert tok["uk"]["after"]["byte_fallback_share"] > tok["uk"]["before"]["byte_fallback_share"]
    onnx = rep["onnx"]
    assert onnx["quantized"] and onnx["max_abs_logit_diff_float"] < 0.01
    assert onnx["greedy"]["torch"] == onnx["greedy"]["onnx_float"]
    q = rep["quality"]["ko"]
    assert q["original"]["bpb"] < q["artifact"]["bpb"] < 3 * q["original"]["bpb"]
    assert rep["prune"]["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    md = (out / "report.md").read_text()
    assert "| vocabulary | 262,144 |" in md and "decode tokens/s" in md


def test_artifact_generates_korean_with_optimum(korean_release):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    out, _ = korean_release
    model = ORTModelForCausalLM.from_pretrained(out / "onnx")
    tok = AutoTokenizer.from_pretrained(out / "onnx")
    ids = tok("대한민국의 수도는", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert regex.search(r"\p{Hangul}", text), text
