"""Vocabulary trimming for raw SentencePiece ``.model`` files (ModelProto), beside the tokenizer.json path.

A SentencePiece BPE model has no merge list. It encodes by starting from characters (after normalization) and
repeatedly merging the adjacent pair of symbols whose concatenation is a piece with the highest score, the
leftmost pair on ties (sentencepiece ``bpe_model.cc``). ``SpmBpe`` is that procedure in pure Python.

Why a kept piece's parts can be found from the piece alone: when a piece is a final token of some text, no merge
ever crossed the boundary of its span, and the in-span symbols change only through in-span merges. Each in-span
merge is the best pair of the whole text at its moment, so it is also the best pair inside the span; running the
procedure on the piece's own text therefore applies exactly the same merges in the same order. Every
intermediate symbol is built the same way, so each piece has one derivation, written here as merge triples
(left id, right id, result id) that ``merge_closure`` closes a kept set over. A piece whose own derivation does not
end in the piece itself can never be a token (e.g. a piece 'x▁thez', whose text ends as 'x', '▁the', 'z'): it is
*unreachable* and is never selected. The trimmed model keeps piece scores, so the argument in ``merge_closure`` carries over: on text
the original encodes with kept pieces only, both models apply the same merges and emit the same pieces.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

from converter.errors import ModelError
from converter.languages import normalize_scripts
from converter.recipe import VocabConfig
from converter.vocab.probe import probe_encodings, probe_ids, script_check
from converter.vocab.select import Selection, VocabView, select_ids

__all__ = [
    "SentencePieceTokenizer",
    "SpmBpe",
    "SpmView",
    "check_consistent",
    "count_tokens",
    "read_model_proto",
    "rewrite_model_proto",
    "spm_view",
    "trim_model_file",
]

log = logging.getLogger(__name__)

ModelProto = sentencepiece_model_pb2.ModelProto
_T = ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    _T.NORMAL,
    _T.UNKNOWN,
    _T.CONTROL,
    _T.USER_DEFINED,
    _T.UNUSED,
    _T.BYTE,
)
_MT = sentencepiece_model_pb2.TrainerSpec.ModelType
UNIGRAM, BPE = _MT.UNIGRAM, _MT.BPE
_SPACE = "\u2581"  # '▁', SentencePiece's visible space


def read_model_proto(path: str | os.PathLike) -> ModelProto:
    """Parse a SentencePiece ``.model`` file. Raises ModelError when it is missing or not a SentencePiece model."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read SentencePiece model {path}: {exc.strerror}; check the path") from exc
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, or RuntimeError from the C++ backend
        raise ModelError(
            f"{path} is not a SentencePiece model (protobuf parse failed); point to the tokenizer.model file "
            "that ships with the checkpoint"
        ) from exc
    # Protobuf parses many short byte strings (an empty file, some text) as an empty message.
    if not proto.pieces:
        raise ModelError(
            f"{path} is not a SentencePiece model (it holds no pieces); point to the tokenizer.model file that "
            "ships with the checkpoint"
        )
    return proto


class SpmBpe:
    """SentencePiece's BPE encoding in pure Python, for one ModelProto (``bpe_model.cc`` + the normalizer).

    Used to derive each piece's merges; ``encode`` exists so tests can check the procedure against the library.
    Normalization is implemented for the identity normalizer only (no precompiled_charsmap: Llama 2, Mistral);
    ``merge`` and ``derive`` work on already-normalized text and need no normalizer.
    """

    def __init__(self, proto: ModelProto):
        spec = proto.trainer_spec
        self.byte_fallback = bool(spec.byte_fallback)
        # What the C++ model calls pieces_ (mergeable, looked up by text) and reserved_id_map_ (never merged).
        self.pieces: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.unused: set[int] = set()
        self.scores: list[float] = []
        self.unk_id = -1
        user_defined: list[str] = []
        for i, p in enumerate(proto.pieces):
            self.scores.append(p.score)
            if p.type in (NORMAL, USER_DEFINED, UNUSED):
                self.pieces.setdefault(p.piece, i)
            else:
                self.reserved.setdefault(p.piece, i)
            if p.type == USER_DEFINED:
                user_defined.append(p.piece)
            elif p.type == UNUSED:
                self.unused.add(i)
            elif p.type == UNKNOWN:
                self.unk_id = i
        self.user_defined = frozenset(user_defined)
        self._ud_lengths = sorted({len(u) for u in user_defined}, reverse=True)
        self.normalizer = proto.normalizer_spec
        self._suffix = bool(spec.treat_whitespace_as_suffix)  # the dummy '▁' goes at the end instead

    def split(self, text: str) -> list[tuple[str, bool]]:
        """Initial symbols: the longest user-defined piece at each position (frozen: never merged), else one
        code point."""
        out: list[tuple[str, bool]] = []
        i = 0
        while i < len(text):
            for n in self._ud_lengths:
                if text[i : i + n] in self.user_defined:
                    out.append((text[i : i + n], True))
                    i += n
                    break
            else:
                out.append((text[i], False))
                i += 1
        return out

    def merge(self, text: str) -> tuple[list[str], list[tuple[str, str, str]]]:
        """Run the BPE merges on normalized text: (final symbols, merge steps (left, right, result) in order).

        Final symbols of UNUSED pieces are split back into their parts, as the library does.
        """
        init = self.split(text)
        syms = [s for s, _ in init]
        frozen = [f for _, f in init]
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        if n:
            nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []
        rev: dict[str, tuple[str, str]] = {}

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            cat = syms[left] + syms[right]
            pid = self.pieces.get(cat)
            if pid is None:
                return
            # Highest score first, then the leftmost pair (the C++ comparator); the length marks stale entries.
            heapq.heappush(heap, (-self.scores[pid], left, right, len(cat)))
            if pid in self.unused:
                rev[cat] = (syms[left], syms[right])

        for i in range(1, n):
            push(i - 1, i)
        steps: list[tuple[str, str, str]] = []
        while heap:
            _, left, right, size = heapq.heappop(heap)
            # A pair is stale once either side was merged away or grew; sizes only grow, so the length check is
            # exact (it is the library's test).
            if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
                continue
            steps.append((syms[left], syms[right], syms[left] + syms[right]))
            syms[left] += syms[right]
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])

        final: list[str] = []

        def resegment(w: str) -> None:
            if self.pieces.get(w) in self.unused and w in rev:
                resegment(rev[w][0])
                resegment(rev[w][1])
            else:
                final.append(w)

        for s in syms:
            if s:
                resegment(s)
        return final, steps

    def derive(self, piece: str) -> tuple[bool, list[tuple[str, str, str]]]:
        """(does the piece's own text merge into exactly this piece?, the merge steps on the way)."""
        final, steps = self.merge(piece)
        return final == [piece], steps

    def normalize(self, text: str) -> str:
        """SentencePiece's normalizer for an empty precompiled_charsmap: dummy prefix, extra-whitespace removal
        and '▁' for ' ' as the spec says."""
        spec = self.normalizer
        if spec.precompiled_charsmap:
            raise ModelError(
                "the pure-Python SentencePiece encoder implements only the identity normalizer; this model has a "
                "precompiled_charsmap (use SentencePieceProcessor to encode)"
            )
        if spec.remove_extra_whitespaces:
            text = " ".join(t for t in text.split(" ") if t)
        if not text:
            return ""
        space = _SPACE if spec.escape_whitespaces else " "
        text = text.replace(" ", space)
        if spec.add_dummy_prefix:
            text = text + space if self._suffix else space + text
        return text

    def encode(self, text: str) -> list[str]:
        """Pieces for raw text, as ``SentencePieceProcessor.encode(text, out_type=str)`` gives them."""
        final, _ = self.merge(self.normalize(text))
        out: list[str] = []
        prev_unk = False
        for w in final:
            pid = self.reserved.get(w, self.pieces.get(w, self.unk_id))
            is_unk = pid == self.unk_id
            if is_unk and self.byte_fallback:
                out.extend(f"<0x{b:02X}>" for b in w.encode("utf-8"))
            elif is_unk and prev_unk:
                out[-1] += w  # the library joins a run of unknown pieces into one
            else:
                out.append(w)
            prev_unk = is_unk
        return out


@dataclass
class SpmView(VocabView):
    """A VocabView of a SentencePiece ``.model``, plus the pieces no text can produce (left out of ``merges``)."""

    unreachable_ids: set[int] = field(default_factory=set)


def spm_view(proto: ModelProto) -> SpmView:
    """The VocabView of a SentencePiece BPE or Unigram model (id = piece index).

    BPE merges are the derivation of every mergeable piece from its own text (see the module docstring).
    Raises ModelError for WORD and CHAR models.
    """
    mtype = proto.trainer_spec.model_type
    if mtype not in (BPE, UNIGRAM):
        name = _MT.Name(mtype)
        raise ModelError(
            f"vocabulary trimming supports SentencePiece BPE and Unigram models; this .model is {name}. Set "
            "vocab.enabled: false to convert without trimming."
        )
    vocab: dict[str, int] = {}
    special: set[int] = set()
    added: set[int] = set()
    byte_ids: set[int] = set()
    alphabet: set[int] = set()
    for i, p in enumerate(proto.pieces):
        vocab.setdefault(p.piece, i)
        if p.type in (CONTROL, UNKNOWN):
            special.add(i)
        if p.type in (CONTROL, USER_DEFINED):
            added.add(i)  # USER_DEFINED pieces are matched whole before any merge, like added tokens
        if p.type == BYTE:
            byte_ids.add(i)
        if p.type == NORMAL and len(p.piece) == 1:
            alphabet.add(i)

    merges: list[tuple[int, int, int]] = []
    unreachable: set[int] = set()
    if mtype == BPE:
        bpe = SpmBpe(proto)
        triples: set[tuple[int, int, int]] = set()
        for i, p in enumerate(proto.pieces):
            if p.type not in (NORMAL, UNUSED) or len(p.piece) == 1:
                continue
            reached, steps = bpe.derive(p.piece)
            if not reached:
                unreachable.add(i)
                continue
            triples.update((bpe.pieces[a], bpe.pieces[b], bpe.pieces[r]) for a, b, r in steps)
        # Rank order: the result with the higher score merges first.
        merges = sorted(triples, key=lambda t: (-proto.pieces[t[2]].score, t[2], t[0]))
    else:
        unreachable = _unigram_unreachable(proto)

    return SpmView(
        vocab=vocab,
        id_to_token={i: p.piece for i, p in enumerate(proto.pieces)},
        merges=merges,
        byte_level=False,
        byte_fallback=bool(proto.trainer_spec.byte_fallback),
        ignore_merges=False,
        added_ids=added,
        special_ids=special,
        byte_ids=byte_ids,
        family="BPE" if mtype == BPE else "Unigram",
        alphabet_ids=alphabet if mtype == UNIGRAM else set(),
        scores={i: float(p.score) for i, p in enumerate(proto.pieces)},
        unreachable_ids=unreachable,
    )


def _unigram_unreachable(proto: ModelProto) -> set[int]:
    """Unigram pieces the library never emits: a Viterbi segmentation is optimal on every span, so a piece that
    is not the library's segmentation of its own text (no dummy '▁' prefix added) never appears in any text."""
    probe = ModelProto()
    probe.CopyFrom(proto)
    probe.normalizer_spec.add_dummy_prefix = False
    probe.normalizer_spec.remove_extra_whitespaces = False
    sp = SentencePieceProcessor(model_proto=probe.SerializeToString())
    ids = [i for i, p in enumerate(proto.pieces) if p.type == NORMAL and len(p.piece) > 1]
    got = sp.encode([proto.pieces[i].piece for i in ids])
    return {i for i, g in zip(ids, got, strict=True) if g != [i]}


def rewrite_model_proto(proto: ModelProto, token_map: Sequence[int]) -> ModelProto:
    """A new ModelProto holding the pieces ``token_map`` names (token_map[new_id] = old_id, strictly increasing),
    scores and every other field copied. Raises ModelError when the result would not load or would lose the
    unk/bos/eos/pad piece the trainer spec names."""
    n = len(proto.pieces)
    if any(b <= a for a, b in zip(token_map, token_map[1:])) or (token_map and not 0 <= token_map[0]):
        raise ModelError("token_map must list old piece ids in strictly increasing order")
    if token_map and token_map[-1] >= n:
        raise ModelError(f"token_map names piece id {token_map[-1]} but the .model has only {n} pieces")
    old_to_new = {o: k for k, o in enumerate(token_map)}
    kept_types = Counter(proto.pieces[o].type for o in token_map)
    if kept_types[UNKNOWN] != 1:
        raise ModelError("the trimmed .model must keep exactly one UNKNOWN piece (<unk>); keep its id")
    spec = proto.trainer_spec
    if spec.byte_fallback and kept_types[BYTE] != 256:
        raise ModelError(
            f"the .model uses byte fallback but the trimmed pieces keep {kept_types[BYTE]} of 256 byte pieces; "
            "keep every <0xXX> piece"
        )

    new = ModelProto()
    new.CopyFrom(proto)
    del new.pieces[:]
    new.pieces.extend(proto.pieces[o] for o in token_map)
    new.trainer_spec.vocab_size = len(token_map)
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        old = getattr(spec, name)
        if old < 0:  # disabled
            continue
        if old not in old_to_new:
            raise ModelError(
                f"trainer_spec.{name} is {old} ('{proto.pieces[old].piece if old < n else '?'}') but the trimmed "
                "pieces do not keep it; add it to the kept ids"
            )
        if old_to_new[old] != old or spec.HasField(name):
            setattr(new.trainer_spec, name, old_to_new[old])
    # Its expected outputs describe the old model (and the library checks them at load time). Only some
    # versions of the proto schema have the field.
    if "self_test_data" in ModelProto.DESCRIPTOR.fields_by_name:
        new.ClearField("self_test_data")
    return new


def _processor(proto_or_processor: ModelProto | SentencePieceProcessor) -> SentencePieceProcessor:
    if isinstance(proto_or_processor, SentencePieceProcessor):
        return proto_or_processor
    try:
        return SentencePieceProcessor(model_proto=proto_or_processor.SerializeToString())
    except (RuntimeError, OSError) as exc:
        raise ModelError(
            f"SentencePiece cannot load this model: {exc}; the .model file is inconsistent"
        ) from exc


def count_tokens(
    proto_or_processor: ModelProto | SentencePieceProcessor, texts: Iterable[str]
) -> Counter[int]:
    """Piece id -> how often it occurs in the encodings of ``texts`` (no bos/eos)."""
    sp = _processor(proto_or_processor)
    counts: Counter[int] = Counter()
    for ids in sp.encode(list(texts)):
        counts.update(ids)
    return counts


def check_consistent(proto: ModelProto, tokenizer_json: Mapping[str, Any]) -> str | None:
    """None when piece i of the .model is the token with id i of the tokenizer.json model vocabulary for every
    piece (and the sizes agree); otherwise one sentence saying why not, for a log line when dropping the .model."""
    model = tokenizer_json.get("model") or {}
    raw = model.get("vocab")
    if isinstance(raw, Mapping):
        tj_vocab: dict[str, int] = dict(raw)
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...], id = position
        tj_vocab = {}
        for i, entry in enumerate(raw):
            tj_vocab.setdefault(entry[0], i)
    else:
        return "the tokenizer.json has no model vocabulary to compare the .model with"
    n = len(proto.pieces)
    if len(tj_vocab) != n:
        return f"the .model has {n} pieces but the tokenizer.json model vocabulary has {len(tj_vocab)} tokens"
    for i, p in enumerate(proto.pieces):
        j = tj_vocab.get(p.piece)
        if j != i:
            where = "is missing from the tokenizer.json" if j is None else f"has id {j} in the tokenizer.json"
            return f"piece {i} of the .model ({p.piece!r}) {where}"
    return None


def trim_model_file(
    src_path: str | os.PathLike,
    counts: Mapping[int, int] | Iterable[Mapping[int, int]],
    scripts: Iterable[str],
    cfg: VocabConfig,
    out_path: str | os.PathLike,
    extra_ids: Iterable[int] = (),
) -> tuple[list[int], Selection]:
    """Trim a SentencePiece ``.model`` to the selected pieces and write it atomically to ``out_path``.

    counts: piece id -> count in target-language text (or several such counters). ``scripts`` are used as given,
    cfg.extra_scripts are added (as in ``trim_tokenizer_json``). Every BYTE, CONTROL, UNKNOWN and USER_DEFINED
    piece is kept. Returns (token_map: new id -> old id, the Selection).
    """
    t0 = time.perf_counter()
    proto = read_model_proto(src_path)
    view = spm_view(proto)
    if isinstance(counts, Mapping):
        counts = [counts]
    # Unreachable pieces never occur in an encoding; dropping them from the counts and naming them to the script
    # policy means no policy selects them. (An explicit keep_tokens / extra_ids entry is still honoured.)
    counts = [Counter({i: c for i, c in cnt.items() if i not in view.unreachable_ids}) for cnt in counts]
    all_scripts = normalize_scripts([*scripts, *cfg.extra_scripts])
    encode = _processor(proto).encode  # probe's encode callable: lists of ids, no bos/eos
    probed = probe_encodings(encode, all_scripts) if all_scripts else None
    sel = select_ids(
        None,
        counts,
        all_scripts,
        min_count=cfg.min_count,
        coverage=cfg.coverage,
        max_size=cfg.max_size,
        keep_tokens=cfg.keep_tokens,
        extra_ids=extra_ids,
        unreachable=view.unreachable_ids,
        view=view,
        probe=probe_ids(probed) if probed else (),
    )
    token_map = list(sel.kept)
    new = rewrite_model_proto(proto, token_map)
    data = new.SerializeToString()
    trimmed = _processor(new)  # refuse to write a file the library cannot load
    if all_scripts:
        sel.script_check = script_check(probed, trimmed.encode, token_map, all_scripts)
    from converter.vocab import atomic_write  # the package imports this module lazily: no cycle

    out = Path(out_path)
    atomic_write(out, data)
    log.info(
        "trim_model_file: %s -> %s, %d -> %d pieces in %.1fs",
        src_path,
        out,
        len(proto.pieces),
        len(token_map),
        time.perf_counter() - t0,
    )
    return token_map, sel


class SentencePieceTokenizer:
    """The calls the validation helpers make on a tokenizer (``tok(docs, add_special_tokens)``, ``decode``,
    ``get_vocab``), for a raw SentencePiece model."""

    def __init__(self, path: Path):
        self.sp = _processor(read_model_proto(path))  # a file that is not a .model raises ModelError
        self.chat_template = None

    def __call__(self, docs, add_special_tokens: bool = True):
        ids = self.sp.encode(docs if isinstance(docs, list) else [docs])
        if add_special_tokens and self.sp.bos_id() >= 0:
            ids = [[self.sp.bos_id(), *x] for x in ids]
        return {"input_ids": ids if isinstance(docs, list) else ids[0]}

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def get_vocab(self):
        return {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}

    def __len__(self):
        return self.sp.get_piece_size()
