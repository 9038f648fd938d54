"""Vocabulary trimming of a raw SentencePiece .model (Mistral 7B v1: BPE with byte fallback, 32,000 pieces).

Every claim is checked against the sentencepiece library itself: the pure-Python merge procedure, reachability
of kept pieces, parity of the trimmed model on held-out NTREX lines, and round trips in twelve languages.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import regex
from sentencepiece import SentencePieceProcessor

from converter.errors import ModelError
from converter.languages import ScriptMatcher, language_scripts
from converter.recipe import VocabConfig
from converter.vocab.select import classify_token
from converter.vocab.spm import (
    BYTE,
    CONTROL,
    NORMAL,
    ModelProto,
    SpmBpe,
    check_consistent,
    count_tokens,
    read_model_proto,
    rewrite_model_proto,
    spm_view,
    trim_model_file,
)
from tests.conftest import NTREX_FILES, TOKENIZERS, ntrex_lines, require_shared

MISTRAL = TOKENIZERS / "mistral-sentencepiece" / "tokenizer.model"
LANG_FILES = NTREX_FILES
N_COUNT = 1700  # first lines give the counts, the rest (297 per language) is held out


_lines = ntrex_lines


def _processor(proto: ModelProto) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_proto=proto.SerializeToString())


def _whole_piece_checker(proto: ModelProto) -> SentencePieceProcessor:
    """The library on the same pieces without the dummy '▁' prefix: encoding a piece's own text shows whether the
    library can ever produce that piece (identity normalizer, so '▁' in the text stays '▁')."""
    p = ModelProto()
    p.CopyFrom(proto)
    p.normalizer_spec.add_dummy_prefix = False
    return _processor(p)


@pytest.fixture(scope="module")
def orig():
    require_shared()
    proto = read_model_proto(MISTRAL)
    return SimpleNamespace(proto=proto, sp=_processor(proto))


@pytest.fixture(scope="module", params=[("ko", "en"), ("uk",)], ids=["ko+en", "uk"])
def trimmed(request, orig, tmp_path_factory):
    targets = request.param
    counts = [count_tokens(orig.sp, _lines(c)[:N_COUNT]) for c in targets]
    scripts = [s for c in targets for s in language_scripts(c)]
    out = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    t0 = time.perf_counter()
    token_map, sel = trim_model_file(MISTRAL, counts, scripts, VocabConfig(), out)
    seconds = time.perf_counter() - t0
    print(
        f"\nmistral .model {'+'.join(targets)}: 32000 -> {len(token_map)} pieces in {seconds:.2f}s; {sel.summary()}"
    )
    proto = read_model_proto(out)
    return SimpleNamespace(
        targets=targets, scripts=scripts, token_map=token_map, sel=sel, proto=proto, sp=_processor(proto)
    )


def test_pure_python_encoder_matches_sentencepiece(orig):
    bpe = SpmBpe(orig.proto)
    texts = [s for lang in LANG_FILES for s in _lines(lang)[N_COUNT:]]
    # llama.cpp's SentencePiece test inputs: runs of spaces (ties between the '▁▁...' pieces, all scored -1e9),
    # tabs, newlines, emoji (byte fallback), the empty text.
    vectors = (TOKENIZERS / "test-vectors" / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8")
    texts += vectors.split("\n__ggml_vocab_test__\n")
    texts += ["", " ", "▁already escaped", "x" * 40, "a  b   c    d", "漢字 🙂𝄞 ⁇"]
    bad = [t for t in texts if bpe.encode(t) != orig.sp.encode(t, out_type=str)]
    assert not bad, f"{len(bad)}/{len(texts)} texts differ from SentencePieceProcessor, e.g. {bad[0]!r}"
    pieces = [p for t in texts for p in bpe.encode(t)]
    assert (
        "<0xF0>" in pieces and "▁▁▁" in pieces and len(texts) > 3500
    )  # byte fallback and ties were exercised


def test_derivations_and_reachability_agree_with_the_library(orig):
    view = spm_view(orig.proto)
    assert view.family == "BPE" and view.byte_fallback and len(view.byte_ids) == 256
    assert view.special_ids == {0, 1, 2} and view.added_ids == {1, 2}
    assert not view.unreachable_ids  # every Mistral piece is reachable
    # One producer per multi-character piece: each piece has exactly one derivation.
    multi = [i for i, p in enumerate(orig.proto.pieces) if p.type == NORMAL and len(p.piece) > 1]
    results = Counter(r for _, _, r in view.merges)
    assert set(results) == set(multi) and max(results.values()) == 1
    left, right = view.merges[0][:2]
    assert view.id_to_token[left] + view.id_to_token[right] == view.id_to_token[view.merges[0][2]]

    # Add pieces no text can produce (their own text ends as 3 symbols) and one that is reachable.
    proto = ModelProto()
    proto.CopyFrom(orig.proto)
    injected = ["x▁thez", "q▁andq", "▁the▁the"]
    for k, text in enumerate(injected):
        proto.pieces.add(piece=text, score=-40_000.0 - k, type=NORMAL)
    view = spm_view(proto)
    checker = _whole_piece_checker(proto)
    library_unreachable = {
        i
        for i, p in enumerate(proto.pieces)
        if p.type == NORMAL and checker.encode(p.piece, out_type=str) != [p.piece]
    }
    assert view.unreachable_ids == library_unreachable == {32000, 32001}
    assert 32002 in {r for _, _, r in view.merges}


def test_unreachable_pieces_are_never_selected(orig, tmp_path):
    proto = ModelProto()
    proto.CopyFrom(orig.proto)
    proto.pieces.add(piece="x▁thez", score=-40_000.0, type=NORMAL)
    src = tmp_path / "src.model"
    src.write_bytes(proto.SerializeToString())
    view = spm_view(proto)
    # Without the reachability check the Latin script policy would keep it: its text is Latin.
    assert classify_token(view, "x▁thez", ScriptMatcher(["Latin"])) == "script"
    token_map, _ = trim_model_file(src, Counter({32000: 5}), ["Latin"], VocabConfig(), tmp_path / "out.model")
    assert 32000 not in token_map
    assert max(token_map) < 32000 and len(token_map) < 32000


def test_trimmed_model_gives_identical_pieces_on_target_script_lines(orig, trimmed):
    tm, new = trimmed.token_map, trimmed.sp
    other_letter = regex.compile(
        r"(?=\p{L})(?!" + "|".join(rf"\p{{Script={s}}}" for s in trimmed.scripts) + ")"
    )
    for lang in trimmed.targets:
        held = [s for s in _lines(lang)[N_COUNT:] if not other_letter.search(s)]
        assert len(held) >= 150, f"only {len(held)} held-out {lang} lines are written in {trimmed.scripts}"
        want_pieces = orig.sp.encode(held, out_type=str)
        want_ids = orig.sp.encode(held)
        got_pieces = new.encode(held, out_type=str)
        got_ids = new.encode(held)
        bad = [s for s, w, g in zip(held, want_pieces, got_pieces, strict=True) if w != g]
        assert not bad, f"{len(bad)}/{len(held)} held-out {lang} lines encode differently, e.g. {bad[0]!r}"
        assert [[tm[i] for i in g] for g in got_ids] == want_ids


def test_closure_is_what_makes_parity_hold(orig):
    """Without the merge closure (corpus pieces + specials + bytes only) parity breaks: the check above can fail."""
    held = _lines("uk")[N_COUNT:]
    counts = count_tokens(orig.sp, _lines("uk")[:N_COUNT])
    view = spm_view(orig.proto)
    kept = sorted(set(counts) | view.special_ids | view.byte_ids)
    sp = _processor(rewrite_model_proto(orig.proto, kept))
    kept_set = set(kept)
    want = orig.sp.encode(held)
    covered = [k for k, ids in enumerate(want) if set(ids) <= kept_set]
    got = sp.encode([held[k] for k in covered])
    differ = sum(1 for k, g in zip(covered, got) if [kept[i] for i in g] != want[k])
    assert len(covered) > 100 and differ > 0


def test_round_trip_in_all_languages(orig, trimmed):
    for lang in LANG_FILES:
        held = _lines(lang)[N_COUNT:]
        want = orig.sp.decode(orig.sp.encode(held))
        got = trimmed.sp.decode(trimmed.sp.encode(held))
        assert got == want, f"{'+'.join(trimmed.targets)}: {lang} does not round-trip"
        assert want == held  # identity normalizer: decoding gives the text back
    if trimmed.targets == ("uk",):  # Hangul is gone: Korean falls back to byte pieces
        assert any(p.startswith("<0x") for p in trimmed.sp.encode(_lines("ko")[N_COUNT], out_type=str))


def test_every_kept_piece_is_reachable_in_the_trimmed_model(trimmed):
    checker = _whole_piece_checker(trimmed.proto)
    normal = [p.piece for p in trimmed.proto.pieces if p.type == NORMAL]
    unreachable = [t for t, got in zip(normal, checker.encode(normal, out_type=str)) if got != [t]]
    assert not unreachable, unreachable[:10]
    assert not spm_view(trimmed.proto).unreachable_ids


def test_rewrite_details(orig, trimmed):
    old, new, tm = orig.proto, trimmed.proto, trimmed.token_map
    n = len(tm)
    assert n == len(new.pieces) == new.trainer_spec.vocab_size == trimmed.sp.get_piece_size()
    assert [(p.piece, p.score, p.type) for p in new.pieces] == [
        (old.pieces[o].piece, old.pieces[o].score, old.pieces[o].type) for o in tm
    ]
    assert new.normalizer_spec == old.normalizer_spec
    spec = new.trainer_spec
    for name, piece in (("unk_id", "<unk>"), ("bos_id", "<s>"), ("eos_id", "</s>")):
        assert new.pieces[getattr(spec, name)].piece == piece
        assert tm[getattr(spec, name)] == getattr(old.trainer_spec, name)
    assert (trimmed.sp.unk_id(), trimmed.sp.bos_id(), trimmed.sp.eos_id(), spec.pad_id) == (0, 1, 2, -1)
    assert sum(p.type == BYTE for p in new.pieces) == 256
    assert all(trimmed.sp.piece_to_id(f"<0x{b:02X}>") != 0 for b in range(256))
    assert sum(p.type == CONTROL for p in new.pieces) == 2
    assert spec.model_type == old.trainer_spec.model_type and spec.byte_fallback
    # Latin covers most of Mistral's vocabulary (every Latin-script language), so ko+en shrinks far less than uk.
    limit = 6_000 if trimmed.targets == ("uk",) else 30_000
    assert n < limit, f"{'+'.join(trimmed.targets)} kept {n} of 32000 pieces"
    assert trimmed.sel.vocab_before == 32_000


def test_size_cap_still_gives_a_working_model(orig, tmp_path):
    counts = count_tokens(orig.sp, _lines("uk")[:N_COUNT])
    cfg = VocabConfig(max_size=3_000)
    token_map, sel = trim_model_file(MISTRAL, counts, ["Cyrillic"], cfg, tmp_path / "capped.model")
    assert len(token_map) <= 3_000 and sel.cap_dropped > 0
    proto = read_model_proto(tmp_path / "capped.model")
    sp = _processor(proto)
    held = _lines("uk")[N_COUNT:]
    assert sp.decode(sp.encode(held)) == held
    checker = _whole_piece_checker(proto)
    normal = [p.piece for p in proto.pieces if p.type == NORMAL]
    assert all(got == [t] for t, got in zip(normal, checker.encode(normal, out_type=str)))


def test_rewrite_rejects_bad_token_maps(orig):
    keep = list(range(259)) + [300, 400]
    with pytest.raises(ModelError, match="strictly increasing"):
        rewrite_model_proto(orig.proto, [0, 2, 1, *keep[3:]])
    with pytest.raises(ModelError, match="bos_id"):
        rewrite_model_proto(orig.proto, [0, *keep[2:]])
    with pytest.raises(ModelError, match="UNKNOWN"):
        rewrite_model_proto(orig.proto, keep[1:])
    with pytest.raises(ModelError, match="byte pieces"):
        rewrite_model_proto(orig.proto, keep[:100] + keep[101:])
    with pytest.raises(ModelError, match="only 32000"):
        rewrite_model_proto(orig.proto, [*keep, 32_000])
    assert len(rewrite_model_proto(orig.proto, keep).pieces) == 261


def test_check_consistent_with_a_converted_tokenizer_json(orig):
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    fast = convert_slow_tokenizer(LlamaTokenizer(vocab_file=str(MISTRAL), legacy=True))
    held = [s for lang in ("ko", "uk", "ja", "en") for s in _lines(lang)[N_COUNT:]]
    got = [e.tokens for e in fast.encode_batch(held, add_special_tokens=False)]
    assert got == orig.sp.encode(held, out_type=str)  # the converted tokenizer.json is the same tokenizer

    tj = json.loads(fast.to_str())
    assert check_consistent(orig.proto, tj) is None
    swapped = json.loads(fast.to_str())
    vocab = swapped["model"]["vocab"]
    vocab["▁the"], vocab["in"] = vocab["in"], vocab["▁the"]
    reason = check_consistent(orig.proto, swapped)
    assert reason is not None and "'in'" in reason and "id 272" in reason
    del swapped["model"]["vocab"]["▁the"]
    assert "32000 pieces" in check_consistent(orig.proto, swapped)
    unigram = {"model": {"type": "Unigram", "vocab": [[p.piece, p.score] for p in orig.proto.pieces]}}
    assert check_consistent(orig.proto, unigram) is None


def test_bad_files_and_unsupported_models_fail_clearly(orig, tmp_path):
    for name, data in (
        ("garbage.model", b"\xff\xfe\x00not a model"),
        ("empty.model", b""),
        ("text.model", b"hi"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError, match=name):
            read_model_proto(tmp_path / name)
    with pytest.raises(ModelError, match="cannot read"):
        read_model_proto(tmp_path / "missing.model")
    word = ModelProto()
    word.CopyFrom(orig.proto)
    word.trainer_spec.model_type = 3
    with pytest.raises(ModelError, match="WORD"):
        spm_view(word)


def test_a_directory_with_tokenizer_json_and_model_gets_both_rewritten_consistently(orig, tmp_path, caplog):
    """Llama/Mistral-style directories ship tokenizer.json and tokenizer.model: the trimmed directory keeps
    both, with the same pieces at the same ids; a .model that disagrees with tokenizer.json is left out."""
    import shutil

    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    from converter.vocab import trim_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    fast = convert_slow_tokenizer(LlamaTokenizer(vocab_file=str(MISTRAL), legacy=True))
    fast.save(str(src / "tokenizer.json"))
    shutil.copy(MISTRAL, src / "tokenizer.model")
    counts = count_tokens(orig.sp, _lines("uk")[:N_COUNT])
    result = trim_tokenizer(src, counts, ["Cyrillic"], VocabConfig(), out_dir=tmp_path / "out")
    out_proto = read_model_proto(tmp_path / "out" / "tokenizer.model")
    new_tj = json.loads((tmp_path / "out" / "tokenizer.json").read_text(encoding="utf-8"))
    assert check_consistent(out_proto, new_tj) is None
    assert len(out_proto.pieces) == len(result.token_map) < 6000
    sp = _processor(out_proto)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(new_tj))
    held = _lines("uk")[N_COUNT:]
    assert [e.tokens for e in tok.encode_batch(held, add_special_tokens=False)] == sp.encode(
        held, out_type=str
    )

    # A .model from another vocabulary is not shipped next to the trimmed tokenizer.json.
    vocab = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab["model"]["vocab"]["▁the"], vocab["model"]["vocab"]["in"] = (
        vocab["model"]["vocab"]["in"],
        vocab["model"]["vocab"]["▁the"],
    )
    (src / "tokenizer.json").write_text(json.dumps(vocab), encoding="utf-8")
    with caplog.at_level("WARNING"):
        trim_tokenizer(src, counts, ["Cyrillic"], VocabConfig(), out_dir=tmp_path / "out2")
    assert not (tmp_path / "out2" / "tokenizer.model").exists()
    assert "tokenizer.model left out" in caplog.text


def test_unigram_model_file_trims_with_parity(tmp_path):
    """The Unigram path of .model files (XLM-R style). No real Unigram .model ships in ../shared, so one is
    trained here on NTREX text with sentencepiece's own trainer; the guarantees are checked with the library."""
    import io

    from sentencepiece import SentencePieceTrainer

    require_shared()
    train = [s for lang in ("uk", "ko", "en", "ru") for s in _lines(lang)[:N_COUNT]]
    buf = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter(train),
        model_writer=buf,
        model_type="unigram",
        vocab_size=6000,
        character_coverage=1.0,
        byte_fallback=True,
        num_threads=2,
    )
    src = tmp_path / "unigram.model"
    src.write_bytes(buf.getvalue())
    proto = read_model_proto(src)
    view = spm_view(proto)
    assert view.family == "Unigram" and len(view.byte_ids) == 256 and not view.merges
    sp = _processor(proto)
    counts = count_tokens(sp, _lines("uk")[:N_COUNT])
    out = tmp_path / "uk.model"
    token_map, sel = trim_model_file(src, counts, ["Cyrillic"], VocabConfig(), out)
    assert sel.closure_added == 0 and len(token_map) < 0.8 * len(proto.pieces)
    new = _processor(read_model_proto(out))
    cyrillic_only = regex.compile(r"(?=\p{L})(?!\p{Script=Cyrillic})")
    held = [s for s in _lines("uk")[N_COUNT:] if not cyrillic_only.search(s)]
    assert len(held) > 200
    for s in held:
        assert [token_map[i] for i in new.encode(s)] == sp.encode(s), s
    for lang in LANG_FILES:
        for s in _lines(lang)[N_COUNT : N_COUNT + 40]:
            assert new.decode(new.encode(s)) == sp.decode(sp.encode(s)), (lang, s)
    # 0 unreachable kept pieces: every kept multi-character piece is the library's segmentation of its own text.
    probe = ModelProto()
    probe.CopyFrom(read_model_proto(out))
    probe.normalizer_spec.add_dummy_prefix = False
    probe.normalizer_spec.remove_extra_whitespaces = False
    check = _processor(probe)
    normal = [(i, p.piece) for i, p in enumerate(probe.pieces) if p.type == NORMAL and len(p.piece) > 1]
    assert all(check.encode(piece) == [i] for i, piece in normal)
