"""Vocabulary trimming: hand-worked BPE selection/closure/rebuild, slicing, and parity on real tokenizers."""

from __future__ import annotations

import copy
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

from converter.arch import Arch
from converter.calibrate import CalibrationResult, LanguageData
from converter.errors import ModelError, RecipeError
from converter.languages import ScriptMatcher, language_scripts, script_name, token_scripts
from converter.load import LoadedModel
from converter.recipe import VocabConfig
from converter.vocab import VocabResult, trim_tokenizer, trim_tokenizer_json, trim_vocab
from converter.vocab.rebuild import rebuild_tokenizer_config, rebuild_tokenizer_json
from converter.vocab.select import bytes_to_unicode, classify_token, merge_closure, parse_bpe, select_ids
from converter.vocab.slice import gather_rows, slice_model
from tests.conftest import NTREX_FILES, TOKENIZERS, ntrex_lines, require_shared, tiny_model

LANG_FILES = NTREX_FILES
N_COUNT = 1700  # first lines give the counts, the rest is held out


# ---------------------------------------------------------------------------------------------------------------
# Hand-worked tiny BPE


def _tiny_tj(pair_merges: bool = False) -> dict:
    """A whitespace-split BPE with a template post-processor. Merge ranks: a+b, ab+c, b+c, c+d, x+y."""
    vocab = {"<unk>": 0, "<s>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "ab": 6, "abc": 7, "bc": 8, "cd": 9}
    vocab.update({"x": 10, "y": 11, "xy": 12})
    merges = [("a", "b"), ("ab", "c"), ("b", "c"), ("c", "d"), ("x", "y")]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for t, i in (("<unk>", 0), ("<s>", 1))
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges] if pair_merges else [f"{a} {b}" for a, b in merges],
        },
    }


def test_closure_adds_both_parts_transitively():
    # merges as (left, right, result) ids: a+b->ab, ab+c->abc, b+c->bc, c+d->cd
    merges = [(2, 3, 6), (6, 4, 7), (3, 4, 8), (4, 5, 9)]
    kept = {7}
    added = merge_closure(kept, merges)
    assert added == {6, 4, 2, 3}
    assert kept == {2, 3, 4, 6, 7}
    kept = {8, 9}
    assert merge_closure(kept, merges) == {3, 4, 5}


@pytest.mark.parametrize("pair_merges", [False, True])
def test_select_and_rebuild_hand_worked(pair_merges):
    tj = _tiny_tj(pair_merges)
    sel = select_ids(tj, [Counter({7: 3, 12: 1}), Counter({9: 1})], min_count=2)
    # corpus keeps abc (count 3); xy (1) and cd (1) fall below min_count; always: <unk>, <s>; closure: ab, a, b, c
    expected = {"corpus": 1, "scripts": 0, "script_probe": 0, "ranked": 0, "top_words": 0, "neutral": 0, "keep_tokens": 0,
                "chat_template": 0, "always": 2}
    assert sel.policies == sel.only == expected
    assert sel.closure_added == 4
    assert sel.kept == [0, 1, 2, 3, 4, 6, 7]
    assert (sel.merges_before, sel.merges_after) == (5, 2)

    new, token_map = rebuild_tokenizer_json(tj, sel.kept)
    assert token_map == [0, 1, 2, 3, 4, 6, 7]
    assert new["model"]["vocab"] == {"<unk>": 0, "<s>": 1, "a": 2, "b": 3, "c": 4, "ab": 5, "abc": 6}
    expected_merges = [["a", "b"], ["ab", "c"]] if pair_merges else ["a b", "ab c"]
    assert new["model"]["merges"] == expected_merges
    assert [a["id"] for a in new["added_tokens"]] == [0, 1]
    assert new["post_processor"]["special_tokens"]["<s>"]["ids"] == [1]
    assert list(new) == list(tj)  # same key order, everything else untouched
    assert new["pre_tokenizer"] == tj["pre_tokenizer"] and new["model"]["unk_token"] == "<unk>"

    old, trimmed = Tokenizer.from_str(json.dumps(tj)), Tokenizer.from_str(json.dumps(new))
    enc = trimmed.encode("abc ab cab")
    assert [token_map[i] for i in enc.ids] == old.encode("abc ab cab").ids
    assert enc.tokens == ["<s>", "abc", "ab", "c", "ab"]
    assert trimmed.encode("bc").tokens == ["<s>", "b", "c"]  # b+c was dropped with bc
    assert trimmed.encode("xd").tokens == ["<s>", "<unk>", "<unk>"]


def test_ranked_policy_keeps_the_tokenizers_best_ranked_script_tokens():
    tj = _tiny_tj()
    # ranks: the base symbols a b c d x y need no merge (first), then ab (merge 0), abc (1), bc (2), cd (3), xy (4)
    sel = select_ids(tj, Counter(), ranked=[(["Latin"], 7)])
    assert sel.policies["ranked"] == 7 and sel.kept == [0, 1, 2, 3, 4, 5, 6, 10, 11]
    sel = select_ids(tj, Counter(), ranked=[(["Latin"], 9)])
    assert sel.kept == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]  # + abc, bc
    assert select_ids(tj, Counter(), ranked=[(["Hangul"], 9)]).policies["ranked"] == 0


def test_ranked_policy_on_gpt2_keeps_common_english_words():
    require_shared()
    tok = Tokenizer.from_file(str(TOKENIZERS / "gpt2" / "tokenizer.json"))
    tj = json.loads(tok.to_str())
    sel = select_ids(tj, Counter(), ranked=[(["Latin"], 5000)])
    assert sel.policies["ranked"] == 5000
    vocab = tok.get_vocab()
    kept = set(sel.kept)
    for word in ("Ġthe", "Ġand", "Ġgovernment", "Ġpeople"):
        assert vocab[word] in kept, word
    # the rare ones go: GPT-2's last merges are not kept
    from converter.vocab.select import parse_bpe

    last = [r for _, _, r in parse_bpe(tj).merges[-200:]]
    assert not kept & set(last)


def test_top_words_keeps_the_tokens_of_frequent_words_and_caps_rarest_first():
    require_shared()
    from converter.vocab.probe import tokenizers_encoder
    from converter.vocab.words import spellings, word_ids

    tok = Tokenizer.from_file(str(TOKENIZERS / "gpt2" / "tokenizer.json"))
    vocab = tok.get_vocab()
    ids = word_ids(tokenizers_encoder(tok), "en", 5000)
    pos = {i: k for k, i in enumerate(ids)}
    for t in ("Ġthe", "The", "Ġgovernment", "ĠGovernment", "Ġpeople"):
        assert t in {tok.id_to_token(i) for i in ids}, t
    assert pos[vocab["Ġthe"]] < pos[vocab["Ġgovernment"]]  # ranked by word frequency
    assert [t for t, _ in spellings("seoul")] == [" seoul", " Seoul", "Seoul"]
    # letter runs: an elongated word and Roman numerals keep their run tokens ('OOOOOOOO', 'OO', 'ĠIII')
    for text in ("NOOOOOOOOOO", " III", " sooooo"):
        assert set(tok.encode(text).ids) <= set(ids), text
    # ... weighted as the list's 1,000th word, so a cap drops them after the rarest words' tokens
    from converter.vocab.words import letter_runs

    assert letter_runs(["한국어", "中文"]) == [] and len(letter_runs(["ab"])) == 4 * 15 * 2
    assert max(pos[vocab[t]] for t in ("OOOOOOOO", "ĠIII", "oooo")) < len(ids) - 500
    tj = json.loads(tok.to_str())
    full = select_ids(tj, Counter(), words=ids)
    assert full.policies["top_words"] == len(set(ids)) and set(ids) <= set(full.kept)
    capped = select_ids(tj, Counter(), words=ids, max_size=3000)
    kept = set(capped.kept)
    assert len(kept) == 3000 and vocab["Ġthe"] in kept and capped.cap_dropped > 0
    assert not {i for i in ids[-500:]} <= kept  # the rarest words' tokens went first


def test_top_words_needs_a_word_list_for_the_language(tmp_path):
    from pydantic import ValidationError

    from converter.recipe import LanguageSpec

    assert LanguageSpec(code="en", sources=["x"], top_words=10).top_words == 10
    with pytest.raises(ValidationError, match="wordfreq package has no word list for language 'th'"):
        LanguageSpec(code="th", sources=["x"], top_words=10)


def test_drop_reserved_leaves_out_placeholders_only():
    require_shared()
    tj = json.loads((TOKENIZERS / "gemma3" / "tokenizer.json").read_text(encoding="utf-8"))
    keep = select_ids(tj, Counter(), ["Hangul"])
    drop = select_ids(tj, Counter(), ["Hangul"], drop_reserved=True, extra_ids=[7])
    vocab = {a["content"]: a["id"] for a in tj["added_tokens"]}
    assert len(keep.kept) - len(drop.kept) == 6242 - 1  # every <unusedN> but the one the config names
    kept = set(drop.kept)
    assert vocab["<unused0>"] not in kept and 7 in kept
    for t in ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>", "<mask>"):
        assert vocab[t] in kept, t
    new, token_map = rebuild_tokenizer_json(tj, drop.kept)
    trimmed = Tokenizer.from_str(json.dumps(new))
    text = "<start_of_turn>\n안녕하세요, 반갑습니다!<end_of_turn>"
    want = Tokenizer.from_str(json.dumps(tj)).encode(text).ids
    assert [token_map[i] for i in trimmed.encode(text).ids] == want


def test_coverage_keeps_the_most_frequent_corpus_tokens():
    tj = _tiny_tj()
    counts = Counter({7: 6, 12: 3, 9: 1})  # abc, xy, cd: 10 occurrences
    sel = select_ids(tj, counts, coverage=0.6)  # abc alone covers 6/10
    assert sel.policies["corpus"] == 1 and sel.kept == [0, 1, 2, 3, 4, 6, 7]
    assert sel.corpus_coverage == 0.6
    sel = select_ids(tj, counts, coverage=0.9)  # abc + xy cover 9/10
    assert sel.kept == [0, 1, 2, 3, 4, 6, 7, 10, 11, 12] and sel.corpus_coverage == 0.9
    sel = select_ids(tj, counts, coverage=1.0)
    assert 9 in sel.kept and sel.corpus_coverage == 1.0


def test_max_size_fills_by_priority_and_keeps_closure():
    tj = _tiny_tj()
    counts = Counter({7: 6, 12: 3, 9: 1})
    # always {<unk>, <s>}; abc brings ab, a, b, c (7 ids); xy needs x, y too (10 > 9: left out); cd needs d (9).
    sel = select_ids(tj, counts, max_size=9)
    assert sel.kept == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert sel.cap_dropped == 1 and sel.policies["corpus"] == 2 and sel.closure_added == 5
    new, token_map = rebuild_tokenizer_json(tj, sel.kept)
    old, trimmed = Tokenizer.from_str(json.dumps(tj)), Tokenizer.from_str(json.dumps(new))
    assert [token_map[i] for i in trimmed.encode("abc cd").ids] == old.encode("abc cd").ids
    assert select_ids(tj, counts, max_size=100).cap_dropped == 0
    with pytest.raises(RecipeError, match="max_size 1 is smaller than the 2 tokens"):
        select_ids(tj, counts, max_size=1)
    # A must-keep token brings its whole derivation (abc <- ab + c <- a + b) even when the cap binds.
    sel = select_ids(tj, counts, max_size=9, keep_tokens=["abc", "cd"])
    assert sel.kept == [0, 1, 2, 3, 4, 5, 6, 7, 9] and sel.cap_dropped == 1
    with pytest.raises(RecipeError, match="max_size 8 is smaller than the 9 tokens"):
        select_ids(tj, counts, max_size=8, keep_tokens=["abc", "cd"])


def test_post_processor_ids_follow_the_new_numbering():
    tj = _tiny_tj()
    tj["added_tokens"].append(
        {
            "id": 13,
            "content": "</s>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    tj["post_processor"]["special_tokens"]["</s>"] = {"id": "</s>", "ids": [13], "tokens": ["</s>"]}
    sel = select_ids(tj, Counter({12: 1}))
    new, token_map = rebuild_tokenizer_json(tj, sel.kept)
    assert token_map == [0, 1, 10, 11, 12, 13]
    assert new["post_processor"]["special_tokens"]["</s>"]["ids"] == [5]
    assert new["added_tokens"][-1]["id"] == 5
    cfg = {"added_tokens_decoder": {"0": {"content": "<unk>"}, "13": {"content": "</s>"}}, "bos_token": "<s>"}
    assert rebuild_tokenizer_config(cfg, token_map)["added_tokens_decoder"] == {
        "0": {"content": "<unk>"},
        "5": {"content": "</s>"},
    }
    with pytest.raises(ModelError, match="does not keep"):
        rebuild_tokenizer_json(tj, [0, 10, 11, 12, 13])  # <s> dropped although the template needs it


def test_keep_tokens_and_extra_ids():
    tj = _tiny_tj()
    sel = select_ids(tj, Counter(), keep_tokens=["cd"], extra_ids=[12])
    assert sel.policies["keep_tokens"] == 1
    assert sel.kept == [0, 1, 4, 5, 9, 10, 11, 12]
    with pytest.raises(RecipeError, match="keep_tokens"):
        select_ids(tj, Counter(), keep_tokens=["zz"])
    with pytest.raises(ModelError, match="99"):
        select_ids(tj, Counter(), extra_ids=[99])


def test_scripts_policy_on_sentencepiece_vocab():
    tj = _tiny_tj()
    extra = ["한", "국", "▁한국", "▁the", "12", "?!", "Ж", "한a", "▁Жa"]
    base = len(tj["model"]["vocab"])
    for k, t in enumerate(extra):
        tj["model"]["vocab"][t] = base + k
    # ▁ + 한국 makes ▁한국 reachable; the other multi-character additions are made by no merge
    tj["model"]["merges"].append("▁ 한국")
    tj["model"]["vocab"]["▁"] = base + len(extra)
    tj["model"]["vocab"]["한국"] = base + len(extra) + 1
    tj["model"]["merges"].append("한 국")
    v = parse_bpe(tj)
    got = {t for t, i in v.vocab.items() if i in set(select_ids(tj, Counter(), ["Hangul"]).kept)}
    # Hangul letters; ▁ is a space (neutral); "12", "?!", "한a" are unreachable (no merge makes them) so dropped.
    assert got == {"<unk>", "<s>", "한", "국", "한국", "▁한국", "▁"}


def test_classify_byte_level_fragments():
    require_shared()
    tj = json.loads((TOKENIZERS / "gpt2" / "tokenizer.json").read_text())
    view = parse_bpe(tj)
    hangul = ScriptMatcher(["Hangul"])
    assert view.byte_level and len(view.byte_ids) == 256
    assert classify_token(view, "ĠìĪ", hangul) == "script"  # ' ' + the first 2 bytes of U+C200..U+C23F
    assert classify_token(view, "«ìŀĲ", hangul) == "script"  # orphan tail byte + '자'
    assert classify_token(view, "ĠÐŀ", hangul) is None  # ' О' (Cyrillic)
    assert classify_token(view, "?!", hangul) == "neutral"
    assert classify_token(view, "«", hangul) is None
    # Only continuation bytes: b'\x8c\x93' ends 쌓 (U+C313) after the lead-byte token b'\xec'.
    tail = "".join(bytes_to_unicode()[b] for b in b"\x8c\x93")
    assert classify_token(view, tail, hangul) == "script"
    assert classify_token(view, tail, ScriptMatcher(["Cyrillic"])) is None  # no Cyrillic letter ends so


def test_languages_and_scripts():
    assert language_scripts("ko") == ["Hangul"]  # Han is opt-in for Korean via vocab.extra_scripts
    assert language_scripts("en") == ["Latin"]
    assert language_scripts("ja") == ["Han", "Hiragana", "Katakana"]
    assert language_scripts("uk") == ["Cyrillic"]
    assert script_name("hang") == "Hangul" and script_name("Hani") == "Han"
    assert token_scripts("한국어 text, 漢字!") == {"Hangul", "Common", "Latin", "Han"}
    with pytest.raises(RecipeError, match="not a Unicode script"):
        script_name("Klingonish")


def test_unsupported_tokenizer_models_fail_clearly():
    wordlevel = {"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}, "added_tokens": []}
    with pytest.raises(ModelError, match="'WordLevel'"):
        select_ids(wordlevel, Counter())
    with pytest.raises(ModelError, match="'WordPiece'"):
        parse_bpe({"model": {"type": "WordPiece", "vocab": {"a": 0}}})


# ---------------------------------------------------------------------------------------------------------------
# Slicing


@pytest.mark.parametrize(
    "model_type,tie,padding",
    [("gemma3_text", True, 0), ("qwen2", False, 0), ("qwen2", True, 9), ("gemma3_text", False, 5)],
)
def test_slice_model_keeps_logits_at_kept_ids(model_type, tie, padding):
    vocab = 64
    model = tiny_model(model_type, vocab_size=vocab + padding, tie=tie, seed=1)
    arch = Arch.of(model)
    assert arch.is_tied() == tie
    token_map = [0, 1, 2, 5, 8, 13, 21, 34, 40, 55, 63]
    ids = torch.tensor([[2, 13, 5, 40, 63, 8, 0, 21]])
    with torch.no_grad():
        before = model(ids).logits[..., token_map]
    old_to_new = {o: n for n, o in enumerate(token_map)}
    stats = slice_model(model, arch, token_map)
    new_ids = ids.apply_(lambda i: old_to_new[i])
    with torch.no_grad():
        after = model(new_ids).logits
    assert after.shape[-1] == len(token_map)
    # Same rows, same inputs; a GEMM over fewer output rows may block differently and round in the last bit.
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert arch.is_tied() == tie
    assert type(arch.input_embeddings()).__name__ == type(model.model.embed_tokens).__name__
    assert arch.input_embeddings().num_embeddings == len(token_map) == model.config.vocab_size
    assert (stats.rows_before, stats.rows_after) == (vocab + padding, len(token_map))
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (2, 1, 0)
    assert model.generation_config.bos_token_id == 2


@pytest.mark.parametrize("rows,hidden", [(37, 3), (64, 4)])
def test_gather_rows_in_chunks_equals_index_select(rows, hidden):
    # every chunk size from one row to all rows, against maps that start, end and jump across chunk boundaries
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, hidden, generator=g)
    maps = [[0], [rows - 1], list(range(rows)), list(range(0, rows, 3)), [1, 2, rows - 2]]
    maps += [sorted(torch.randperm(rows, generator=g)[:k].tolist()) for k in (5, rows // 2)]
    for token_map in maps:
        idx = torch.tensor(token_map)
        for chunk_rows in range(1, rows + 1):
            calls: list[int] = []
            got = gather_rows(w, idx, lambda c=calls: c.append(1), chunk_bytes=chunk_rows * hidden * 4)
            assert torch.equal(got, w.index_select(0, idx)), (token_map, chunk_rows)
            # one release per chunk of source rows that holds a kept row
            assert len(calls) == len({i // chunk_rows for i in token_map})


@pytest.mark.parametrize("tie", [True, False])
def test_slice_model_releases_pages_while_gathering(tie):
    model = tiny_model("qwen2", vocab_size=64, tie=tie, seed=3)
    ref = tiny_model("qwen2", vocab_size=64, tie=tie, seed=3)
    token_map = [0, 1, 2, 5, 8, 13, 21, 34, 40, 55, 63]
    calls: list[int] = []
    slice_model(model, Arch.of(model), token_map, release=lambda: calls.append(1))
    slice_model(ref, Arch.of(ref), token_map)
    assert calls  # the default chunk holds this whole 64-row embedding: one call per gathered matrix
    assert len(calls) == (1 if tie else 2)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


def test_slice_model_gathers_lm_head_bias():
    model = tiny_model("qwen2", vocab_size=24, tie=False, seed=2)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(24))
    ids = torch.tensor([[2, 5, 1, 0, 9]])
    token_map = [0, 1, 2, 5, 9, 23]
    with torch.no_grad():
        before = model(ids).logits[..., token_map]
    slice_model(model, Arch.of(model), token_map)
    with torch.no_grad():
        after = model(torch.tensor([[2, 3, 1, 0, 4]])).logits
    assert model.lm_head.bias.shape == (6,) and model.lm_head.out_features == 6
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_slice_model_remaps_config_ids_and_rejects_dropped_ones():
    model = tiny_model("qwen2", vocab_size=32, tie=False)
    model.config.eos_token_id = [1, 30]
    model.generation_config.eos_token_id = [1, 30]
    slice_model(model, Arch.of(model), [0, 1, 2, 7, 30])
    assert model.config.eos_token_id == [1, 4] and model.generation_config.eos_token_id == [1, 4]
    model = tiny_model("qwen2", vocab_size=32, tie=False)
    with pytest.raises(ModelError, match="bos_token_id"):
        slice_model(model, Arch.of(model), [0, 1, 3])
    assert model.model.embed_tokens.num_embeddings == 32  # a failed slice leaves the model as it was
    with pytest.raises(ModelError, match="embedding has only 32 rows"):
        slice_model(model, Arch.of(model), [0, 1, 2, 40])


# ---------------------------------------------------------------------------------------------------------------
# Real tokenizers (Gemma 3: SentencePiece-style BPE with byte fallback; Qwen2.5: byte-level BPE, padded rows)


_lines = ntrex_lines


def _calibration(tokenizer, langs=("ko", "en")) -> CalibrationResult:
    languages = {}
    for code in langs:
        docs = _lines(code)
        counts: Counter = Counter()
        for ids in tokenizer(docs[:N_COUNT], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
        languages[code] = LanguageData(
            code=code,
            scripts=language_scripts(code),
            calib_docs=docs[:N_COUNT],
            heldout_docs=docs[N_COUNT:],
            token_counts=counts,
        )
    return CalibrationResult(languages=languages, windows=torch.zeros(0, 8, dtype=torch.long))


@pytest.fixture(scope="module", params=["gemma3", "qwen2.5"])
def trimmed(request):
    """Trim a real tokenizer (and a tiny model of its vocabulary size) for ko+en, once per tokenizer."""
    require_shared()
    from transformers import AutoTokenizer

    name = request.param
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    if name == "gemma3":  # tied head, as many rows as tokens
        model = tiny_model("gemma3_text", vocab_size=len(tok), tie=True)
    else:  # untied head and padding rows (Qwen: 151,936 rows for 151,665 tokens)
        model = tiny_model("qwen2", vocab_size=151_936, tie=False)
    loaded = LoadedModel(
        model=model,
        tokenizer=tok,
        original_tokenizer=tok,
        arch=Arch.of(model),
        source=name,
        checkpoint_dir=None,
        tokenizer_dir=TOKENIZERS / name,
    )
    calib = _calibration(tok)
    probe = tok(_lines("ko")[N_COUNT] + " " + _lines("en")[N_COUNT], return_tensors="pt")["input_ids"][:, :48]
    with torch.no_grad():
        logits_before = model(probe).logits
    result = trim_vocab(loaded, calib, VocabConfig())
    print(f"\n{name}: {result.headline} in {result.seconds:.1f}s; policies {result.policies}")
    return SimpleNamespace(
        name=name, orig=tok, loaded=loaded, result=result, probe=probe, logits_before=logits_before
    )


def test_trimmed_ids_match_original_on_heldout_korean_and_english(trimmed):
    tm, orig, new = trimmed.result.token_map, trimmed.orig, trimmed.loaded.tokenizer
    assert trimmed.result.vocab_after < trimmed.result.vocab_before
    for lang in ("ko", "en"):
        held = _lines(lang)[N_COUNT:]
        want = orig(held)["input_ids"]
        got = new(held)["input_ids"]
        bad = [s for s, w, g in zip(held, want, got, strict=True) if [tm[i] for i in g] != w]
        assert not bad, f"{len(bad)}/{len(held)} held-out {lang} lines tokenize differently, e.g. {bad[0]!r}"


def test_roundtrip_text_in_all_languages(trimmed):
    orig, new = trimmed.orig, trimmed.loaded.tokenizer
    for lang in LANG_FILES:
        held = _lines(lang)[N_COUNT : N_COUNT + 100]
        want = orig.batch_decode(orig(held)["input_ids"], skip_special_tokens=True)
        got = new.batch_decode(new(held)["input_ids"], skip_special_tokens=True)
        assert got == want, lang
    if trimmed.name == "gemma3":  # Cyrillic words are gone: Russian falls back to <0xXX> byte tokens
        assert any(t.startswith("<0x") for t in new.tokenize(_lines("ru")[N_COUNT]))


def test_every_kept_token_is_reachable(trimmed):
    tj = json.loads(trimmed.loaded.tokenizer.backend_tokenizer.to_str())
    view = parse_bpe(tj)
    assert view.size == trimmed.result.vocab_after
    merge_results = {r for _, _, r in view.merges}
    vocab_parts = {a for a, _, _ in view.merges} | {b for _, b, _ in view.merges}
    assert vocab_parts <= set(view.id_to_token)
    unreachable = [
        t
        for t, i in view.vocab.items()
        if i not in view.added_ids
        and i not in view.byte_ids
        and len(t) > 1
        and i not in merge_results
        and not view.base_symbol(t)
    ]
    assert not unreachable, unreachable[:10]


def test_tokenizer_settings_and_model_ids_survive(trimmed):
    orig, new, tm = trimmed.orig, trimmed.loaded.tokenizer, trimmed.result.token_map
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(new, attr) == getattr(orig, attr), attr
        old_id = getattr(orig, attr + "_id")
        if old_id is not None:
            assert tm[getattr(new, attr + "_id")] == old_id, attr
    assert new.chat_template == orig.chat_template
    assert (new.padding_side, new.model_max_length) == (orig.padding_side, orig.model_max_length)
    assert len(new) == trimmed.result.vocab_after
    cfg = trimmed.loaded.model.config
    assert cfg.vocab_size == trimmed.result.vocab_after
    assert [tm[cfg.bos_token_id], tm[cfg.eos_token_id], tm[cfg.pad_token_id]] == [2, 1, 0]
    if trimmed.name == "gemma3":
        assert new("안녕")["input_ids"][0] == new.bos_token_id  # the <bos> template survived renumbering


def test_logits_parity_after_slicing(trimmed):
    tm = trimmed.result.token_map
    old_to_new = {o: n for n, o in enumerate(tm)}
    new_ids = trimmed.probe.clone().apply_(lambda i: old_to_new[i])
    model = trimmed.loaded.model
    with torch.no_grad():
        after = model(new_ids).logits
    torch.testing.assert_close(after, trimmed.logits_before[..., tm], rtol=1e-5, atol=1e-6)
    assert trimmed.loaded.arch.is_tied() == (trimmed.name == "gemma3")
    assert trimmed.result.model_rows_before == (262_144 if trimmed.name == "gemma3" else 151_936)


def test_result_summary_and_token_map_file(trimmed, tmp_path):
    r = trimmed.result
    s = json.loads(json.dumps(r.summary()))
    assert s["headline"].startswith(f"vocab {r.vocab_before} -> {r.vocab_after} (")
    assert s["embedding_params_after"] < s["embedding_params_before"]
    assert (
        set(s["policies"])
        == set(s["only"])
        == {"corpus", "scripts", "script_probe", "ranked", "top_words", "neutral", "keep_tokens", "chat_template", "always"}
    )
    data = json.loads(r.write_token_map(tmp_path / "token_map.json").read_text())
    assert data["new_to_old"] == r.token_map and data["vocab_after"] == len(r.token_map)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer-only entry point and the disabled stage


def test_trim_tokenizer_writes_a_loadable_directory(tmp_path):
    require_shared()
    from transformers import AutoTokenizer

    src = TOKENIZERS / "gpt2"
    orig = AutoTokenizer.from_pretrained(src)
    en = _lines("en")
    counts = Counter(i for ids in orig(en[:N_COUNT])["input_ids"] for i in ids)
    out = tmp_path / "tok"
    tj, token_map, stats = trim_tokenizer(src, counts, [], VocabConfig(keep_scripts=False), out_dir=out)
    assert stats.policies["scripts"] == 0 and stats.vocab_after == len(token_map) < 50_257
    new = AutoTokenizer.from_pretrained(out)
    assert len(new) == len(token_map) and new.eos_token == "<|endoftext|>"
    assert token_map[new.eos_token_id] == orig.eos_token_id
    held = en[N_COUNT:]
    assert new.batch_decode(new(held)["input_ids"]) == orig.batch_decode(orig(held)["input_ids"])
    assert json.loads((out / "token_map.json").read_text())["new_to_old"] == token_map
    # the same core, on the dict
    again = trim_tokenizer_json(json.loads((src / "tokenizer.json").read_text()), counts, [], VocabConfig())
    assert again.token_map == token_map


def test_disabled_stage_is_identity():
    model = tiny_model("qwen2", vocab_size=40, tie=True)
    tok = ["t"] * 37  # anything with a length
    loaded = SimpleNamespace(model=model, tokenizer=tok, arch=Arch.of(model))
    before = copy.deepcopy(model.state_dict())
    r = trim_vocab(loaded, None, VocabConfig(enabled=False))
    assert isinstance(r, VocabResult) and not r.enabled and not r.trimmed
    assert r.token_map == list(range(37)) and r.headline == "vocab 37 kept (trimming disabled)"
    assert loaded.tokenizer is tok
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# The other BPE tokenizers in ../shared, for a Korean+English and a Ukrainian target (tokenizer only, no model)
