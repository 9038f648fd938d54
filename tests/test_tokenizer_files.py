"""Tokenizer directories as users download them: configs written by transformers 5 (``TokenizersBackend``,
``backend: tokenizers``, list-valued ``extra_special_tokens``), a tokenizer.json alone in folders with neutral
names, a SentencePiece .model alone. Each loads, trims through ``langconvert vocab`` and reloads with plain
transformers, and the recipe path (``model.tokenizer``) loads the same tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import regex
from click.testing import CliRunner
from transformers import AutoTokenizer

from converter.cli import main
from converter.load import load_tokenizer, portable_tokenizer_config
from tests.conftest import CORPORA, TOKENIZERS, require_shared

KO = CORPORA / "ntrex128" / "newstest2019-ref.kor.txt"
KO_LINES = [line for line in KO.read_text(encoding="utf-8").splitlines() if line.strip()][-200:] if KO.is_file() else []
# Held-out lines written only in Hangul (and digits/punctuation): what a Korean-only trim guarantees.
PURE_KO = [line for line in KO_LINES if not regex.search(r"(?=\p{L})\P{Script=Hangul}", line)]


def _v5_backend_dir(dest: Path) -> Path:
    """Qwen2.5's tokenizer.json with the tokenizer_config.json transformers 5 writes for a generic tokenizer."""
    dest.mkdir(parents=True)
    shutil.copy(TOKENIZERS / "qwen2.5" / "tokenizer.json", dest / "tokenizer.json")
    shutil.copy(TOKENIZERS / "qwen2.5" / "chat_template.jinja", dest / "chat_template.jinja")
    cfg = {
        "backend": "tokenizers",
        "tokenizer_class": "TokenizersBackend",
        "is_local": True,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 32768,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def _vocab(src: Path, out: Path):
    return CliRunner().invoke(main, ["vocab", str(src), "--languages", "ko", "--corpus", str(KO), "--out", str(out)])


def test_portable_config_rules():
    v5 = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<a>"]}
    assert portable_tokenizer_config(v5) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": ["<a>"],
    }
    known = {"tokenizer_class": "GemmaTokenizer", "backend": "tokenizers", "bos_token": "<bos>"}
    assert portable_tokenizer_config(known) == {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>"}
    assert portable_tokenizer_config({})["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "tokenizer_class" not in portable_tokenizer_config({}, has_model_config=True)  # config.json decides


def test_transformers5_backend_config_loads_trims_and_reloads(tmp_path):
    require_shared()
    src = _v5_backend_dir(tmp_path / "tok")
    with pytest.raises(ValueError, match="TokenizersBackend"):  # what a user of plain transformers 4.57 gets
        AutoTokenizer.from_pretrained(src)
    tok = load_tokenizer(src)
    assert len(tok) == 151_665 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in tok.additional_special_tokens and tok.chat_template
    result = _vocab(src, tmp_path / "x" / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "x" / "out"
    trimmed = AutoTokenizer.from_pretrained(out)  # plain transformers, neutral folder name
    stats = json.loads((out / "stats.json").read_text())
    assert len(trimmed) == stats["vocab_after"] < 20_000 and stats["script_check"]["passed"]
    assert trimmed.eos_token == "<|im_end|>" and trimmed.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in trimmed.additional_special_tokens and trimmed.chat_template == tok.chat_template
    conv = [{"role": "user", "content": KO_LINES[0]}]
    tm = json.loads((out / "token_map.json").read_text())["new_to_old"]
    want = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
    got = trimmed.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
    assert [tm[i] for i in got] == want
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in cfg


@pytest.mark.parametrize("name", ["llama3", "gpt2", "bert-wordpiece"])
def test_tokenizer_json_alone_in_neutral_folders(name, tmp_path):
    require_shared()
    src = tmp_path / "tok"
    src.mkdir()
    shutil.copy(TOKENIZERS / name / "tokenizer.json", src / "tokenizer.json")
    with pytest.raises(ValueError, match="Unrecognized model"):  # the folder-name guess plain 4.57 makes
        AutoTokenizer.from_pretrained(src)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok = load_tokenizer(src)
    assert len(tok) == raw.get_vocab_size(with_added_tokens=True)
    assert tok(KO_LINES[:5])["input_ids"] == [e.ids for e in raw.encode_batch(KO_LINES[:5])]
    out = tmp_path / "x"
    result = _vocab(src, out)
    assert result.exit_code == 0, result.output
    trimmed = AutoTokenizer.from_pretrained(out)
    tm = json.loads((out / "token_map.json").read_text())["new_to_old"]
    assert len(trimmed) == len(tm)
    assert len(PURE_KO) >= 20
    for line in PURE_KO:
        assert [tm[i] for i in trimmed(line)["input_ids"]] == tok(line)["input_ids"]


def test_tokenizer_json_beside_a_model_config_without_tokenizer_config(tmp_path):
    """A checkpoint directory with config.json and tokenizer.json but no tokenizer_config.json (what a user who
    copies just those two files has) loads, whatever the folder is called."""
    require_shared()
    from tokenizers import Tokenizer

    ckpt = tmp_path / "x"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    shutil.copy(TOKENIZERS / "llama3" / "tokenizer.json", ckpt / "tokenizer.json")
    raw = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok = load_tokenizer(ckpt)
    assert len(tok) == raw.get_vocab_size(with_added_tokens=True)
    assert tok(KO_LINES[:5])["input_ids"] == [e.ids for e in raw.encode_batch(KO_LINES[:5])]


def test_sentencepiece_model_alone_reloads_with_transformers(tmp_path):
    require_shared()
    from transformers import LlamaTokenizer

    src = tmp_path / "tok"
    src.mkdir()
    shutil.copy(TOKENIZERS / "mistral-sentencepiece" / "tokenizer.model", src / "tokenizer.model")
    result = _vocab(src, tmp_path / "x")
    assert result.exit_code == 0, result.output
    tm = json.loads((tmp_path / "x" / "token_map.json").read_text())["new_to_old"]
    before = LlamaTokenizer(vocab_file=str(src / "tokenizer.model"), legacy=False)
    after = LlamaTokenizer(vocab_file=str(tmp_path / "x" / "tokenizer.model"), legacy=False)
    assert len(after) == len(tm) < len(before)
    for line in PURE_KO:
        assert [tm[i] for i in after(line)["input_ids"]] == before(line)["input_ids"]


def test_recipe_tokenizer_with_a_transformers5_config(tmp_path):
    """model.tokenizer pointing at a TokenizersBackend directory: the load stage gets the full tokenizer."""
    require_shared()
    from converter.load import load_model
    from converter.recipe import ModelSpec
    from tests.conftest import tiny_model

    ckpt = tmp_path / "ckpt"
    tiny_model("qwen2", vocab_size=151_665).save_pretrained(ckpt)
    src = _v5_backend_dir(tmp_path / "tok")
    loaded = load_model(ModelSpec(source=str(ckpt), tokenizer=str(src)))
    assert len(loaded.tokenizer) == 151_665 and loaded.tokenizer.eos_token == "<|im_end|>"
    assert loaded.tokenizer.chat_template and loaded.original_tokenizer is loaded.tokenizer  # until trim_vocab


def test_a_directory_without_a_tokenizer_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _vocab(tmp_path / "empty", tmp_path / "out")
    assert result.exit_code == 2 and "no tokenizer.json or SentencePiece .model" in result.output


def test_a_staged_load_keeps_pointing_at_the_directorys_sentencepiece_file(tmp_path):
    """A transformers-5 config beside tokenizer.model: loading goes through a staging copy, and the tokenizer
    still names the directory's own tokenizer.model (which trimming rewrites), not the vanished copy."""
    require_shared()
    src = tmp_path / "tok"
    src.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "llama2" / f, src / f)
    assert json.loads((src / "tokenizer_config.json").read_text())["backend"] == "tokenizers"  # staged
    shutil.copy(TOKENIZERS / "mistral-sentencepiece" / "tokenizer.model", src / "tokenizer.model")
    tok = load_tokenizer(src)
    assert tok.vocab_file == str(src / "tokenizer.model") and len(tok) == 32_000
