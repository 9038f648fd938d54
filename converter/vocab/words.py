"""The top_words policy: the tokens a language's most frequent words are spelled with, from a maintained list.

A language that shares its script with many others (English in Latin) cannot keep the whole script, and its
calibration corpus is too small to cover what users will write. The word list of ``wordfreq`` (frequencies
pooled from Wikipedia, subtitles, news, books, web text and social media; about 40 languages) names the words
that matter: each of the ``n`` most frequent words is tokenized by the original tokenizer as it appears in
running text (see ``spellings``), and each id is ranked by the summed frequency of the words spelled with it,
so a ``vocab.max_size`` cap drops the tokens of the rarest words first.
"""

from __future__ import annotations

import functools

from converter.errors import RecipeError
from converter.vocab.probe import Encode, encode_all


def _base(tag: str) -> str:
    return tag.split("-")[0].lower()


@functools.lru_cache(maxsize=1)
def word_list_languages() -> frozenset[str]:
    import wordfreq

    return frozenset(wordfreq.available_languages(wordlist="best"))


def check_language(tag: str) -> None:
    """RecipeError when wordfreq has no word list for the language tag."""
    if _base(tag) not in word_list_languages():
        raise RecipeError(
            f"top_words: the wordfreq package has no word list for language '{tag}'; use top_tokens for it, or "
            f"one of: {', '.join(sorted(word_list_languages()))}."
        )


def top_words(tag: str, n: int) -> list[tuple[str, float]]:
    """The ``n`` most frequent words of a language with their frequencies, most frequent first."""
    import wordfreq

    check_language(tag)
    lang = _base(tag)
    return [(w, wordfreq.word_frequency(w, lang, wordlist="best")) for w in wordfreq.top_n_list(lang, n, wordlist="best")]


def spellings(word: str) -> list[tuple[str, float]]:
    """How a word appears in running text, each with a weight: after a space as listed (1), Capitalized after a
    space (0.4: names and titles) and at a line start (0.15). The list is case-folded, so these weights stand in
    for how often a word is capitalized; they were chosen by measuring held-out English news and Tatoeba
    sentences tokenized as before under a fixed vocabulary size (benchmarks/RESULTS.md, "Spelling weights")."""
    cap = word[:1].upper() + word[1:]
    out = {" " + word: 1.0}
    out.setdefault(" " + cap, 0.4)
    out.setdefault(cap, 0.15)
    return list(out.items())


RUN_LENGTHS = range(2, 17)  # letter runs tokenized by letter_runs: "oo" to 16 of a letter
RUN_RANK = 1000  # letter runs weigh as much as the list's 1,000th word


def letter_runs(words: list[str]) -> list[str]:
    """One letter repeated 2 to 16 times, for every letter of the word list, lower and upper case, alone and
    after a space: the spellings of elongated words ("nooooo", "YESSSS") and Roman numerals ("II", "III") that
    no word list holds. A tokenizer's run tokens ('OO', 'OOOO', 'ĠIII') are few (204 ASCII ones in Gemma 3's
    262,144), and without them one elongated word falls apart into single letters. Only letters with case
    (Latin, Cyrillic, Greek, ...): a syllabary or Han would give thousands of characters and no such runs."""
    cased = {c for w in words for c in w if c.isalpha() and c.lower() != c.upper()}
    letters = sorted(cased | {c.upper() for c in cased} | {c.lower() for c in cased})
    return [pre + c * k for c in letters for k in RUN_LENGTHS for pre in ("", " ")]


def word_ids(encode: Encode, tag: str, n: int) -> list[int]:
    """Ids of the ``n`` most frequent words' spellings, each id once, ordered by the estimated frequency of the
    id in running text (the sum over spellings of word frequency x spelling share x occurrences in it), and of
    the language's letter runs (``letter_runs``), which weigh as much as the list's RUN_RANK-th word."""
    texts: list[str] = []
    weights: list[float] = []
    listed = top_words(tag, n)
    for w, f in listed:
        for text, share in spellings(w):
            texts.append(text)
            weights.append(f * share)
    if listed:
        run_weight = listed[min(RUN_RANK, len(listed)) - 1][1]
        runs = letter_runs([w for w, _f in listed])
        texts += runs
        weights += [run_weight] * len(runs)
    score: dict[int, float] = {}
    for ids, wt in zip(encode_all(encode, texts), weights, strict=True):
        for i in ids:
            score[i] = score.get(i, 0.0) + wt
    return sorted(score, key=lambda i: (-score[i], i))
