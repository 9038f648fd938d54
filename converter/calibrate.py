"""calibrate(): text sources -> held-out split, token counts and seeded calibration windows per language."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch

from converter.errors import DataError
from converter.languages import language_scripts
from converter.recipe import CalibrationConfig, LanguageSpec

log = logging.getLogger(__name__)


@dataclass
class LanguageData:
    code: str  # normalized BCP-47 tag
    scripts: list[str]  # Unicode script names for the language, e.g. ["Hangul", "Han"]
    calib_docs: list[str]  # documents calibration and vocabulary counts may use
    heldout_docs: list[str]  # documents only validation sees
    token_counts: Counter  # original-tokenizer id -> count over calib_docs
    calibrate: bool = True
    keep_vocab: bool = True
    script_tokens: bool = True
    top_tokens: int | None = None  # the tokenizer's best-ranked tokens of this language's scripts to keep
    top_words: int | None = None  # the tokens of this language's most frequent words (wordfreq) to keep

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts.values())


@dataclass
class CalibrationResult:
    languages: dict[str, LanguageData]
    windows: torch.Tensor  # (num_samples, seq_len) int64 token ids, original vocabulary
    window_langs: list[str] = field(default_factory=list)  # language code of each window

    def summary(self) -> dict[str, Any]:
        return {
            "num_windows": int(self.windows.shape[0]),
            "seq_len": int(self.windows.shape[1]) if self.windows.ndim == 2 else 0,
            "languages": {
                code: {
                    "scripts": d.scripts,
                    "calib_docs": len(d.calib_docs),
                    "heldout_docs": len(d.heldout_docs),
                    "calib_tokens": d.num_tokens,
                    "distinct_tokens": len(d.token_counts),
                    "windows": self.window_langs.count(code),
                }
                for code, d in self.languages.items()
            },
        }


def read_documents(path: Path) -> list[str]:
    """Documents of one source: .txt/.md -> one per non-empty line; .jsonl -> the 'text' field of each line."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not UTF-8 text; convert it to UTF-8.") from None
    except OSError as exc:
        raise DataError(f"'{path}' cannot be read ({exc.strerror}); check the path and permissions.") from None
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"'{path}' line {n} is not JSON; .jsonl sources need one object per line.") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f"'{path}' line {n} has no string 'text' field; add one or use a .txt file.")
            if text.strip():
                docs.append(text)
        return docs
    return [line.strip() for line in raw.splitlines() if line.strip()]


def split_heldout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Contiguous tail split: the last ``fraction`` of documents is held out (keeps neighbouring lines of one
    article together on one side, unlike a shuffled split)."""
    if len(docs) < 2:
        return docs, []
    n_held = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
    return docs[:-n_held], docs[-n_held:]


def _script_share(docs: list[str], scripts: list[str], sample_chars: int = 20_000) -> float:
    """Share of letters in a sample of ``docs`` that belong to one of ``scripts``."""
    text = "".join(docs)[:sample_chars]
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    pattern = regex.compile("|".join(rf"\p{{Script={s}}}" for s in scripts))
    return sum(1 for ch in letters if pattern.match(ch)) / len(letters)


def _allocate(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of ``total`` windows by weight (sums exactly to total)."""
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _encode_docs(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    if not docs:
        return []
    return tokenizer(docs, add_special_tokens=False)["input_ids"]


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer prepends one by default (Gemma, Llama), else None (Qwen, GPT-2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def calibrate(
    tokenizer: Any,
    languages: list[LanguageSpec],
    cfg: CalibrationConfig,
    seed: int,
    resolve_sources: Callable[[list[str], str], list[Path]],
) -> CalibrationResult:
    """Read every language's sources, split off held-out documents, count tokens and sample windows."""
    data: dict[str, LanguageData] = {}
    streams: dict[str, list[int]] = {}
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for lang in languages:
        where = f"languages[{lang.code}]"
        files = resolve_sources(lang.sources, f"{where}.sources")
        docs_per_file = [(f, read_documents(f)) for f in files]
        calib_docs: list[str] = []
        heldout_docs: list[str] = []
        if lang.heldout:
            held_files = resolve_sources(lang.heldout, f"{where}.heldout")
            for _, docs in docs_per_file:
                calib_docs.extend(docs)
            for f in held_files:
                heldout_docs.extend(read_documents(f))
        else:
            for _, docs in docs_per_file:
                c, h = split_heldout(docs, cfg.heldout_fraction)
                calib_docs.extend(c)
                heldout_docs.extend(h)
        if not calib_docs:
            names = ", ".join(str(f) for f in files)
            raise DataError(f"{where}.sources ({names}) contain no text; give files with at least one non-empty line.")
        if not heldout_docs:
            raise DataError(
                f"{where} has no held-out text (a single document per source); add more lines or set {where}.heldout."
            )
        scripts = language_scripts(lang.code)
        share = _script_share(calib_docs, scripts)
        if share < 0.5:
            log.warning(
                "%s: only %.0f%% of the letters in its sources are in %s script; check that the files are %s text",
                where,
                100 * share,
                "/".join(scripts),
                lang.code,
            )
        encoded = _encode_docs(tokenizer, calib_docs)
        counts: Counter = Counter()
        stream: list[int] = []
        for ids in encoded:
            counts.update(ids)
            stream.extend(ids)
            stream.extend(newline)
        streams[lang.code] = stream
        data[lang.code] = LanguageData(
            code=lang.code,
            scripts=scripts,
            calib_docs=calib_docs,
            heldout_docs=heldout_docs[: cfg.max_heldout_docs],
            token_counts=counts,
            calibrate=lang.calibrate,
            keep_vocab=lang.keep_vocab,
            script_tokens=lang.script_tokens,
            top_tokens=lang.top_tokens,
            top_words=lang.top_words,
        )
        log.info(
            "%s: %d calibration docs (%d tokens), %d held-out docs",
            lang.code,
            len(calib_docs),
            len(stream),
            len(data[lang.code].heldout_docs),
        )

    calib_langs = [lang for lang in languages if lang.calibrate]
    bos = bos_id(tokenizer)
    body = cfg.seq_len - (1 if bos is not None else 0)
    windows: list[torch.Tensor] = []
    window_langs: list[str] = []
    if calib_langs:
        gen = torch.Generator().manual_seed(seed)
        for lang, n in zip(calib_langs, _allocate(cfg.num_samples, [lang.weight for lang in calib_langs])):
            stream = torch.tensor(streams[lang.code], dtype=torch.long)
            if len(stream) < body:
                log.warning(
                    "%s: only %d calibration tokens for windows of %d; repeating the text",
                    lang.code,
                    len(stream),
                    cfg.seq_len,
                )
                stream = stream.repeat(body // max(1, len(stream)) + 1)
            starts = torch.randint(0, len(stream) - body + 1, (n,), generator=gen)
            for s in starts.tolist():
                w = stream[s : s + body]
                if bos is not None:
                    w = torch.cat([torch.tensor([bos]), w])
                windows.append(w)
                window_langs.append(lang.code)
    stacked = torch.stack(windows) if windows else torch.empty((0, cfg.seq_len), dtype=torch.long)
    return CalibrationResult(languages=data, windows=stacked, window_langs=window_langs)
