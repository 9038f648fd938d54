"""The exhaustive script check: every assigned code point of a kept script, in three contexts, tokenizes the same.

A held-out corpus only shows the characters it happens to contain; a Hangul syllable such as 궚 that is absent
from it can still be split by a dropped token. So a trim is checked against every code point the Unicode tables
assign to each kept script (``regex``'s ``\\p{Script=...}``; unassigned code points belong to no script), each
written alone, after a space, and between its two neighbours in code-point order (so byte-level merges across a
character boundary are exercised too). The same strings, tokenized by the original tokenizer, also feed the
selection (``probe_ids``): for BPE the merge closure then makes the check hold by construction, for Unigram and
WordPiece keeping every piece a segmentation used keeps that segmentation.

Pure functions over an ``encode`` callable (list of strings -> list of id lists, no special tokens), so the same
code serves tokenizer.json files, transformers tokenizers and raw SentencePiece models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import regex

from converter.languages import normalize_scripts

Encode = Callable[[list[str]], list[list[int]]]

CONTEXTS = ("alone", "after a space", "between neighbours")
_EXAMPLES = 5


@functools.lru_cache(maxsize=1)
def _every_code_point() -> str:
    """All Unicode scalar values (surrogates excluded) as one string, for scanning with script regexes."""
    return "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)


@functools.lru_cache(maxsize=64)
def script_code_points(script: str) -> str:
    """Every assigned code point of one Unicode script, in code-point order."""
    (name,) = normalize_scripts([script])
    return "".join(regex.findall(rf"\p{{Script={name}}}", _every_code_point()))


def probe_strings(script: str) -> list[str]:
    """For each code point of the script: the character alone, after a space, between its two neighbours."""
    cps = script_code_points(script)
    n = len(cps)
    alone = list(cps)
    spaced = [" " + c for c in cps]
    between = [cps[(k - 1) % n] + c + cps[(k + 1) % n] for k, c in enumerate(cps)]
    return alone + spaced + between


def encode_all(encode: Encode, texts: list[str], batch: int = 20000) -> list[list[int]]:
    """``encode`` over ``texts`` in batches (bounded memory for the 300k strings of Han)."""
    out: list[list[int]] = []
    for k in range(0, len(texts), batch):
        out.extend(encode(texts[k : k + batch]))
    return out


def probe_encodings(encode: Encode, scripts: Iterable[str]) -> dict[str, list[list[int]]]:
    """The tokenizer's ids for every probe string, per script (in ``probe_strings`` order)."""
    return {s: encode_all(encode, probe_strings(s)) for s in normalize_scripts(scripts)}


def probe_ids(encodings: dict[str, list[list[int]]]) -> set[int]:
    """Every id in ``probe_encodings``' result: what the selection keeps so the check can hold."""
    return {i for seqs in encodings.values() for seq in seqs for i in seq}


def script_check(
    original: Encode | dict[str, list[list[int]]],
    trimmed: Encode,
    token_map: Sequence[int],
    scripts: Iterable[str],
) -> dict[str, Any]:
    """Compare both tokenizers on every probe string of every script. ``token_map``: new id -> old id;
    ``original``: the original tokenizer's encode, or its ``probe_encodings`` when already computed.

    Returns {"passed", "strings", "differ", "scripts": {name: {"code_points", "strings", "differ",
    "by_context": {context: differ}, "examples": [...]}}}.
    """
    scripts = normalize_scripts(scripts)
    wanted = original if isinstance(original, dict) else probe_encodings(original, scripts)
    out: dict[str, Any] = {"scripts": {}}
    total = bad = 0
    for s in scripts:
        texts = probe_strings(s)
        n = len(texts) // len(CONTEXTS)
        want = wanted[s]
        got = encode_all(trimmed, texts)
        by_context = dict.fromkeys(CONTEXTS, 0)
        examples: list[str] = []
        for k, (t, w, g) in enumerate(zip(texts, want, got, strict=True)):
            if [token_map[i] for i in g] != w:
                by_context[CONTEXTS[k // n]] += 1
                if len(examples) < _EXAMPLES:
                    examples.append(t)
        differ = sum(by_context.values())
        out["scripts"][s] = {
            "code_points": n,
            "strings": len(texts),
            "differ": differ,
            "by_context": by_context,
            "examples": examples,
        }
        total += len(texts)
        bad += differ
    out.update(passed=bad == 0, strings=total, differ=bad)
    return out


def tokenizers_encoder(tok: Any) -> Encode:
    """``encode`` for a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its backend)."""
    backend = getattr(tok, "backend_tokenizer", tok)

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    return encode
