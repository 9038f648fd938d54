"""Language tags -> Unicode scripts, and the scripts a piece of text is written in.

Scripts come from data, never from hand-typed code-point ranges: a tag's likely script from langcodes (CLDR
likely-subtags, e.g. 'ko' -> 'Kore', 'uk' -> 'Cyrl'), and character classification from the ``regex`` module's
Unicode ``\\p{Script=...}`` tables. Script names are Unicode Script property values ('Hangul', 'Latin', 'Han');
ISO 15924 codes ('Hang', 'Latn', 'Hani') are accepted wherever a name is.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import regex

from converter.errors import RecipeError

# ISO 15924 codes that name a *writing system made of several Unicode scripts* (they are not Unicode Script
# property values, so the regex tables do not know them). This is the ISO 15924 definition of those codes.
# Korean ('Kore') is defined as Hangul + Han, but Hanja is occasional in modern Korean and Han would keep every
# Chinese token, so Han is opt-in for Korean (vocab.extra_scripts: [Han]) and 'Kore' maps to Hangul alone.
_COMPOSITE_CODES: dict[str, tuple[str, ...]] = {
    "Kore": ("Hang",),
    "Jpan": ("Hani", "Hira", "Kana"),
    "Hrkt": ("Hira", "Kana"),
    "Hans": ("Hani",),
    "Hant": ("Hani",),
    "Hanb": ("Hani", "Bopo"),
    "Jamo": ("Hang",),
}

# Characters of these scripts are shared by every language (digits, punctuation, spaces, combining marks).
NEUTRAL_SCRIPTS = ("Common", "Inherited")


@functools.lru_cache(maxsize=1)
def _script_aliases() -> dict[int, list[str]]:
    """Script value id -> its names as the regex module's Unicode tables spell them (upper case, no spaces)."""
    try:
        from regex import _regex_core
    except ImportError:  # pragma: no cover - the regex module has shipped this for over a decade
        return {}
    table = _regex_core.PROPERTIES.get("SCRIPT")
    if not table:  # pragma: no cover
        return {}
    aliases: dict[int, list[str]] = {}
    for name, value in table[1].items():
        aliases.setdefault(value, []).append(name)
    return aliases


@functools.cache
def script_name(name: str) -> str:
    """Canonical Unicode script name ('Hangul') for a script name or ISO 15924 code ('hang', 'HANGUL', 'Hang').

    Raises RecipeError for names the Unicode tables do not know.
    """
    key = name.replace(" ", "").replace("_", "").replace("-", "").upper()
    try:
        regex.compile(rf"\p{{Script={key}}}")
    except regex.error:
        raise RecipeError(
            f"'{name}' is not a Unicode script name; use e.g. 'Latin', 'Hangul', 'Han', 'Cyrillic' or an ISO 15924 "
            "code such as 'Hang'"
        ) from None
    for names in _script_aliases().values():
        if key in names:
            # The long name is the longest alias that is not a 4-letter ISO code ('HAN' for Hani, 'LAO' for Laoo).
            best = max([n for n in names if len(n) != 4] or names, key=len)
            return best.capitalize()
    return key.capitalize()


def script_codes(tag: str) -> list[str]:
    """ISO 15924 codes of the scripts a language is written in ('ko' -> ['Hang', 'Hani'], 'en' -> ['Latn'])."""
    import langcodes

    try:
        lang = langcodes.Language.get(tag)
    except Exception as exc:  # langcodes raises several types for garbage
        raise RecipeError(f"'{tag}' is not a BCP-47 language tag; use e.g. 'ko' or 'en'") from exc
    code = lang.script or lang.maximize().script
    if not code:
        raise RecipeError(
            f"no likely script is known for language '{tag}'; add the script to the tag (e.g. '{tag}-Latn') or list "
            "it in vocab.extra_scripts"
        )
    return list(_COMPOSITE_CODES.get(code, (code,)))


def language_scripts(tag: str) -> list[str]:
    """Unicode script names a language is written in ('ko' -> ['Hangul', 'Han'], 'uk' -> ['Cyrillic'])."""
    return [script_name(c) for c in script_codes(tag)]


def normalize_scripts(names: Iterable[str]) -> list[str]:
    """Canonical, de-duplicated script names in first-seen order."""
    out: list[str] = []
    for n in names:
        s = script_name(n)
        if s not in out:
            out.append(s)
    return out


@functools.lru_cache(maxsize=1)
def _classifier() -> regex.Pattern:
    # One alternative per script, each a named group; match.lastgroup names the script of one character.
    names = sorted({max(v, key=len) for v in _script_aliases().values()} - {"UNKNOWN"})
    if not names:  # pragma: no cover
        names = ["COMMON", "INHERITED", "LATIN"]
    groups = "|".join(rf"(?P<{n}>\p{{Script={n}}})" for n in names)
    return regex.compile(groups, regex.DOTALL)


@functools.lru_cache(maxsize=65536)
def char_script(ch: str) -> str:
    """Unicode script name of one character ('한' -> 'Hangul', ' ' -> 'Common'); 'Unknown' when unassigned."""
    m = _classifier().match(ch)
    return script_name(m.lastgroup) if m else "Unknown"


def token_scripts(text: str) -> set[str]:
    """The set of Unicode script names of the characters in ``text`` (Common/Inherited included)."""
    return {char_script(ch) for ch in text}


_NEUTRAL = regex.compile(r"[\p{Script=Common}\p{Script=Inherited}]*+", regex.DOTALL)
_ANY_LETTER = regex.compile(r"\p{L}")


class ScriptMatcher:
    """Is a text written in the target scripts? ``matches(t)``: t contains at least one letter of a target script
    and nothing but characters of target scripts or Common/Inherited (spaces, digits, punctuation, marks).

    Compiled regexes over the whole text, so classifying a 262k vocabulary takes about a second.
    """

    def __init__(self, scripts: Iterable[str]):
        self.scripts = normalize_scripts(scripts)
        if self.scripts:
            target = "".join(rf"\p{{Script={s}}}" for s in self.scripts)
            neutral = "".join(rf"\p{{Script={s}}}" for s in NEUTRAL_SCRIPTS)
            self._allowed = regex.compile(rf"[{target}{neutral}]*+", regex.DOTALL)
            self._letter = regex.compile(rf"(?V1)[\p{{L}}&&[{target}]]")

    def allowed(self, text: str) -> bool:
        """Only characters of the target scripts or Common/Inherited (the empty text too)."""
        return bool(self.scripts) and self._allowed.fullmatch(text) is not None

    def has_letter(self, text: str) -> bool:
        """At least one letter of a target script."""
        return bool(self.scripts) and self._letter.search(text) is not None

    def neutral(self, text: str) -> bool:
        """Only Common/Inherited characters and no letter: digits, punctuation, spaces, symbols ('..."', ' 19')."""
        return bool(text) and _NEUTRAL.fullmatch(text) is not None and _ANY_LETTER.search(text) is None

    def matches(self, text: str) -> bool:
        return bool(text) and self.allowed(text) and self.has_letter(text)
