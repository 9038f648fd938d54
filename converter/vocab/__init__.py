"""trim_vocab(): keep the target languages' tokens, rebuild the tokenizer for them, slice embedding/lm_head rows.

select.py decides which ids survive (pure), rebuild.py writes the new tokenizer.json, slice.py cuts the model.
``trim_tokenizer`` runs the same core on a tokenizer directory alone (for ``langconvert vocab``).
Supported: tokenizer.json files with BPE (SentencePiece-style with byte fallback, and byte-level), Unigram and
WordPiece models; a SentencePiece ``tokenizer.model`` next to them is rewritten to the same kept pieces (or left
out, with a log line saying why, when it does not match tokenizer.json). A directory with only a ``.model`` file
is trimmed by ``converter.vocab.spm``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import regex

from converter.errors import DataError, ModelError
from converter.languages import language_scripts, normalize_scripts
from converter.load import load_tokenizer, portable_tokenizer_config, unmap_clean_checkpoint_pages
from converter.recipe import VocabConfig
from converter.vocab.probe import probe_encodings, probe_ids, script_check, tokenizers_encoder
from converter.vocab.rebuild import rebuild_tokenizer_config, rebuild_tokenizer_json
from converter.vocab.select import Selection, VocabView, parse_tokenizer, select_ids
from converter.vocab.slice import SliceStats, config_token_ids, slice_model
from converter.vocab.words import word_ids

__all__ = ["VocabResult", "TrimmedTokenizer", "trim_vocab", "trim_tokenizer", "trim_tokenizer_json"]

log = logging.getLogger(__name__)

# Files a trimmed tokenizer directory must not carry over: they describe the untrimmed vocabulary.
_STALE_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
}


@dataclass
class VocabResult:
    enabled: bool
    vocab_before: int  # tokenizer ids before (added tokens included)
    vocab_after: int
    token_map: list[int]  # new id -> old id, strictly increasing
    policies: dict[str, int] = field(default_factory=dict)  # policy -> ids it selected (they overlap)
    only: dict[str, int] = field(default_factory=dict)  # policy -> ids no other policy selected
    cap_dropped: int = 0
    unreachable_skipped: int = 0
    corpus_coverage: float | None = None
    closure_added: int = 0  # ids only the merge closure kept
    scripts: list[str] = field(default_factory=list)
    merges_before: int = 0
    merges_after: int = 0
    model_rows_before: int = 0  # embedding rows, padding included
    model_rows_after: int = 0
    tied: bool = False
    embedding_params_before: int = 0  # embedding + untied lm_head
    embedding_params_after: int = 0
    script_check: dict[str, Any] | None = None  # probe.script_check: every code point of the kept scripts
    seconds: float = 0.0

    @property
    def trimmed(self) -> bool:
        """Did the stage change the vocabulary (False when disabled: token_map is the identity)."""
        return self.enabled

    @property
    def headline(self) -> str:
        if not self.enabled:
            return f"vocab {self.vocab_before} kept (trimming disabled)"
        share = 100.0 * self.vocab_after / max(self.vocab_before, 1)
        return f"vocab {self.vocab_before} -> {self.vocab_after} ({share:.1f}%)"

    def summary(self) -> dict[str, Any]:
        return {
            "headline": self.headline,
            "enabled": self.enabled,
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
            "model_rows_before": self.model_rows_before,
            "model_rows_after": self.model_rows_after,
            "tied_embeddings": self.tied,
            "embedding_params_before": self.embedding_params_before,
            "embedding_params_after": self.embedding_params_after,
            "script_check": self.script_check,
            "seconds": round(self.seconds, 3),
        }

    def write_token_map(self, path: str | os.PathLike) -> Path:
        """token_map.json: {"new_to_old": [...], "vocab_before": n, "vocab_after": m}."""
        return write_token_map(path, self.token_map, self.vocab_before)


def write_token_map(path: str | os.PathLike, token_map: Sequence[int], vocab_before: int) -> Path:
    """token_map.json: {"vocab_before": n, "vocab_after": m, "new_to_old": [...]}."""
    path = Path(path)
    payload = {"vocab_before": vocab_before, "vocab_after": len(token_map), "new_to_old": list(token_map)}
    atomic_write(path, json.dumps(payload, separators=(",", ":")))
    return path


class TrimmedTokenizer(NamedTuple):
    tokenizer_json: dict[str, Any]  # the new tokenizer.json dict
    token_map: list[int]  # new id -> old id
    stats: Selection


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary sibling, so no half-written file appears."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


class Unreachable:
    """Unigram / WordPiece pieces the original tokenizer can never emit; keeping them would only waste rows.
    A container: ``i in Unreachable(...)`` checks piece ``i`` on first use (selection only asks about candidates).

    Unigram: a piece is emitted in some text only if it is the best segmentation of its own characters (a
    Viterbi path is optimal on every span), so a piece the model splits when given alone is unreachable.
    WordPiece: a piece whose text the normalizer changes or the pre-tokenizer splits (uppercase letters in an
    uncased vocabulary, punctuation inside a word, '##!' since punctuation is always a word of its own) never
    reaches the model. BPE: handled by the merge structure (nothing is reported here).
    """

    def __init__(self, tj: Mapping[str, Any], view: VocabView):
        self.view = view
        self._cache: dict[int, bool] = {}
        self._tok = None
        if view.family in ("Unigram", "WordPiece"):
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(json.dumps(tj))
        keep = view.added_ids | view.special_ids | view.byte_ids
        if view.family == "Unigram":
            keep = keep | view.alphabet_ids  # one character is its own best segmentation
        self._keep = keep

    def __contains__(self, i: object) -> bool:
        if self._tok is None or not isinstance(i, int) or i in self._keep or i not in self.view.id_to_token:
            return False
        hit = self._cache.get(i)
        if hit is None:
            hit = self._cache[i] = self._check(self.view.id_to_token[i], i)
        return hit

    def _check(self, piece: str, i: int) -> bool:
        tok = self._tok
        if self.view.family == "Unigram":
            pieces = tok.model.tokenize(piece)
            return len(pieces) != 1 or pieces[0].id != i
        prefix = self.view.continuing_subword_prefix
        # A continuation piece must survive inside a word: 'a' + body stays one word ('##!' and '##中' do not).
        cont = bool(prefix) and piece.startswith(prefix) and len(piece) > len(prefix)
        word = "a" + piece[len(prefix) :] if cont else piece
        text = tok.normalizer.normalize_str(word) if tok.normalizer is not None else word
        words = (
            [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
            if tok.pre_tokenizer is not None
            else [text]
        )
        return words != [word]


_SAMPLE_CONVERSATIONS = (
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": ""}],
)


def chat_template_texts(tokenizer: Any) -> list[str]:
    """The text a chat template adds around messages: conversations with empty messages rendered (with and
    without the generation prompt; templates that reject a role are skipped) plus the template's quoted string
    literals. Empty when the tokenizer has no chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    texts: list[str] = []
    for conv in _SAMPLE_CONVERSATIONS:
        for gen in (False, True):
            try:
                texts.append(tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen))
            except Exception as exc:  # noqa: BLE001 - templates raise their own errors for unsupported roles
                log.debug("chat template rejected a sample conversation: %s", exc)
    templates = template.values() if isinstance(template, dict) else [template]
    for t in templates:
        texts.extend(m.group(2) for m in regex.finditer(r"(['\"])((?:(?!\1)[^\\\n])+)\1", t))
    return [t for t in texts if t]


def chat_template_ids(tokenizer: Any) -> set[int]:
    """Ids of the text the chat template itself writes (see ``chat_template_texts``), tokenized as the original
    tokenizer does; kept so a rendered conversation keeps its exact token sequence."""
    texts = chat_template_texts(tokenizer)
    if not texts:
        return set()
    return {i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids}


def trim_tokenizer_json(
    tj: Mapping[str, Any],
    counts: Mapping[int, int] | Iterable[Mapping[int, int]],
    scripts: Iterable[str],
    cfg: VocabConfig,
    extra_ids: Iterable[int] = (),
    template_ids: Iterable[int] = (),
    ranked: Iterable[tuple[Iterable[str], int]] = (),
    words: Iterable[tuple[str, int]] = (),
    original: Any = None,
) -> TrimmedTokenizer:
    """The shared core: select ids on a tokenizer.json dict, rebuild it, and run the exhaustive script check.

    ``scripts`` are used as given (callers decide whether cfg.keep_scripts applies); cfg.extra_scripts are always
    added. ``ranked``: (scripts, n) per language with top_tokens; ``words``: (language, n) per language with
    top_words. ``original``: the ``tokenizers.Tokenizer`` of ``tj`` when the caller has it (else built from tj).
    """
    from tokenizers import Tokenizer

    view = parse_tokenizer(tj)
    all_scripts = normalize_scripts([*scripts, *cfg.extra_scripts])
    words = list(words)
    if original is None and (all_scripts or words):
        original = Tokenizer.from_str(json.dumps(tj))
    encode = tokenizers_encoder(original) if original is not None else None
    probed = probe_encodings(encode, all_scripts) if all_scripts else None
    word_list: list[int] = []
    for lang, n in words:
        word_list.extend(word_ids(encode, lang, n))
    sel = select_ids(
        tj,
        counts,
        all_scripts,
        min_count=cfg.min_count,
        coverage=cfg.coverage,
        max_size=cfg.max_size,
        keep_tokens=cfg.keep_tokens,
        extra_ids=extra_ids,
        template_ids=template_ids,
        unreachable=Unreachable(tj, view),
        view=view,
        ranked=[(normalize_scripts(list(sc)), n) for sc, n in ranked],
        probe=probe_ids(probed) if probed else (),
        words=word_list,
        drop_reserved=cfg.drop_reserved,
    )
    new_tj, token_map = rebuild_tokenizer_json(tj, sel.kept)
    check = None
    if all_scripts:
        trimmed = tokenizers_encoder(Tokenizer.from_str(json.dumps(new_tj)))
        check = script_check(probed, trimmed, token_map, all_scripts)
        log.info(
            "exhaustive script check: %d of %d strings (every code point of %s) tokenize differently",
            check["differ"],
            check["strings"],
            ", ".join(all_scripts),
        )
    sel.script_check = check
    return TrimmedTokenizer(new_tj, token_map, sel)


def rewrite_sentencepiece(
    model_path: Path, tj: Mapping[str, Any], token_map: Sequence[int], dest: Path
) -> str | None:
    """Write ``dest``: the SentencePiece ``.model`` at ``model_path`` cut to the pieces token_map keeps, when it
    matches ``tj`` piece for piece. Returns None when written, else the reason it was left out."""
    from converter.vocab import spm

    try:
        proto = spm.read_model_proto(model_path)
    except ModelError as exc:
        return str(exc)
    reason = spm.check_consistent(proto, tj)
    if reason is not None:
        return reason
    # token_map is increasing, so the kept pieces come first and keep their new ids; ids past the last piece
    # are tokens tokenizer.json adds on top of the .model.
    kept = [i for i in token_map if i < len(proto.pieces)]
    atomic_write(dest, spm.rewrite_model_proto(proto, kept).SerializeToString())
    return None


def _directory_template_ids(src: Path) -> set[int]:
    """chat_template_ids for a tokenizer directory; loads it with transformers only when it has a template."""
    cfg_path = src / "tokenizer_config.json"
    has_template = (src / "chat_template.jinja").is_file() or (
        cfg_path.is_file() and "chat_template" in json.loads(cfg_path.read_text(encoding="utf-8"))
    )
    if not has_template:
        return set()
    return chat_template_ids(load_tokenizer(src))


def trim_tokenizer(
    tokenizer_dir: str | os.PathLike,
    counts: Mapping[int, int] | Iterable[Mapping[int, int]],
    scripts: Iterable[str],
    cfg: VocabConfig,
    out_dir: str | os.PathLike | None = None,
    extra_ids: Iterable[int] = (),
    template_ids: Iterable[int] | None = None,
) -> TrimmedTokenizer:
    """Trim the tokenizer in ``tokenizer_dir``; with ``out_dir``, write a loadable tokenizer directory there
    (tokenizer.json, tokenizer_config.json with renumbered added_tokens_decoder, tokenizer.model rewritten to the
    same pieces, other files such as chat_template.jinja copied, token_map.json).

    A directory with only a SentencePiece ``.model`` is trimmed through ``converter.vocab.spm`` (then
    ``tokenizer_json`` of the result is None). template_ids None: found from the directory's chat template.
    """
    src = Path(tokenizer_dir)
    tj_path = src / "tokenizer.json"
    if not tj_path.is_file():
        models = sorted(src.glob("*.model"))
        if not models:
            raise DataError(
                f"'{src}' has no tokenizer.json or SentencePiece .model file; point at a tokenizer directory"
            )
        from converter.vocab import spm

        with tempfile.TemporaryDirectory(prefix="langconvert-spm-") as scratch:
            out = Path(out_dir) if out_dir is not None else Path(scratch)
            token_map, sel = spm.trim_model_file(
                models[0], counts, scripts, cfg, out / models[0].name, extra_ids
            )
            if out_dir is not None:
                write_token_map(out / "token_map.json", token_map, sel.vocab_before)
        return TrimmedTokenizer(None, token_map, sel)  # type: ignore[arg-type]
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if template_ids is None:
        template_ids = _directory_template_ids(src)
    result = trim_tokenizer_json(tj, counts, scripts, cfg, extra_ids, template_ids)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name not in _STALE_FILES:
                shutil.copy2(f, out / f.name)
        atomic_write(out / "tokenizer.json", json.dumps(result.tokenizer_json, ensure_ascii=False))
        # Always written, in a form transformers 4.57 and 5 both load (a tokenizer.json alone would leave the
        # class to be guessed from the folder's name).
        cfg_path = src / "tokenizer_config.json"
        tc = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        tc = portable_tokenizer_config(rebuild_tokenizer_config(tc, result.token_map), (src / "config.json").is_file())
        atomic_write(out / "tokenizer_config.json", json.dumps(tc, ensure_ascii=False, indent=2))
        if (src / "tokenizer.model").is_file():
            why = rewrite_sentencepiece(
                src / "tokenizer.model", tj, result.token_map, out / "tokenizer.model"
            )
            if why is not None:
                log.warning("tokenizer.model left out of the trimmed tokenizer: %s", why)
        write_token_map(out / "token_map.json", result.token_map, result.stats.vocab_before)
    return result


def _load_trimmed_fast_tokenizer(original: Any, new_tj: Mapping[str, Any], token_map: Sequence[int]) -> Any:
    """A PreTrainedTokenizerFast for the new tokenizer.json with the original's settings (special-token
    attributes, chat template, model_max_length, padding side, add_bos_token, ...): save the original, swap
    tokenizer.json, renumber tokenizer_config.json, load it back."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="langconvert-tok-") as tmp:
        d = Path(tmp)
        original.save_pretrained(d)
        for name in _STALE_FILES - {"tokenizer.json", "tokenizer_config.json"}:
            (d / name).unlink(missing_ok=True)
        (d / "tokenizer.json").write_text(json.dumps(new_tj, ensure_ascii=False), encoding="utf-8")
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            tc = rebuild_tokenizer_config(json.loads(cfg_path.read_text(encoding="utf-8")), token_map)
            cfg_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(d, use_fast=True)
    if len(tok) != len(token_map):
        raise ModelError(
            f"the rebuilt tokenizer has {len(tok)} tokens, expected {len(token_map)}; the tokenizer files are "
            "inconsistent"
        )
    return tok


def _identity(loaded: Any) -> VocabResult:
    n = len(loaded.tokenizer)
    rows = loaded.arch.input_embeddings().weight.shape[0]
    return VocabResult(
        enabled=False,
        vocab_before=n,
        vocab_after=n,
        token_map=list(range(n)),
        model_rows_before=rows,
        model_rows_after=rows,
        tied=loaded.arch.is_tied(),
    )


def trim_vocab(
    loaded: Any, calib: Any, cfg: VocabConfig, out_dir: str | os.PathLike | None = None
) -> VocabResult:
    """Trim ``loaded``'s tokenizer and model in place to the tokens of the calibration languages with keep_vocab.

    Replaces ``loaded.tokenizer`` (``loaded.original_tokenizer`` stays untouched). With ``out_dir``, the trimmed
    tokenizer and token_map.json are written there. cfg.enabled False: identity result, nothing touched.
    """
    if not cfg.enabled:
        return _identity(loaded)
    t0 = time.perf_counter()
    tok = loaded.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ModelError("vocabulary trimming needs a fast tokenizer backed by tokenizer.json")
    tj = json.loads(tok.backend_tokenizer.to_str())
    kept_langs = [d for d in calib.languages.values() if d.keep_vocab]
    counts = [d.token_counts for d in kept_langs]
    scripts: list[str] = []
    if cfg.keep_scripts:
        for d in kept_langs:
            if not getattr(d, "script_tokens", True):
                continue
            scripts.extend(d.scripts or language_scripts(d.code))
    log.info("trim_vocab: start (%d tokens, languages %s)", len(tok), ", ".join(d.code for d in kept_langs))

    ranked = [(d.scripts or language_scripts(d.code), d.top_tokens) for d in kept_langs if d.top_tokens]
    words = [(d.code, d.top_words) for d in kept_langs if getattr(d, "top_words", None)]
    new_tj, token_map, sel = trim_tokenizer_json(
        tj,
        counts,
        scripts,
        cfg,
        config_token_ids(loaded.model),
        chat_template_ids(tok),
        ranked,
        words,
        original=tok.backend_tokenizer,
    )
    vocab_file = getattr(tok, "vocab_file", None)
    spm_file = Path(vocab_file) if vocab_file and str(vocab_file).endswith(".model") else None
    if out_dir is None or spm_file is None or not spm_file.is_file():
        tj = None  # only the SentencePiece rewrite reads it again
    new_tok = _load_trimmed_fast_tokenizer(tok, new_tj, token_map)
    del new_tj
    gc.collect()  # the parsed tokenizer.json (hundreds of MB of Python objects for a 262k vocabulary) goes first
    # the original rows are read from the mapped checkpoint a chunk at a time, and their pages given back as it
    # goes, instead of all of a 262k-row embedding becoming resident beside the kept copy
    stats: SliceStats = slice_model(loaded.model, loaded.arch, token_map, release=unmap_clean_checkpoint_pages)
    loaded.tokenizer = new_tok

    result = VocabResult(
        enabled=True,
        vocab_before=len(tok),
        vocab_after=len(token_map),
        token_map=token_map,
        policies=sel.policies,
        only=sel.only,
        cap_dropped=sel.cap_dropped,
        unreachable_skipped=sel.unreachable_skipped,
        corpus_coverage=sel.corpus_coverage,
        closure_added=sel.closure_added,
        scripts=sel.scripts,
        merges_before=sel.merges_before,
        merges_after=sel.merges_after,
        model_rows_before=stats.rows_before,
        model_rows_after=stats.rows_after,
        tied=stats.tied,
        embedding_params_before=stats.embedding_params_before,
        embedding_params_after=stats.embedding_params_after,
        script_check=sel.script_check,
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        new_tok.save_pretrained(out)
        if tj is not None:
            why = rewrite_sentencepiece(spm_file, tj, token_map, out / "tokenizer.model")
            if why is not None:
                log.warning("tokenizer.model left out of the trimmed tokenizer: %s", why)
        result.write_token_map(out / "token_map.json")
    result.seconds = time.perf_counter() - t0
    log.debug("trim_vocab: done in %.1fs, %s", result.seconds, result.headline)  # the manifest logs the stage
    return result
