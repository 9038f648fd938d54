"""calibrate(): text sources -> held-out split, token counts and seeded calibration windows per language.

With ``calibration.translation``, a share of the windows are k-shot translation prompts built from line-aligned
parallel files, after Kim et al. 2024, "Pruning Multilingual Large Language Models for Multilingual Inference"
(Findings of EMNLP 2024): calibrating Wanda on translation demonstrations keeps the large-magnitude features the
model translates with. Each window records its kind ('text' or 'translation') so prune can tell them apart.
"""

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
from converter.recipe import CalibrationConfig, LanguageSpec, TranslationConfig

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


TEXT = "text"  # a window cut from one language's running text
TRANSLATION = "translation"  # a window of k-shot translation prompts


@dataclass
class CalibrationResult:
    languages: dict[str, LanguageData]
    windows: torch.Tensor  # (num_samples, seq_len) int64 token ids, original vocabulary
    window_langs: list[str] = field(default_factory=list)  # language code of each window (translation: target)
    window_kinds: list[str] = field(default_factory=list)  # TEXT or TRANSLATION per window; empty: all TEXT
    contrast: bool = False  # calibration.translation.contrast: Wanda scores with the translation/text contrast
    translation: dict[str, Any] = field(default_factory=dict)  # what the translation windows were built from

    @property
    def kinds(self) -> list[str]:
        """The kind of every window (TEXT when none was recorded)."""
        n = int(self.windows.shape[0]) if self.windows.ndim == 2 else 0
        return list(self.window_kinds) if len(self.window_kinds) == n else [TEXT] * n

    def summary(self) -> dict[str, Any]:
        kinds = self.kinds
        langs = self.window_langs
        out = {
            "num_windows": int(self.windows.shape[0]),
            "seq_len": int(self.windows.shape[1]) if self.windows.ndim == 2 else 0,
            "window_kinds": {TEXT: kinds.count(TEXT), TRANSLATION: kinds.count(TRANSLATION)},
            "languages": {
                code: {
                    "scripts": d.scripts,
                    "calib_docs": len(d.calib_docs),
                    "heldout_docs": len(d.heldout_docs),
                    "calib_tokens": d.num_tokens,
                    "distinct_tokens": len(d.token_counts),
                    "windows": langs.count(code),
                    "translation_windows": sum(
                        1 for lang, k in zip(langs, kinds) if lang == code and k == TRANSLATION
                    ),
                }
                for code, d in self.languages.items()
            },
        }
        if self.translation:
            out["translation"] = {**self.translation, "contrast": self.contrast}
        return out


def _read_text(path: Path) -> str:
    """A UTF-8 text file's contents; an unreadable or non-UTF-8 file is a DataError naming the fix."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not UTF-8 text; convert it to UTF-8.") from None
    except OSError as exc:
        raise DataError(f"'{path}' cannot be read ({exc.strerror}); check the path and permissions.") from None


def read_documents(path: Path) -> list[str]:
    """Documents of one source: .txt/.md -> one per non-empty line; .jsonl -> the 'text' field of each line."""
    raw = _read_text(path)
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


@dataclass
class ParallelText:
    """Line-aligned parallel files: line i of every language is the same sentence."""

    lines: dict[str, list[str]]  # language tag -> every line of its file, stripped (blank lines keep alignment)
    calib: list[int]  # line indices prompts may use: not blank in any file, held out in none
    heldout: list[int]  # line indices held out (the tail split of some file)
    paths: dict[str, Path] = field(default_factory=dict)


def read_lines(path: Path) -> list[str]:
    """Every line of a plain-text file, stripped, blank ones included (their positions are the alignment)."""
    if path.suffix == ".jsonl":
        raise DataError(
            f"calibration.translation.files: '{path}' is .jsonl; parallel files are plain text, one sentence per line."
        )
    raw = _read_text(path)
    return [line.strip() for line in raw.splitlines()]


def read_parallel(
    cfg: TranslationConfig,
    heldout_fraction: float,
    resolve_sources: Callable[[list[str], str], list[Path]],
) -> ParallelText:
    """Read ``cfg.files``, check they are line-aligned and split off the held-out tail.

    The split is :func:`split_heldout`'s on each file's non-blank lines, so when a language's own sources include
    the same file its held-out documents are exactly these lines; a line index held out in any file is held out
    in all. Raises DataError naming the files when their line counts differ or too few pairs remain.
    """
    paths: dict[str, Path] = {}
    for code, pattern in cfg.files.items():
        where = f"calibration.translation.files.{code}"
        found = resolve_sources([pattern], where)
        if len(found) != 1:
            raise DataError(f"{where}: '{pattern}' matches {len(found)} files; name exactly one line-aligned file.")
        paths[code] = found[0]
    lines = {code: read_lines(path) for code, path in paths.items()}
    first = next(iter(lines))
    for code, ls in lines.items():
        if len(ls) != len(lines[first]):
            raise DataError(
                f"calibration.translation.files: '{paths[first]}' has {len(lines[first])} lines but "
                f"'{paths[code]}' has {len(ls)}; parallel files must be line-aligned, with the same number of lines."
            )
    held: set[int] = set()
    for ls in lines.values():
        _, tail = split_heldout([i for i, line in enumerate(ls) if line], heldout_fraction)
        held.update(tail)
    n = len(lines[first])
    calib = [i for i in range(n) if i not in held and all(ls[i] for ls in lines.values())]
    if len(calib) < cfg.shots + 1:
        raise DataError(
            f"calibration.translation.files ({', '.join(str(p) for p in paths.values())}) leave {len(calib)} "
            f"aligned non-blank line pairs before the held-out tail, fewer than shots + 1 = {cfg.shots + 1}; "
            "give longer files or lower calibration.translation.shots."
        )
    return ParallelText(lines=lines, calib=calib, heldout=sorted(held), paths=paths)


def language_name(code: str) -> str:
    """English name of a language tag, as translation prompts write it ('ko' -> 'Korean')."""
    import langcodes

    return langcodes.Language.get(code).display_name("en")


def translation_prompt(pairs: list[tuple[str, str]], source_name: str, target_name: str) -> str:
    """One k-shot prompt: a '<source_name>: s' and a '<target_name>: t' line for every pair (the demonstrations,
    then the pair being scored), each line ending in a newline."""
    return "".join(f"{source_name}: {src}\n{target_name}: {tgt}\n" for src, tgt in pairs)


def translation_windows(
    tokenizer: Any,
    text: ParallelText,
    cfg: TranslationConfig,
    num_windows: int,
    seq_len: int,
    gen: torch.Generator,
) -> tuple[list[torch.Tensor], list[str]]:
    """``num_windows`` windows of ``seq_len`` tokens, split evenly between the directions; returns the windows
    and each one's target language.

    A window is BOS (when the tokenizer prepends one) and then prompts separated by a blank line, tokenized as
    one text and cut to ``seq_len``, so it starts at a prompt's start. Every prompt draws shots + 1 distinct
    pairs from ``text.calib`` (never a held-out line) with ``gen``.
    """
    bos = bos_id(tokenizer)
    body = seq_len - (1 if bos is not None else 0)
    pool = torch.tensor(text.calib, dtype=torch.long)
    windows: list[torch.Tensor] = []
    targets: list[str] = []
    for (src, tgt), n in zip(cfg.pairs, _allocate(num_windows, [1.0] * len(cfg.pairs))):
        src_name, tgt_name = language_name(src), language_name(tgt)
        for _ in range(n):
            prompts: list[str] = []
            ids: list[int] = []
            while len(ids) < body:
                picks = pool[torch.randperm(len(pool), generator=gen)[: cfg.shots + 1]].tolist()
                pairs = [(text.lines[src][i], text.lines[tgt][i]) for i in picks]
                prompts.append(translation_prompt(pairs, src_name, tgt_name))
                ids = tokenizer("\n".join(prompts), add_special_tokens=False)["input_ids"]
            w = torch.tensor(ids[:body], dtype=torch.long)
            if bos is not None:
                w = torch.cat([torch.tensor([bos]), w])
            windows.append(w)
            targets.append(tgt)
    return windows, targets


def calibrate(
    tokenizer: Any,
    languages: list[LanguageSpec],
    cfg: CalibrationConfig,
    seed: int,
    resolve_sources: Callable[[list[str], str], list[Path]],
) -> CalibrationResult:
    """Read every language's sources, split off held-out documents, count tokens and sample windows."""
    tr = cfg.translation
    # parallel files first: a misaligned pair of files fails before the monolingual sources are tokenized
    parallel = read_parallel(tr, cfg.heldout_fraction, resolve_sources) if tr is not None else None
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
            heldout_docs=heldout_docs[
                : cfg.max_heldout_docs
                if lang.keep_vocab or cfg.max_control_heldout_docs is None
                else min(cfg.max_heldout_docs, cfg.max_control_heldout_docs)
            ],
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
    n_translation = tr.num_windows(cfg.num_samples) if tr is not None else 0
    if calib_langs:
        gen = torch.Generator().manual_seed(seed)
        n_text = cfg.num_samples - n_translation
        for lang, n in zip(calib_langs, _allocate(n_text, [lang.weight for lang in calib_langs])):
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
    window_kinds = [TEXT] * len(windows)
    translation: dict[str, Any] = {}
    if tr is not None and parallel is not None:
        gen_tr = torch.Generator().manual_seed(seed)  # its own stream: the text windows do not shift it
        tr_windows, targets = translation_windows(tokenizer, parallel, tr, n_translation, cfg.seq_len, gen_tr)
        windows.extend(tr_windows)
        window_langs.extend(targets)
        window_kinds.extend([TRANSLATION] * len(tr_windows))
        translation = {
            "directions": [f"{s}-{t}" for s, t in tr.pairs],
            "shots": tr.shots,
            "calib_pairs": len(parallel.calib),
            "heldout_lines": len(parallel.heldout),
        }
        log.info(
            "translation: %d of %d windows are %d-shot prompts (%s), from %d line pairs (%d lines held out)%s",
            len(tr_windows),
            len(windows),
            tr.shots,
            ", ".join(translation["directions"]),
            len(parallel.calib),
            len(parallel.heldout),
            "; Wanda scores use the translation/text contrast" if tr.contrast else "",
        )
    stacked = torch.stack(windows) if windows else torch.empty((0, cfg.seq_len), dtype=torch.long)
    return CalibrationResult(
        languages=data,
        windows=stacked,
        window_langs=window_langs,
        window_kinds=window_kinds,
        contrast=bool(tr is not None and tr.contrast),
        translation=translation,
    )
