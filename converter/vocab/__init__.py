"""trim_vocab(): keep the target languages' tokens, rebuild the tokenizer for them, slice embedding/lm_head rows.

select.py decides which ids survive (pure), rebuild.py writes the new tokenizer.json, slice.py cuts the model.
``trim_tokenizer`` runs the same core on a tokenizer directory alone (for ``langconvert vocab``).
Supported: BPE tokenizer.json files (SentencePiece-style with byte fallback, and byte-level). Unigram and
WordPiece tokenizers and raw SentencePiece ``.model`` files raise ModelError naming the model type.
"""

from __future__ import annotations

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

from converter.errors import DataError, ModelError
from converter.languages import language_scripts, normalize_scripts
from converter.recipe import VocabConfig
from converter.vocab.rebuild import rebuild_tokenizer_config, rebuild_tokenizer_json
from converter.vocab.select import Selection, parse_bpe, select_ids
from converter.vocab.slice import SliceStats, config_token_ids, slice_model

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
    closure_added: int = 0  # ids only the merge closure kept
    scripts: list[str] = field(default_factory=list)
    merges_before: int = 0
    merges_after: int = 0
    model_rows_before: int = 0  # embedding rows, padding included
    model_rows_after: int = 0
    tied: bool = False
    embedding_params_before: int = 0  # embedding + untied lm_head
    embedding_params_after: int = 0
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
            "closure_added": self.closure_added,
            "scripts": list(self.scripts),
            "merges_before": self.merges_before,
            "merges_after": self.merges_after,
            "model_rows_before": self.model_rows_before,
            "model_rows_after": self.model_rows_after,
            "tied_embeddings": self.tied,
            "embedding_params_before": self.embedding_params_before,
            "embedding_params_after": self.embedding_params_after,
            "seconds": round(self.seconds, 3),
        }

    def write_token_map(self, path: str | os.PathLike) -> Path:
        """token_map.json: {"new_to_old": [...], "vocab_before": n, "vocab_after": m}."""
        return write_token_map(path, self.token_map, self.vocab_before)


def write_token_map(path: str | os.PathLike, token_map: Sequence[int], vocab_before: int) -> Path:
    """token_map.json: {"vocab_before": n, "vocab_after": m, "new_to_old": [...]}."""
    path = Path(path)
    payload = {"vocab_before": vocab_before, "vocab_after": len(token_map), "new_to_old": list(token_map)}
    _atomic_write(path, json.dumps(payload, separators=(",", ":")))
    return path


class TrimmedTokenizer(NamedTuple):
    tokenizer_json: dict[str, Any]  # the new tokenizer.json dict
    token_map: list[int]  # new id -> old id
    stats: Selection


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def trim_tokenizer_json(
    tj: Mapping[str, Any],
    counts: Mapping[int, int] | Iterable[Mapping[int, int]],
    scripts: Iterable[str],
    cfg: VocabConfig,
    extra_ids: Iterable[int] = (),
) -> TrimmedTokenizer:
    """The shared core: select ids on a tokenizer.json dict and rebuild it. ``scripts`` are used as given
    (callers decide whether cfg.keep_scripts applies); cfg.extra_scripts are always added."""
    view = parse_bpe(tj)
    all_scripts = normalize_scripts([*scripts, *cfg.extra_scripts])
    sel = select_ids(
        tj,
        counts,
        all_scripts,
        min_count=cfg.min_count,
        keep_tokens=cfg.keep_tokens,
        extra_ids=extra_ids,
        view=view,
    )
    new_tj, token_map = rebuild_tokenizer_json(tj, sel.kept)
    return TrimmedTokenizer(new_tj, token_map, sel)


def trim_tokenizer(
    tokenizer_dir: str | os.PathLike,
    counts: Mapping[int, int] | Iterable[Mapping[int, int]],
    scripts: Iterable[str],
    cfg: VocabConfig,
    out_dir: str | os.PathLike | None = None,
    extra_ids: Iterable[int] = (),
) -> TrimmedTokenizer:
    """Trim the tokenizer.json in ``tokenizer_dir``; with ``out_dir``, write a loadable tokenizer directory there
    (tokenizer.json, tokenizer_config.json with renumbered added_tokens_decoder, other files such as
    chat_template.jinja copied, token_map.json)."""
    src = Path(tokenizer_dir)
    tj_path = src / "tokenizer.json"
    if not tj_path.is_file():
        if any(src.glob("*.model")):
            raise ModelError(
                f"{src} holds only a SentencePiece .model file; vocabulary trimming needs a tokenizer.json "
                "(convert it with transformers first)"
            )
        raise DataError(f"no tokenizer.json in {src}")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    result = trim_tokenizer_json(tj, counts, scripts, cfg, extra_ids)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name not in _STALE_FILES:
                shutil.copy2(f, out / f.name)
        _atomic_write(out / "tokenizer.json", json.dumps(result.tokenizer_json, ensure_ascii=False))
        cfg_path = src / "tokenizer_config.json"
        if cfg_path.is_file():
            tc = rebuild_tokenizer_config(json.loads(cfg_path.read_text(encoding="utf-8")), result.token_map)
            _atomic_write(out / "tokenizer_config.json", json.dumps(tc, ensure_ascii=False, indent=2))
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

    new_tj, token_map, sel = trim_tokenizer_json(tj, counts, scripts, cfg, config_token_ids(loaded.model))
    new_tok = _load_trimmed_fast_tokenizer(tok, new_tj, token_map)
    stats: SliceStats = slice_model(loaded.model, loaded.arch, token_map)
    loaded.tokenizer = new_tok

    result = VocabResult(
        enabled=True,
        vocab_before=len(tok),
        vocab_after=len(token_map),
        token_map=token_map,
        policies=sel.policies,
        closure_added=sel.closure_added,
        scripts=sel.scripts,
        merges_before=sel.merges_before,
        merges_after=sel.merges_after,
        model_rows_before=stats.rows_before,
        model_rows_after=stats.rows_after,
        tied=stats.tied,
        embedding_params_before=stats.embedding_params_before,
        embedding_params_after=stats.embedding_params_after,
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        new_tok.save_pretrained(out)
        result.write_token_map(out / "token_map.json")
    result.seconds = time.perf_counter() - t0
    log.info("trim_vocab: done in %.1fs, %s", result.seconds, result.headline)
    return result
