"""The vocabulary-trimming guarantees on every real tokenizer.json in ../shared, for Korean+English and Ukrainian.

Each (tokenizer, target) pair is trimmed once through ``trim_tokenizer`` (the code path of ``langconvert vocab``)
with counts from the first N_COUNT NTREX lines of the target languages, then checked on the held-out lines:
identical tokens for target-script text, exact round-trip of all twelve languages, no unreachable kept token,
equal logits at the kept ids on a tiny model of that vocabulary, llama.cpp's expected ids, and the chat template.
The raw SentencePiece ``.model`` (Mistral) is covered in test_vocab_spm.py.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import regex
import torch
from tokenizers import Tokenizer

from converter.arch import Arch
from converter.languages import language_scripts
from converter.recipe import VocabConfig
from converter.vocab import TrimmedTokenizer, trim_tokenizer
from converter.vocab.select import bytes_to_unicode
from converter.vocab.slice import slice_model
from tests.conftest import NTREX_FILES, TOKENIZERS, ntrex_lines, require_shared, tiny_model

LANG_FILES = NTREX_FILES
N_COUNT = 1700  # first lines give the counts, the rest (297 lines) is held out
TOKENIZER_NAMES = ["gemma3", "qwen2.5", "llama3", "gpt2", "llama2", "xlm-roberta", "bert-wordpiece"]
TARGETS = {"ko+en": ("ko", "en"), "uk": ("uk",)}
CASES = [(n, t) for n in TOKENIZER_NAMES for t in TARGETS]


_lines = ntrex_lines


def _other_script_letter(scripts: list[str]) -> regex.Pattern:
    """Matches a letter outside the target scripts."""
    return regex.compile(r"(?=\p{L})(?!" + "|".join(rf"\p{{Script={s}}}" for s in scripts) + ")")


@dataclass
class Case:
    name: str
    targets: tuple[str, ...]
    scripts: list[str]
    original: Tokenizer
    trimmed: Tokenizer
    result: TrimmedTokenizer
    out_dir: Path

    def mapped(self, ids: list[int]) -> list[int]:
        return [self.result.token_map[i] for i in ids]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{t}" for n, t in CASES])
def case(request, tmp_path_factory) -> Case:
    name, target = request.param
    return _trim(name, TARGETS[target], tmp_path_factory.mktemp(f"{name}-{target}") / "tok")


def _trim(name: str, targets: tuple[str, ...], out: Path) -> Case:
    """Trim the shared tokenizer ``name`` for ``targets`` into ``out`` (counts: first N_COUNT lines)."""
    require_shared()
    original = Tokenizer.from_file(str(TOKENIZERS / name / "tokenizer.json"))
    counts = Counter(
        i
        for lang in targets
        for enc in original.encode_batch(_lines(lang)[:N_COUNT], add_special_tokens=False)
        for i in enc.ids
    )
    scripts = [s for lang in targets for s in language_scripts(lang)]
    result = trim_tokenizer(TOKENIZERS / name, counts, scripts, VocabConfig(), out_dir=out)
    trimmed = Tokenizer.from_file(str(out / "tokenizer.json"))
    return Case(name, targets, scripts, original, trimmed, result, out)


def test_trimming_shrinks_and_writes_a_consistent_directory(case):
    r = case.result
    assert r.stats.vocab_after == len(r.token_map) == case.trimmed.get_vocab_size(with_added_tokens=True)
    # Keeping all of Latin keeps most of an English-centric vocabulary; Ukrainian alone keeps a small part.
    limit = 0.5 if case.targets == ("uk",) else 1.0
    assert r.stats.vocab_after < limit * r.stats.vocab_before, r.stats.summary()
    assert r.token_map == sorted(set(r.token_map))
    saved = json.loads((case.out_dir / "token_map.json").read_text())
    assert saved["new_to_old"] == r.token_map and saved["vocab_before"] == case.original.get_vocab_size()
    # Every kept token keeps its spelling: new id i is old id token_map[i].
    for new_id in range(0, len(r.token_map), 97):
        assert case.trimmed.id_to_token(new_id) == case.original.id_to_token(r.token_map[new_id])


def test_target_script_text_tokenizes_identically(case):
    other = _other_script_letter(case.scripts)
    pure = total = 0
    for lang in case.targets:
        held = _lines(lang)[N_COUNT:]
        want = case.original.encode_batch(held)  # with the post-processor's special tokens
        got = case.trimmed.encode_batch(held)
        differ = []
        for s, w, g in zip(held, want, got, strict=True):
            same = case.mapped(g.ids) == w.ids and g.tokens == w.tokens
            total += 1
            if not other.search(s):
                pure += 1
                assert same, f"{case.name}: held-out {lang} line in the target scripts differs: {s[:80]!r}"
            elif not same:
                differ.append(s)
        # Lines that quote a word in another script (Latin names in Ukrainian news) may split differently; they
        # are few and still round-trip.
        assert len(differ) <= 0.1 * len(held), f"{case.name}: {len(differ)} held-out {lang} lines differ"
    assert pure >= 250, f"only {pure} held-out lines are written purely in {case.scripts}"


def test_text_in_all_twelve_languages_round_trips(case):
    for lang in LANG_FILES:
        held = _lines(lang)[N_COUNT : N_COUNT + 80]
        want = case.original.decode_batch([e.ids for e in case.original.encode_batch(held)])
        got = case.trimmed.decode_batch([e.ids for e in case.trimmed.encode_batch(held)])
        bad = [(s, w, g) for s, w, g in zip(held, want, got, strict=True) if w != g]
        assert not bad, f"{case.name}: {lang} does not round-trip: {bad[0]}"


_BYTE_SYMBOLS = set(bytes_to_unicode().values())


def _unreachable_kept(case: Case) -> list[str]:
    """Kept model tokens the trimmed tokenizer can never emit, checked on the trimmed tokenizer.json itself."""
    tj = json.loads((case.out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    added = {a["content"] for a in tj["added_tokens"]}
    bad: list[str] = []
    if model["type"] == "BPE":
        vocab = model["vocab"]
        produced = set()
        for m in model["merges"]:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            assert a in vocab and b in vocab, f"merge {a!r} + {b!r} has a dropped part"
            produced.add(a + b)
        for tok in vocab:
            base = len(tok) == 1 or regex.fullmatch(r"<0x[0-9A-F]{2}>", tok) or tok in _BYTE_SYMBOLS
            if tok in added or base or tok in produced:
                continue
            # With ignore_merges a pre-token found whole in the vocab is emitted as is: reachable if the
            # pre-tokenizer keeps it whole.
            if model.get("ignore_merges"):
                text = case.trimmed.decode([vocab[tok]])
                pieces = case.trimmed.pre_tokenizer.pre_tokenize_str(text)
                if len(pieces) == 1:
                    continue
            bad.append(tok)
    elif model["type"] == "Unigram":
        for piece, _ in model["vocab"]:
            if piece in added:
                continue
            toks = case.trimmed.model.tokenize(piece)
            if [t.value for t in toks] != [piece]:
                bad.append(piece)
    else:  # WordPiece: greedy longest match from the left
        vocab = model["vocab"]
        prefix = model["continuing_subword_prefix"]
        starts = {t[0] for t in vocab if not t.startswith(prefix) and len(t) > 1}
        lead = next(t for t in vocab if len(t) == 1 and t.isalpha() and t not in starts)
        for tok in vocab:
            if tok in added:
                continue
            word = lead + tok[len(prefix) :] if tok.startswith(prefix) and len(tok) > len(prefix) else tok
            want = [lead, tok] if word != tok else [tok]
            text = case.trimmed.normalizer.normalize_str(word)
            words = [w for w, _ in case.trimmed.pre_tokenizer.pre_tokenize_str(text)]
            if words != [word] or [t.value for t in case.trimmed.model.tokenize(word)] != want:
                bad.append(tok)
    return bad


def test_no_kept_token_is_unreachable(case):
    bad = _unreachable_kept(case)
    assert not bad, f"{case.name}: {len(bad)} kept tokens can never be emitted, e.g. {bad[:5]}"


def test_logits_equal_at_kept_ids_on_a_tiny_model_of_this_vocabulary(case):
    n = case.original.get_vocab_size(with_added_tokens=True)
    padded = case.name == "qwen2.5"  # Qwen models carry 151,936 rows for 151,665 tokens
    tie = case.name in ("gemma3", "llama2", "xlm-roberta")
    rows = 151_936 if padded else n
    model = tiny_model("gemma3_text" if tie else "qwen2", vocab_size=rows, tie=tie, seed=3)
    for cfg in (model.config, model.generation_config):  # the tiny config's ids are not this tokenizer's
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    text = _lines(case.targets[0])[N_COUNT]
    ids = case.original.encode(text).ids
    new_ids = case.trimmed.encode(text).ids
    assert case.mapped(new_ids) == ids
    with torch.no_grad():
        before = model(torch.tensor([ids])).logits[..., case.result.token_map]
    stats = slice_model(model, Arch.of(model), case.result.token_map)
    assert (stats.rows_before, stats.rows_after) == (rows, len(case.result.token_map))
    with torch.no_grad():
        after = model(torch.tensor([new_ids])).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's expected token ids

VECTORS = TOKENIZERS / "test-vectors"
VECTOR_FILES = {
    "qwen2.5": "ggml-vocab-qwen2.gguf",
    "llama3": "ggml-vocab-llama-bpe.gguf",
    "gpt2": "ggml-vocab-gpt-2.gguf",
    "llama2": "ggml-vocab-llama-spm.gguf",
    "bert-wordpiece": "ggml-vocab-bert-bge.gguf",
}


def _vectors(stem: str) -> list[tuple[str, list[int]]]:
    texts = (VECTORS / f"{stem}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = (VECTORS / f"{stem}.out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs) if o.strip() or not t]


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", list(VECTOR_FILES))
def test_llama_cpp_vectors_still_encode_exactly(name, target, tmp_path):
    """Strings on which the original tokenizer gives llama.cpp's expected ids: the trimmed tokenizer gives the
    same ids (through token_map) for every such string written in the target scripts, and every string
    round-trips."""
    c = _trim(name, TARGETS[target], tmp_path / "tok")
    original, trimmed, result = c.original, c.trimmed, c.result
    other = _other_script_letter(c.scripts)
    vectors = _vectors(VECTOR_FILES[name])
    agree = checked = 0
    for text, expected in vectors:
        got_orig = original.encode(text, add_special_tokens=False).ids
        new = trimmed.encode(text, add_special_tokens=False).ids
        assert trimmed.decode(new) == original.decode(got_orig), f"{name}: {text!r} does not round-trip"
        if got_orig != expected:
            continue  # the original tokenizer itself disagrees with llama.cpp here (reported by the count below)
        agree += 1
        if not other.search(text):
            checked += 1
            assert [result.token_map[i] for i in new] == expected, f"{name}: {text!r}"
    # llama2's tokenizer.json was rebuilt from a vocabulary file and differs from llama.cpp on some
    # leading-space edge cases (see ../shared/data/README.md): 32 of 47 agree.
    assert agree >= 0.65 * len(vectors), (
        f"{name}: the original matches llama.cpp on only {agree}/{len(vectors)}"
    )
    assert checked >= 10


# ---------------------------------------------------------------------------------------------------------------
# Chat template (Qwen2.5 ships one)


@pytest.mark.parametrize("target", list(TARGETS))
def test_chat_template_renders_and_tokenizes_the_same(target, tmp_path):
    require_shared()
    from transformers import AutoTokenizer

    targets = TARGETS[target]
    original = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2.5")
    counts = Counter(
        i
        for lang in targets
        for ids in original(_lines(lang)[:N_COUNT], add_special_tokens=False)["input_ids"]
        for i in ids
    )
    scripts = [s for lang in targets for s in language_scripts(lang)]
    # English keeps only its corpus tokens here, so the template's own words ('system', 'user', 'assistant',
    # 'You are Qwen, ...') must come from the chat_template policy.
    result = trim_tokenizer(
        TOKENIZERS / "qwen2.5",
        counts,
        scripts if target == "uk" else ["Hangul"],
        VocabConfig(),
        out_dir=tmp_path / "t",
    )
    assert result.stats.policies["chat_template"] > 10
    trimmed = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert trimmed.chat_template == original.chat_template
    other = _other_script_letter(scripts if target == "uk" else ["Hangul"])
    lines = [s for s in _lines(targets[0])[N_COUNT:] if not other.search(s)]
    conversations = [
        [{"role": "user", "content": lines[0]}, {"role": "assistant", "content": lines[1]}],
        [
            {"role": "system", "content": lines[2]},
            {"role": "user", "content": lines[3]},
            {"role": "assistant", "content": lines[4]},
            {"role": "user", "content": lines[5]},
        ],
        [{"role": "user", "content": lines[6]}],  # no system message: the template writes its default one
    ]
    for conv in conversations:
        for gen in (False, True):
            text_o = original.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            text_t = trimmed.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert text_t == text_o
            ids_o = original.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            ids_t = trimmed.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            if isinstance(ids_o, dict) or hasattr(ids_o, "keys"):
                ids_o, ids_t = ids_o["input_ids"], ids_t["input_ids"]
            assert [result.token_map[i] for i in ids_t] == ids_o
