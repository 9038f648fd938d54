"""Which token ids to keep: a pure function of a tokenizer model, token counts and target scripts.

keep = corpus ∪ scripts ∪ script_probe ∪ ranked ∪ top_words ∪ neutral ∪ keep_tokens ∪ chat_template ∪ always,
optionally capped at max_size, then
closed under BPE merges (see ``merge_closure``). Every policy reports how many ids it selected and how many
only it selected; the closure reports how many it added on top. Families: BPE (byte-level and
SentencePiece-style), Unigram and WordPiece; see ``VocabView``.

Vocabulary trimming by corpus frequency follows Abdaoui et al., "Load What You Need: Smaller Versions of
Multilingual BERT" (2020) and Ushio et al., "An Efficient Multilingual Language Model Compression through
Vocabulary Trimming" (2023); the merge closure is what makes it exact for BPE tokenizers.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import regex

from converter.errors import ModelError, RecipeError
from converter.languages import ScriptMatcher

SUPPORTED_MODELS = ("BPE", "Unigram", "WordPiece")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte value -> the printable character that stands for it in the vocab."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _has_type(node: Any, type_name: str) -> bool:
    """Does a tokenizer.json component (possibly a Sequence of them) contain a component of this type?"""
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return True
        return any(_has_type(v, type_name) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_has_type(v, type_name) for v in node)
    return False


@dataclass
class VocabView:
    """The parts of a tokenizer model that selection needs, as ids, for every supported family.

    family: "BPE" (tokenizer.json BPE: byte-level or SentencePiece-style; also a SentencePiece BPE ``.model``
    whose merges are derived from piece scores), "Unigram" or "WordPiece".
    """

    vocab: dict[str, int]  # model vocabulary: token -> id
    id_to_token: dict[int, str]  # model vocabulary and added tokens
    added_ids: set[int]  # every added token (special or not)
    special_ids: set[int]  # added tokens marked special, plus the model's unk token
    byte_ids: set[int]  # the 256 <0xXX> tokens or the 256 byte-level alphabet symbols present
    # BPE: (left id, right id, result id), in rank order; [] otherwise
    merges: list[tuple[int, int, int]] = field(default_factory=list)
    byte_level: bool = False  # GPT-2 style byte alphabet (Qwen, Llama 3, GPT-2)
    byte_fallback: bool = False  # SentencePiece style <0xXX> tokens (Gemma, Llama 2, Mistral)
    ignore_merges: bool = False  # a whole pre-token found in the vocab is emitted without merging (Llama 3)
    continuing_subword_prefix: str = ""
    family: str = "BPE"
    # Unigram / WordPiece: the one-character pieces ('a', '▁', '##a'). Kept always: with them every text the
    # original tokenizer could spell still encodes (character by character where longer pieces were dropped).
    alphabet_ids: set[int] = field(default_factory=set)
    scores: dict[int, float] = field(default_factory=dict)  # Unigram / SentencePiece log-probabilities

    @property
    def size(self) -> int:
        return max(self.id_to_token) + 1 if self.id_to_token else 0

    def base_symbol(self, token: str) -> bool:
        """Can BPE start from this token without a merge? (one character: a code point or a byte symbol)"""
        p = self.continuing_subword_prefix
        if p and token.startswith(p) and len(token) > len(p):
            token = token[len(p) :]
        return len(token) == 1

    def text_of(self, token: str) -> str | None:
        """The text a token stands for, for script classification; None when it is not whole UTF-8 text."""
        if self.byte_level:
            try:
                return bytes(_CHAR_TO_BYTE[c] for c in token).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                return None
        p = self.continuing_subword_prefix
        if p and token.startswith(p):
            token = token[len(p) :]
        return token.replace("\u2581", " ")

    def surface_to_token(self, text: str) -> str:
        """The vocab spelling of a piece of text (' 안녕' -> '▁안녕' or 'Ġìķĳëħķ')."""
        if self.byte_level:
            return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8"))
        if self.family == "WordPiece":
            return text
        return text.replace(" ", "\u2581")


def _byte_fallback_ids(vocab: Mapping[str, int]) -> set[int]:
    return {vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab}


def _added(tj: Mapping[str, Any], id_to_token: dict[int, str]) -> tuple[set[int], set[int]]:
    added_ids: set[int] = set()
    special_ids: set[int] = set()
    for a in tj.get("added_tokens") or []:
        id_to_token.setdefault(a["id"], a["content"])
        added_ids.add(a["id"])
        if a.get("special"):
            special_ids.add(a["id"])
    return added_ids, special_ids


def _parse_unigram(tj: Mapping[str, Any]) -> VocabView:
    model = tj["model"]
    pieces = model["vocab"]  # [[piece, score], ...], id = position
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    id_to_token = {i: p for i, (p, _) in enumerate(pieces)}
    added_ids, special_ids = _added(tj, id_to_token)
    unk = model.get("unk_id")
    if unk is not None:
        special_ids.add(int(unk))
    byte_fallback = bool(model.get("byte_fallback"))
    return VocabView(
        vocab=vocab,
        id_to_token=id_to_token,
        byte_fallback=byte_fallback,
        added_ids=added_ids,
        special_ids=special_ids,
        byte_ids=_byte_fallback_ids(vocab) if byte_fallback else set(),
        family="Unigram",
        alphabet_ids={i for p, i in vocab.items() if len(p) == 1},
        scores={i: float(s) for i, (_, s) in enumerate(pieces)},
    )


def _dict_vocab(tj: Mapping[str, Any]) -> tuple[dict[str, int], dict[int, str], set[int], set[int]]:
    """A {token: id} model vocabulary (BPE, WordPiece): vocab, id -> token, added ids, special ids (+ unk)."""
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    id_to_token = {i: t for t, i in vocab.items()}
    added_ids, special_ids = _added(tj, id_to_token)
    unk = model.get("unk_token")
    if unk is not None and unk in vocab:
        special_ids.add(vocab[unk])
    return vocab, id_to_token, added_ids, special_ids


def _parse_wordpiece(tj: Mapping[str, Any]) -> VocabView:
    model = tj["model"]
    vocab, id_to_token, added_ids, special_ids = _dict_vocab(tj)
    prefix = model.get("continuing_subword_prefix") or ""
    alphabet = {
        i
        for t, i in vocab.items()
        if len(t) == 1 or (prefix and t.startswith(prefix) and len(t) == len(prefix) + 1)
    }
    return VocabView(
        vocab=vocab,
        id_to_token=id_to_token,
        added_ids=added_ids,
        special_ids=special_ids,
        byte_ids=set(),
        continuing_subword_prefix=prefix,
        family="WordPiece",
        alphabet_ids=alphabet,
    )


def parse_tokenizer(tj: Mapping[str, Any]) -> VocabView:
    """Read a tokenizer.json dict (BPE, Unigram or WordPiece model). Raises ModelError for other model types."""
    model = tj.get("model") or {}
    mtype = model.get("type") or ("BPE" if "merges" in model else None)
    if mtype == "Unigram":
        return _parse_unigram(tj)
    if mtype == "WordPiece":
        return _parse_wordpiece(tj)
    return parse_bpe(tj)


def parse_bpe(tj: Mapping[str, Any]) -> VocabView:
    """Read a BPE tokenizer.json dict. Raises ModelError naming the model type when it is not supported."""
    model = tj.get("model") or {}
    mtype = model.get("type") or ("BPE" if "merges" in model else None)
    if mtype != "BPE":
        raise ModelError(
            f"vocabulary trimming supports tokenizer.json models of type {', '.join(SUPPORTED_MODELS)}; this "
            f"tokenizer is '{mtype}'. Set vocab.enabled: false to convert without trimming."
        )
    vocab, id_to_token, added_ids, special_ids = _dict_vocab(tj)

    byte_level = _has_type(tj.get("pre_tokenizer"), "ByteLevel") or _has_type(tj.get("decoder"), "ByteLevel")
    byte_fallback = bool(model.get("byte_fallback"))
    byte_ids: set[int] = set()
    if byte_level:
        byte_ids |= {vocab[c] for c in _BYTE_TO_CHAR.values() if c in vocab}
    if byte_fallback:
        byte_ids |= _byte_fallback_ids(vocab)

    prefix = model.get("continuing_subword_prefix") or ""
    merges: list[tuple[int, int, int]] = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        # tokenizers' BPE builds the merge result as a + b without b's continuing-subword prefix.
        result = a + (b[len(prefix) :] if prefix and b.startswith(prefix) else b)
        ia, ib, ir = vocab.get(a), vocab.get(b), vocab.get(result)
        if ia is None or ib is None or ir is None:
            raise ModelError(f"tokenizer.json merge {a!r} + {b!r} names a token missing from the vocabulary")
        merges.append((ia, ib, ir))
    return VocabView(
        vocab=vocab,
        id_to_token=id_to_token,
        merges=merges,
        byte_level=byte_level,
        byte_fallback=byte_fallback,
        ignore_merges=bool(model.get("ignore_merges")),
        added_ids=added_ids,
        special_ids=special_ids,
        byte_ids=byte_ids,
        continuing_subword_prefix=prefix,
    )


def merge_closure(kept: set[int], merges: Iterable[tuple[int, int, int]]) -> set[int]:
    """Close ``kept`` under BPE merges: add both parts of every merge whose result is kept, until nothing changes.

    Returns the ids the closure added (``kept`` itself is extended in place).

    Why the trimmed tokenizer then gives identical tokens: the trimmed BPE keeps exactly the merges whose result
    is kept, in their original order (so relative ranks are unchanged), and the closure guarantees both parts of
    those merges are kept too. Take a text on which the original tokenizer produces only kept tokens. Every
    intermediate symbol on the way is a node of the merge tree of some final token, so by closure it is kept, and
    every merge applied is a merge with a kept result, so it exists in the trimmed tokenizer; the initial symbols
    (characters, bytes) are leaves of those trees and so are kept as well. At each step the trimmed tokenizer's
    candidate merges are a subset of the original's, with the same relative ranks, and the original's choice (the
    lowest rank, leftmost) is among them, so it is the trimmed tokenizer's choice too. By induction both apply the
    same merges in the same order and emit the same tokens; ids differ only by the monotonic token_map.
    Texts that need dropped tokens still encode (via bytes or smaller pieces) and decode to the same text.
    """
    producers: dict[int, list[tuple[int, int]]] = {}
    for a, b, r in merges:
        producers.setdefault(r, []).append((a, b))
    added: set[int] = set()
    # A work list instead of repeated passes over 500k merges: each kept id expands its producers once.
    stack = [t for t in kept if t in producers]
    while stack:
        t = stack.pop()
        for a, b in producers.get(t, ()):
            for part in (a, b):
                if part not in kept:
                    kept.add(part)
                    added.add(part)
                    if part in producers:
                        stack.append(part)
    return added


_UNASSIGNED = regex.compile(r"\p{Cn}")


@functools.lru_cache(maxsize=8192)
def _completions(tail: bytes) -> str | None:
    """Every assigned character a truncated UTF-8 sequence can stand for ('\\xec\\x88' -> U+C200..U+C23F)."""
    lead = tail[0]
    length = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 0
    need = length - len(tail)
    if length == 0 or need > 2:  # a lone 4-byte lead could be any of 2^18 code points: do not guess
        return None
    chars = []
    for rest in itertools.product(range(0x80, 0xC0), repeat=need):
        try:
            ch = (tail + bytes(rest)).decode("utf-8")
        except UnicodeDecodeError:  # overlong forms, surrogates
            continue
        if not _UNASSIGNED.match(ch):
            chars.append(ch)
    return "".join(chars) or None


@functools.lru_cache(maxsize=8192)
def _heads(tail: bytes) -> str:
    """Every assigned character whose UTF-8 encoding ends with ``tail`` (1 to 3 continuation bytes)."""
    chars = []
    for length in range(len(tail) + 1, 5):
        leads = range(0xC2, 0xE0) if length == 2 else range(0xE0, 0xF0) if length == 3 else range(0xF0, 0xF5)
        for lead in leads:
            for mid in itertools.product(range(0x80, 0xC0), repeat=length - len(tail) - 1):
                try:
                    ch = (bytes([lead, *mid]) + tail).decode("utf-8")
                except UnicodeDecodeError:  # overlong forms, surrogates, past U+10FFFF
                    continue
                if not _UNASSIGNED.match(ch):
                    chars.append(ch)
    return "".join(chars)


def classify_token(view: VocabView, token: str, matcher: ScriptMatcher) -> str | None:
    """'script' (written in the target scripts), 'neutral' (only digits/punctuation/spaces) or None.

    Byte-level tokens may hold pieces of characters. Leading continuation bytes (the end of a character that
    began in an earlier token) are allowed but count as no letter, and a token made only of them counts as a
    target letter when it ends one (every character it can be the tail of is considered); a truncated character at the end stands for
    the set of characters it can complete to, and counts as a target letter only if all of those are allowed and
    one is a target letter (e.g. 'ĠìĪ' = ' ' + the first two bytes of U+C200..U+C23F, all Hangul).
    """
    if not view.byte_level:
        text = view.text_of(token)
        if text is None:
            return None
        if matcher.matches(text):
            return "script"
        return "neutral" if matcher.neutral(text) else None
    try:
        raw = bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None
    k = 0
    while k < len(raw) and 0x80 <= raw[k] < 0xC0:
        k += 1
    if k == len(raw):
        # Only continuation bytes: the end of a character whose lead byte is its own token (b'\x8c\x93' ends
        # U+C313 쌓 after the token b'\xec'). Kept when it ends some letter of a target script.
        if len(raw) == 1:  # a byte symbol: always kept with the byte alphabet
            return None
        heads = _heads(raw)
        return "script" if heads and matcher.has_letter(heads) else None
    body = raw[k:]
    j = len(body) - 1
    while j >= 0 and 0x80 <= body[j] < 0xC0:
        j -= 1
    core, tail = body, b""
    if j >= 0:
        lead = body[j]
        length = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if len(body) - j < length:
            core, tail = body[:j], body[j:]
    try:
        text = core.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not tail:
        if matcher.matches(text):
            return "script"
        # Leading continuation bytes end a character begun in the previous token; the rest decides.
        return "neutral" if matcher.neutral(text) else None
    tail_chars = _completions(tail)
    if tail_chars is None or not matcher.allowed(text) or not matcher.allowed(tail_chars):
        return None
    if matcher.has_letter(text) or matcher.has_letter(tail_chars):
        return "script"
    # The start of an emoji or symbol (e.g. b'\xf0\x9f': U+1F000..U+1FFFF, all Common): target-language text
    # with emoji tokenizes through these pieces.
    return "neutral" if matcher.neutral(text) and matcher.neutral(tail_chars) else None


@dataclass
class Selection:
    """Kept ids and where they came from."""

    kept: list[int]  # sorted old ids
    vocab_before: int
    policies: dict[str, int]  # policy -> ids it selected (policies overlap)
    closure_added: int  # ids only the merge closure brought in
    scripts: list[str] = field(default_factory=list)
    merges_before: int = 0
    merges_after: int = 0
    only: dict[str, int] = field(default_factory=dict)  # policy -> ids no other policy selected
    cap_dropped: int = 0  # candidate ids left out to respect max_size
    unreachable_skipped: int = 0  # script/neutral candidates the tokenizer can never emit, not kept
    corpus_coverage: float | None = None  # share of corpus token occurrences the kept ids cover
    script_check: dict[str, Any] | None = None  # probe.script_check on the rebuilt tokenizer, when scripts are kept

    @property
    def vocab_after(self) -> int:
        return len(self.kept)

    def summary(self) -> dict[str, Any]:
        return {
            "vocab_before": self.vocab_before,
            "vocab_after": self.vocab_after,
            "policies": dict(self.policies),
            "only": dict(self.only),
            "closure_added": self.closure_added,
            "cap_dropped": self.cap_dropped,
            "unreachable_skipped": self.unreachable_skipped,
            "corpus_coverage": self.corpus_coverage,
            "scripts": list(self.scripts),
            "merges_before": self.merges_before,
            "merges_after": self.merges_after,
            "script_check": self.script_check,
        }


_RESERVED = regex.compile(r"<unused\d+>|\[unused\d+\]|<\|reserved_special_token_\d+\|>")


def reserved_ids(view: VocabView) -> set[int]:
    """Added tokens that are placeholders reserved for later use ('<unused17>', '[unused3]',
    '<|reserved_special_token_5|>'): no text contains them and no template writes them."""
    return {i for i in view.added_ids if _RESERVED.fullmatch(view.id_to_token.get(i, ""))}


def token_ranks(view: VocabView) -> dict[int, float]:
    """How highly the tokenizer itself ranks each model token (lower = more frequent in its training text).

    BPE: the rank of the merge that produces the token (base symbols, which need no merge, rank first);
    Unigram: minus the piece's log-probability; WordPiece: the id (vocabularies are written in frequency order).
    A BPE token no merge produces and that is no base symbol gets no rank: it is never emitted by merging.
    """
    if view.family == "BPE":
        ranks: dict[int, float] = {}
        for r, (_, _, res) in enumerate(view.merges):
            ranks.setdefault(res, float(r))
        for tok, i in view.vocab.items():
            if view.base_symbol(tok):
                ranks[i] = -1.0
        return ranks
    if view.family == "Unigram":
        return {i: -s for i, s in view.scores.items()}
    return {i: float(i) for i in view.vocab.values()}


def _coverage_prefix(total: Counter, coverage: float) -> list[int]:
    """The most frequent ids whose counts add up to at least ``coverage`` of all occurrences (ties: lower id)."""
    ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
    need = coverage * sum(total.values())
    out: list[int] = []
    acc = 0
    for i, n in ranked:
        if acc >= need:
            break
        out.append(i)
        acc += n
    return out


def _capped(
    ordered: Iterable[int], must: set[int], producers: Mapping[int, list[tuple[int, int]]], max_size: int
) -> tuple[set[int], int]:
    """Fill up to ``max_size`` ids: ``must`` first, then ``ordered`` (best first), each with the parts it is built
    from, skipping a candidate whose closure does not fit. Returns (kept, candidates left out)."""
    kept = set(must)
    merge_closure(kept, ((a, b, r) for r, ps in producers.items() for a, b in ps))
    if len(kept) > max_size:
        raise RecipeError(
            f"vocab.max_size {max_size} is smaller than the {len(kept)} tokens that must always be kept (special, "
            "added and byte tokens, keep_tokens and the parts they are built from); raise max_size"
        )
    dropped = 0
    for t in ordered:
        if t in kept:
            continue
        need = {t}
        stack = [t]
        while stack:
            for a, b in producers.get(stack.pop(), ()):
                for part in (a, b):
                    if part not in kept and part not in need:
                        need.add(part)
                        stack.append(part)
        if len(kept) + len(need) > max_size:
            dropped += 1
            continue
        kept |= need
    return kept, dropped


def select_ids(
    tj: Mapping[str, Any] | None,
    counts: Mapping[int, int] | Iterable[Mapping[int, int]],
    scripts: Iterable[str] = (),
    *,
    min_count: int = 1,
    coverage: float | None = None,
    max_size: int | None = None,
    keep_tokens: Iterable[str] = (),
    extra_ids: Iterable[int] = (),
    template_ids: Iterable[int] = (),
    unreachable: Container[int] = frozenset(),
    view: VocabView | None = None,
    ranked: Iterable[tuple[Iterable[str], int]] = (),
    probe: Iterable[int] = (),
    words: Iterable[int] = (),
    drop_reserved: bool = False,
) -> Selection:
    """Choose the ids to keep.

    tj: the tokenizer.json dict (or None with ``view``). counts: original id -> count, or several such counters
    (summed). scripts: Unicode script names whose tokens are kept whole. coverage: keep only the most frequent
    corpus ids that cover this share of corpus token occurrences (with min_count also applied). max_size: cap
    on the result; candidates fill it in priority order: corpus tokens by count, then the whole-script sets
    (scripts, script_probe, neutral; by id), then top_words by estimated frequency, then ranked by rank.
    keep_tokens: token strings (vocab spelling, or plain text such as ' hello'). extra_ids: ids that must survive
    (the model config's bos/eos/pad ids). template_ids: ids the chat template's own text tokenizes to (kept
    so a rendered conversation tokenizes as before). unreachable: ids the tokenizer can never emit (found by the caller with
    the real tokenizer; any container, asked only about candidates); the script policy skips them.
    """
    if view is None:
        if tj is None:
            raise TypeError("select_ids needs a tokenizer.json dict or a view")
        view = parse_tokenizer(tj)
    size = view.size
    known = view.id_to_token
    skip = unreachable

    total: Counter = Counter()
    if isinstance(counts, Mapping):
        total.update(counts)
    else:
        for c in counts:
            total.update(c)
    total = Counter({i: n for i, n in total.items() if i in known and n > 0})

    # (a) corpus: ids seen often enough in the target-language text (optionally: the coverage prefix).
    corpus = {i for i, n in total.items() if n >= min_count}
    if coverage is not None:
        corpus &= set(_coverage_prefix(total, coverage))

    # (b) scripts: tokens whose text is written in the target scripts (plus Common/Inherited), and the
    # language-neutral tokens made only of Common/Inherited characters (reported as "neutral").
    matcher = ScriptMatcher(scripts)
    script_ids: set[int] = set()
    neutral_ids: set[int] = set()
    skipped = 0
    if matcher.scripts:
        merge_results = {r for _, _, r in view.merges}
        for tok, i in view.vocab.items():
            if i in view.added_ids:
                continue
            # A BPE token no merge produces and that is not a base symbol can never be emitted (unless
            # ignore_merges lets a whole pre-token through): keeping it would only waste a row.
            if view.family == "BPE" and not (
                view.ignore_merges or i in merge_results or view.base_symbol(tok)
            ):
                continue
            kind = classify_token(view, tok, matcher)
            if kind is not None and i in skip:
                skipped += 1
                continue
            if kind == "script":
                script_ids.add(i)
            elif kind == "neutral":
                # Digits, punctuation and spaces belong to every language: without them a target-language
                # text with an unseen run like '?!' or '..."' would tokenize differently.
                neutral_ids.add(i)

    # (b2) ranked: per language, the n best-ranked tokens written in its scripts.
    ranked_ids: set[int] = set()
    rank_of: dict[int, float] = {}
    for rscripts, n in ranked:
        rmatch = ScriptMatcher(rscripts)
        if not rmatch.scripts:
            continue
        rank_of = rank_of or token_ranks(view)
        cands = [
            i
            for tok, i in view.vocab.items()
            if i not in view.added_ids and i in rank_of and i not in skip and classify_token(view, tok, rmatch) == "script"
        ]
        ranked_ids.update(sorted(cands, key=lambda i: (rank_of[i], i))[:n])

    # (c) explicit keep_tokens.
    keep_ids: set[int] = set()
    content_to_id = {t: i for i, t in known.items()}
    for s in keep_tokens:
        i = content_to_id.get(s)
        if i is None:
            i = content_to_id.get(view.surface_to_token(s))
        if i is None:
            raise RecipeError(
                f"vocab.keep_tokens entry {s!r} is not a token of this tokenizer; list a token as the vocabulary "
                "spells it or remove the entry"
            )
        keep_ids.add(i)

    # (d) always: specials, every added token, byte tokens / byte alphabet, the one-character pieces of
    # Unigram/WordPiece vocabularies, ids the model config names.
    extra = set(extra_ids)
    missing = sorted(i for i in extra if i not in known)
    if missing:
        raise ModelError(f"the model config names token ids {missing} that the tokenizer does not have")
    template = {i for i in template_ids if i in known}
    reserved = reserved_ids(view) - extra - keep_ids - template if drop_reserved else set()
    always = (
        (view.special_ids | view.added_ids) - reserved
        | view.byte_ids
        | {i for i in view.alphabet_ids if i not in skip}
        | extra
    )

    probe_ids = {i for i in probe if i in known}
    words = [i for i in words if i in known]
    word_ids = set(words)
    groups = {
        "corpus": corpus,
        "scripts": script_ids,
        "script_probe": probe_ids,
        "ranked": ranked_ids,
        "top_words": word_ids,
        "neutral": neutral_ids,
        "keep_tokens": keep_ids,
        "chat_template": template,
        "always": always,
    }
    kept = set().union(*groups.values())
    cap_dropped = 0
    # (e) closure under merges (BPE; Unigram and WordPiece need none: dropping pieces a text does not use
    # cannot change how that text is segmented).
    added = merge_closure(kept, view.merges)
    if max_size is not None and len(kept) > max_size:
        producers: dict[int, list[tuple[int, int]]] = {}
        for a, b, r in view.merges:
            producers.setdefault(r, []).append((a, b))
        by_count = sorted(corpus, key=lambda i: (-total[i], i))
        by_rank = sorted(ranked_ids - corpus, key=lambda i: (rank_of[i], i))
        # Whole scripts are a guarantee, the word list and the ranks are budgets: they fill what remains.
        script_set = sorted((script_ids | neutral_ids | probe_ids) - corpus)
        by_words = [i for i in dict.fromkeys(words) if i not in corpus]  # the most frequent first
        kept, cap_dropped = _capped(
            [*by_count, *script_set, *by_words, *by_rank], always | keep_ids | template, producers, max_size
        )
        for g in groups.values():  # report what each policy contributed after the cap
            g &= kept
        added = kept - set().union(*groups.values())
    merges_after = sum(1 for _, _, r in view.merges if r in kept)
    only = {
        name: len(ids - set().union(*(o for n, o in groups.items() if n != name)))
        for name, ids in groups.items()
    }
    covered = sum(n for i, n in total.items() if i in kept)
    return Selection(
        kept=sorted(kept),
        vocab_before=size,
        policies={name: len(ids) for name, ids in groups.items()},
        closure_added=len(added),
        scripts=list(matcher.scripts),
        merges_before=len(view.merges),
        merges_after=merges_after,
        only=only,
        cap_dropped=cap_dropped,
        unreachable_skipped=skipped,
        corpus_coverage=round(covered / sum(total.values()), 6) if total else None,
    )
