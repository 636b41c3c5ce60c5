"""Text helpers shared by the data tools: normalisation, script-based language, units, shingles, row texts.

Chinese (and Japanese) text has no spaces between words, so a "unit" is a word for space-separated text and one
character for CJK text; n-grams and shingles are built over units, so `用 Python 写代码` gives the units
[用, python, 写, 代, 码].
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata

from tuneforge.data.types import Example

_SPACE = re.compile(r"\s+")
# A CJK ideograph or kana/hangul syllable is one unit; any other run of letters/digits is one word.
_CJK = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]"
# (A word stops at a CJK character: `\w` matches those too, so "用Python写代码" would otherwise give one word.)
_UNIT = re.compile(_CJK + r"|(?:(?!" + _CJK + r")[^\W_])+")
_CJK_UNIT = re.compile(_CJK)

# Scripts told apart by Unicode block; `en` stands for any Latin-script text (script alone cannot tell English
# from French), which is what a zh/en corpus needs. Each counts units of about one word, so the scripts weigh
# fairly: a character for Chinese and Japanese (no spaces between words), a run of letters for the others. Counted
# per letter instead, a Chinese answer with a short code snippet or English glosses ("寒冷(cold)") reads as English.
_SCRIPTS = (
    ("ja", re.compile(r"[\u3040-\u30ff]")),
    ("ko", re.compile(r"[\uac00-\ud7af]+")),
    ("zh", re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")),
    ("ru", re.compile(r"[\u0400-\u04ff]+")),
    ("ar", re.compile(r"[\u0600-\u06ff]+")),
    ("en", re.compile(r"[A-Za-z\u00c0-\u024f]+")),
)

# What `language` can answer: the `--languages` a filter may ask for ("none": text without letters).
LANGUAGES = (*(name for name, _ in _SCRIPTS), "none")
# Names users type for a script's code (a locale, the language's name, a Latin-script language): for the error.
LANGUAGE_ALIASES = {"cn": "zh", "chinese": "zh", "zh-cn": "zh", "zh_cn": "zh", "zh-tw": "zh", "zh_tw": "zh",
                    "zh-hans": "zh", "zh-hant": "zh", "english": "en", "japanese": "ja", "jp": "ja", "korean": "ko",
                    "kr": "ko", "russian": "ru", "arabic": "ar", "fr": "en", "de": "en", "es": "en", "it": "en",
                    "pt": "en", "nl": "en", "latin": "en"}

_CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.S)  # a fenced markdown code block (to the end when unclosed)


@functools.lru_cache(maxsize=256)  # one row's texts are normalised by several rules; rows differ, so keep it small
def normalize(text: str) -> str:
    """NFKC, lowercase, whitespace collapsed: the form compared for exact duplicates."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def language(text: str) -> str:
    """The script that most word-sized units of `text` belong to (zh, en, ja, ko, ru, ar; see _SCRIPTS), or `none`
    without letters. Japanese text mixes kana with Han characters, so kana make it `ja` when they are a tenth of the
    units."""
    prose = _CODE_BLOCK.sub(" ", text)  # code is written in Latin letters whatever the language of the row
    counts = {name: len(pattern.findall(prose if prose.strip() else text)) for name, pattern in _SCRIPTS}
    total = sum(counts.values())
    if total == 0:
        return "none"
    if counts["ja"] >= 0.1 * total:
        return "ja"
    return max(counts, key=lambda name: counts[name])


@functools.lru_cache(maxsize=256)
def units(text: str) -> tuple[str, ...]:
    """Words of the normalised text, with every CJK character a word of its own."""
    return tuple(_UNIT.findall(normalize(text)))


def prose_units(text: str) -> list[str]:
    """The units that are words of prose: CJK characters and alphabetic words of two or more letters. Code, tables
    and notation (a regex, a truth table of T and F, a sequence of notes) are mostly symbols, digits and single
    letters, whose repeats are their structure, not a degenerate loop."""
    return [u for u in units(text) if _CJK_UNIT.fullmatch(u) or (len(u) > 1 and u.isalpha())]


def is_cjk(char: str) -> bool:
    """Whether a character is a CJK ideograph, kana or hangul syllable (one unit of its own)."""
    return bool(_CJK_UNIT.fullmatch(char))


def mostly_cjk(text: str) -> bool:
    """Whether most units of `text` are CJK characters (so n-grams are taken over characters)."""
    seq = units(text)
    return len(_CJK_UNIT.findall(normalize(text))) * 2 > len(seq)


def count_units(text: str) -> int:
    """The number of units, without normalising (for quick length checks)."""
    return len(_UNIT.findall(text))


def shingles(text: str, word_ngram: int, char_ngram: int) -> set[str]:
    """The shingle set used for near duplicates: `word_ngram` consecutive words for space-separated text, or
    `char_ngram` consecutive characters when most units are CJK characters. A text shorter than one shingle is
    one shingle of all its units (so two short identical answers still match)."""
    seq = units(text)
    if not seq:
        return set()
    n, sep = (char_ngram, "") if mostly_cjk(text) else (word_ngram, " ")
    if len(seq) <= n:
        return {sep.join(seq)}
    return {sep.join(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def row_text(example: Example) -> str:
    """All text fields of a row, role-tagged, so exact and near duplicates compare whole rows: the contents, the
    tool calls (name and arguments) and the tool schemas. Two function-calling rows that differ only in the tool
    they call are different rows. Tool-call ids are left out: they are bookkeeping (made up for sharegpt rows)."""
    if example.text is not None:
        return example.text
    lines = [f"{m['role']}: {m.get('content') or ''}{_calls_text(m)}" for m in example.messages]
    if example.tools:
        lines.append(f"tools: {json.dumps(example.tools, ensure_ascii=False, sort_keys=True)}")
    return "\n".join(lines)


def _calls_text(message: dict) -> str:
    calls = [c.get("function", c) for c in message.get("tool_calls") or []]
    return "".join(f"\ntool call: {json.dumps([c.get('name'), c.get('arguments')], ensure_ascii=False, sort_keys=True)}"
                   for c in calls)


def plain_text(example: Example) -> str:
    """The contents alone (no role tags), for language detection."""
    if example.text is not None:
        return example.text
    return "\n".join(m.get("content") or "" for m in example.messages)


def prompt_and_answers(example: Example) -> tuple[str, list[str]]:
    """The last user message and every assistant reply of a chat row ('' and [text] for a text row)."""
    if example.text is not None:
        return "", [example.text]
    users = [m["content"] for m in example.messages if m["role"] == "user"]
    answers = [m["content"] for m in example.messages if m["role"] == "assistant" and not m.get("tool_calls")]
    return (users[-1] if users else ""), answers


def turns(example: Example) -> int:
    """User turns of a conversation (0 for a text row)."""
    return 0 if example.messages is None else sum(1 for m in example.messages if m["role"] == "user")


