"""Every number a text writes, in any spelling: "$10,450.55", "-42.10", "5k", "ten thousand four hundred
dollars", "five grand", "2.5 million", "fifty cents".

Grounding compares these values with the user's own numbers; anything it cannot read as a value in ASCII
(superscripts, fractions like "½", other scripts' digits) is reported by `unusual_numerals`, so that no
spelling slips past as text.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

UNITS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen".split()
    )
}
UNITS.update({"oh": 0, "nought": 0, "nil": 0, "dozen": 12})
TENS = {word: 10 * (i + 2) for i, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
FRACTIONS = {"half": Decimal("0.5"), "quarter": Decimal("0.25")}
HUNDRED = {"hundred": 100}
# scales that close a group: "ten thousand four hundred" is 10 * 1000 + 4 * 100
SCALES = {
    "thousand": 10**3,
    "grand": 10**3,
    "k": 10**3,
    "million": 10**6,
    "mil": 10**6,
    "mn": 10**6,
    "m": 10**6,
    "billion": 10**9,
    "bn": 10**9,
    "b": 10**9,
    "trillion": 10**12,
}
SCALES_AFTER_DIGITS_ONLY = {"k", "m", "mn", "b", "bn", "mil"}  # "5k" is 5,000; "a k" is no number
CURRENCY_BEFORE = re.compile(r"(?:[$€£¥₹¢]|\b(?:usd|us\$|eur|gbp|cad|aud|jpy|chf|inr)\b)\s*$", re.IGNORECASE)
CURRENCY_AFTER = {"dollar", "dollars", "buck", "bucks", "usd", "eur", "euro", "euros", "pound", "pounds", "gbp", "quid"}
CENTS = {"cent", "cents"}
PERCENT = {"percent", "per cent", "pct", "%"}
NEGATIVE_BEFORE = re.compile(r"(?:-|−|\bminus\s+|\bnegative\s+)(?:[$€£¥₹]|usd\s*|us\$)?\s*$", re.IGNORECASE)
# After a count noun a small number word is a count, not an amount: "about ten minutes", "one of them".
COUNT_NOUNS = {
    "minute",
    "minutes",
    "hour",
    "hours",
    "day",
    "days",
    "business",
    "working",
    "week",
    "weeks",
    "month",
    "months",
    "year",
    "years",
    "time",
    "times",
    "of",
}
TOKEN = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?|[A-Za-z]+|%|-|\S")
DIGITS = re.compile(r"\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Figure:
    """One number in a text: its signed value, its spelling, and whether it may be a count, not an amount."""

    value: Decimal
    text: str
    small_count: bool  # number words only, under 100, with no currency, percent, scale or decimal point
    before_count_noun: bool  # followed by "minutes", "days", "of", "-time"...


def unusual_numerals(text: str) -> list[str]:
    """Characters that write a number outside ASCII's 0-9: "²", "½", "٥", "５", "Ⅻ"."""
    return [c for c in text if not ("0" <= c <= "9") and unicodedata.numeric(c, None) is not None]


def figures_in(text: str) -> list[Figure]:
    """Every number in `text`, in digits or in English words, with its signed value."""
    tokens = [(m.group(0), m.start(), m.end()) for m in TOKEN.finditer(text)]
    figures = []
    i = 0
    while i < len(tokens):
        end = _phrase_end(tokens, i)
        if end == i:
            i += 1
            continue
        phrase = [t[0].lower() for t in tokens[i:end]]
        value, scaled = _value(phrase)
        if value is None:  # "a" or "and" alone
            i += 1
            continue
        after = [t[0].lower() for t in tokens[end : end + 3] if t[0] != "-"]
        money_after = bool(after) and (after[0] in CURRENCY_AFTER or after[0] in PERCENT)
        if after and after[0] in CENTS:
            value, money_after = value / 100, True
        before = text[: tokens[i][1]]
        money = money_after or bool(CURRENCY_BEFORE.search(before))
        words_only = not any(DIGITS.fullmatch(w) for w in phrase)
        small = words_only and not scaled and value < 100 and value == int(value)
        negative = bool(NEGATIVE_BEFORE.search(before))
        figures.append(
            Figure(
                value=-value if negative else value,
                text=text[tokens[i][1] : tokens[end - 1][2]],
                small_count=small and not money,
                before_count_noun=bool(after) and after[0] in COUNT_NOUNS,
            )
        )
        i = end
    return figures


def _is_number_word(word: str) -> bool:
    return word in UNITS or word in TENS or word in HUNDRED or word in FRACTIONS or word in SCALES


def _phrase_end(tokens: list[tuple[str, int, int]], start: int) -> int:
    """The end of the number phrase starting at tokens[start] (== start when none starts there)."""
    words = [t[0].lower() for t in tokens]
    first = words[start]
    if not (DIGITS.fullmatch(first) or _is_number_word(first) and first not in SCALES_AFTER_DIGITS_ONLY):
        if first in ("a", "an") and start + 1 < len(words) and words[start + 1] in {**HUNDRED, **SCALES, "half": 1}:
            pass  # "a hundred", "a grand", "a half"
        else:
            return start
    end = start + 1
    previous = first
    while end < len(words):
        word = words[end]
        joined = tokens[end][1] == tokens[end - 1][2]  # no space between: "5k", "forty-two"
        if DIGITS.fullmatch(word):
            if previous != "point":
                break
        elif word in SCALES_AFTER_DIGITS_ONLY:
            if not (DIGITS.fullmatch(previous) and (joined or word == "k")):
                break
        elif word == "-":
            if not (previous in TENS and end + 1 < len(words) and words[end + 1] in UNITS):
                break
        elif word in ("and", "a", "an"):  # "a hundred and five", "five and a half"
            following = [w for w in words[end + 1 : end + 3] if w not in ("a", "an")]
            if not following or not _is_number_word(following[0]) or following[0] in SCALES_AFTER_DIGITS_ONLY:
                break
        elif word == "point":
            if end + 1 >= len(words) or not (words[end + 1] in UNITS or DIGITS.fullmatch(words[end + 1])):
                break
        elif not _is_number_word(word):
            break
        previous = word
        end += 1
    return end


def _value(phrase: list[str]) -> tuple[Decimal | None, bool]:
    """The value of a number phrase, and whether it holds a scale word ("hundred", "k", "grand"...)."""
    total, group, seen, scaled = Decimal(0), None, False, False
    decimals = None  # digits read after "point"
    for word in phrase:
        if decimals is not None and (word in UNITS and UNITS[word] < 10 or DIGITS.fullmatch(word)):
            decimals += word if DIGITS.fullmatch(word) else str(UNITS[word])
            continue
        if DIGITS.fullmatch(word):
            try:
                group, seen = (group or 0) + Decimal(word.replace(",", "")), True
            except InvalidOperation:
                return None, False
        elif word in UNITS or word in TENS:
            group, seen = (group or 0) + UNITS.get(word, TENS.get(word, 0)), True
        elif word in FRACTIONS:
            group, seen = (group or 0) + FRACTIONS[word] if group is not None else FRACTIONS[word], True
        elif word in HUNDRED:
            group, seen, scaled = (group if group is not None else 1) * 100, True, True
        elif word in SCALES:
            total += (group if group is not None else 1) * SCALES[word]
            group, seen, scaled = None, True, True
        elif word == "point":
            decimals = ""
    if not seen:
        return None, False
    value = total + (group or 0)
    if decimals:
        value += Decimal("0." + decimals)
    return value, scaled or decimals is not None
