"""The exhaustive script check on every real tokenizer in ../shared: each assigned code point of Hangul (ko),
Cyrillic (uk), Latin (en) and Han (zh), alone, after a space and between its neighbours, tokenizes to the same
ids after a trim with the scripts policy, in the code path of ``langconvert vocab`` (tokenizer.json or a
SentencePiece .model alone). And the check fails when a token it needs is missing."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from tokenizers import Tokenizer

from converter.languages import language_scripts
from converter.recipe import VocabConfig
from converter.vocab import trim_tokenizer
from converter.vocab.probe import (
    CONTEXTS,
    probe_strings,
    script_check,
    script_code_points,
    tokenizers_encoder,
)
from converter.vocab.rebuild import rebuild_tokenizer_json
from tests.conftest import TOKENIZERS, require_shared

NAMES = ["gemma3", "qwen2.5", "llama3", "gpt2", "llama2", "xlm-roberta", "bert-wordpiece", "mistral-sentencepiece"]
LANGS = ["ko", "uk", "en", "zh"]


def test_code_points_come_from_the_unicode_tables():
    hangul = script_code_points("Hangul")
    assert all(chr(c) in hangul for c in range(0xAC00, 0xD7A4))  # the 11,172 syllables
    assert all(chr(c) in hangul for c in range(0x3131, 0x318F))  # compatibility jamo
    assert "\u4e00" not in hangul and "A" not in script_code_points("Cyrillic")
    assert len(script_code_points("Han")) > 90_000 and "\u3400" in script_code_points("Han")
    texts = probe_strings("Cyrillic")
    n = len(script_code_points("Cyrillic"))
    assert len(texts) == len(CONTEXTS) * n and texts[n] == " " + texts[0] and len(texts[2 * n]) == 3


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("name", NAMES)
def test_every_code_point_of_the_script_tokenizes_as_before(name, lang, tmp_path):
    require_shared()
    scripts = language_scripts(lang)
    result = trim_tokenizer(TOKENIZERS / name, Counter(), scripts, VocabConfig(), out_dir=tmp_path / "tok")
    check = result.stats.script_check
    assert check is not None and set(check["scripts"]) == set(scripts)
    for s, entry in check["scripts"].items():
        assert entry["code_points"] == len(script_code_points(s))
        assert entry["strings"] == len(CONTEXTS) * entry["code_points"]
    assert check["passed"] and check["differ"] == 0, {s: v["examples"] for s, v in check["scripts"].items()}
    assert len(result.token_map) < result.stats.vocab_before
    if result.tokenizer_json is not None:  # the checked tokenizer is the one written
        written = json.loads((tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8"))
        assert written == result.tokenizer_json


@pytest.mark.parametrize("name", ["qwen2.5", "gemma3"])
def test_the_check_fails_when_a_needed_token_is_dropped(name):
    """Drop one kept Hangul token that some code point needs: the check names strings that now differ."""
    require_shared()
    tj = json.loads((TOKENIZERS / name / "tokenizer.json").read_text(encoding="utf-8"))
    original = Tokenizer.from_str(json.dumps(tj))
    result = trim_tokenizer(TOKENIZERS / name, Counter(), ["Hangul"], VocabConfig())
    victim_old = original.encode("궚", add_special_tokens=False).ids[-1]
    kept = [i for i in result.token_map if i != victim_old]
    new_tj, token_map = rebuild_tokenizer_json(tj, kept)
    broken = Tokenizer.from_str(json.dumps(new_tj))
    check = script_check(tokenizers_encoder(original), tokenizers_encoder(broken), token_map, ["Hangul"])
    assert not check["passed"] and check["differ"] >= 1 and check["scripts"]["Hangul"]["examples"]
