"""Years in any era: a persona's cutoff as written in its file, its label in prose, and the pattern that finds a
later year in an answer, the way years are written in that era.

A year is an int: AD years positive (180, 1899, 2300), BC years negative (-44 is 44 BC); there is no year 0.

Which numbers are years. A bare number is only sometimes a year ("300 soldiers", "a century of 80 men"), so a
number counts as a later year only in a form that makes it one:

- a marked year: "AD 410", "A.D. 410", "410 AD", "410 CE" (and "30 BC", "30 BCE" for a BC cutoff); the markers are
  matched in capitals only, so "ad" and "ce" in running text are not markers;
- "the year N" / "year N", and "in N" when a clause follows rather than a noun: "in 410, Rome fell", "in 410 the
  Goths", "In 410 Alaric" count; "in 300 ships" and "in 40 days" do not;
- "the Ns" for a round number: "the 300s", "the 1970s";
- a bare four-digit number from 1000 up to the end of the bare window (the cutoff + 100, and at least 2099): a
  later knowledge leak most often names a modern year; smaller bare numbers are counts, not years;
- an ordinal century after the cutoff's own: "the fifth century", "5th-century", "twenty-first century",
  unless the words after it name a military unit ("the second century of the third cohort": a century is also a
  company of eighty men in a Roman legion), or it is marked BC.

For a BC cutoff an unmarked number N is read either way (N BC or AD N), so it counts only when both readings are
later (N below the cutoff's number); marked AD years and every AD century always count. A number followed by a BC
marker counts only as a BC year.

Where the forms guess wrong: a bare four-digit count ("1500 legionaries") reads as a year for a cutoff before it,
and "in 300 Roman ships" reads as one because a capitalised name may start the clause ("In 410 Alaric").
"""

from __future__ import annotations

import re
from typing import Any

LAST_YEAR = 2099      # bare four-digit years after the cutoff up to this one (at least) are later knowledge
BARE_SPAN = 100       # ... and for a later cutoff, up to a century after it
MAX_YEAR = 9999       # four digits: the largest year a cutoff or a marked year may have
MAX_CENTURY = 99
CUTOFF_FORMS = ("an AD year as a whole number (180, 1899, 2300; 1 to 9999), a BC year as a negative number (-44) "
                "or as text ('44 BC', '44 BCE'), or text such as 'AD 180'")

_AD = r"(?-i:AD|A\.D\.|CE|C\.E\.)"
_BC = r"(?-i:BC|B\.C\.|BCE|B\.C\.E\.)"
_NOT_BC = rf"(?!\s*{_BC}(?!\w))"
# After "in N": the start of a clause (punctuation, a capitalised word or a function word), not a noun being counted.
_CLAUSE = (r"(?=\s*(?:[,;:.!?)\u2014\u2013]|$)|\s+(?-i:[A-Z])|\s+(?:the|a|an|when|after|before|and|at|on|he|she|"
           r"they|it|we|i|his|her|their|our|there|its)\b)")
_UNIT = (r"(?!\s+of\s+(?:the\s+|his\s+|my\s+|a\s+)?(?:\w+\s+)?(?:cohorts?|legions?|maniples?|hastati|principes|"
         r"triarii|men|soldiers|legionaries|infantry|foot|horse)\b)")
_ONES = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth"]
_TEENS = ["tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
          "eighteenth", "nineteenth"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_TENTHS = ["", "", "twentieth", "thirtieth", "fortieth", "fiftieth", "sixtieth", "seventieth", "eightieth",
           "ninetieth"]
_WRITTEN = re.compile(r"^\s*(?:(?P<ad>AD|A\.D\.)\s*(?P<n1>\d{1,4})|(?P<n2>\d{1,4})\s*(?P<era>AD|A\.D\.|CE|C\.E\.|"
                      r"BC|B\.C\.|BCE|B\.C\.E\.))\s*$", re.IGNORECASE)


def parse_cutoff(value: Any) -> int:
    """The cutoff as a year (BC negative); ValueError naming the accepted forms when it is none of them."""
    year = None
    if isinstance(value, int) and not isinstance(value, bool):
        year = value
    elif isinstance(value, str) and (m := _WRITTEN.match(value)):
        number = int(m["n1"] or m["n2"])
        year = -number if (m["era"] or "").upper().startswith("B") else number
    if year is None or year == 0 or abs(year) > MAX_YEAR:
        shown = "nothing" if value is None else f"{type(value).__name__} {repr(value)[:60]}"
        hint = " (there is no year 0: 1 BC is followed by AD 1)" if year == 0 else (
            " (write a number without quotes)" if isinstance(value, str) and value.strip().lstrip("-").isdigit()
            else "")
        raise ValueError(f"expected a year: {CUTOFF_FORMS}; got {shown}{hint}")
    return year


def year_label(year: int) -> str:
    """How a year reads in prose: 1969, AD 180, 44 BC."""
    if year < 0:
        return f"{-year} BC"
    return str(year) if year >= 1000 else f"AD {year}"


def kind_label(year: int) -> str:
    """The temporal kind of a question about after the cutoff: post_1969, post_180, post_44bc."""
    return f"post_{-year}bc" if year < 0 else f"post_{year}"


def century_of(year: int) -> int:
    """The century a year falls in, BC centuries negative: 180 -> 2, 1900 -> 19, 1901 -> 20, -44 -> -1."""
    return (year - 1) // 100 + 1 if year > 0 else -((-year - 1) // 100 + 1)


def ordinal_words(n: int) -> list[str]:
    """The ways to write the ordinal n in words: 5 -> ['fifth'], 21 -> ['twenty-first', 'twenty first']."""
    if n < 10:
        return [_ONES[n]]
    if n < 20:
        return [_TEENS[n - 10]]
    tens, ones = divmod(n, 10)
    return [_TENTHS[tens]] if not ones else [f"{_TENS[tens]}-{_ONES[ones]}", f"{_TENS[tens]} {_ONES[ones]}"]


def number_range(lo: int, hi: int) -> str:
    """Regex alternation of the whole numbers lo..hi (no leading zeros): 181..299 -> 18[1-9]|19\\d|2\\d\\d."""
    parts: list[str] = []
    for digits in range(1, 5):
        a, b = max(lo, 10 ** (digits - 1)), min(hi, 10 ** digits - 1)
        if a <= b:
            parts += _same_length(str(a), str(b))
    return "|".join(parts) or r"(?!)"


def _same_length(a: str, b: str) -> list[str]:
    if a == b:
        return [a]
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if set(a[1:]) == {"0"} and set(b[1:]) == {"9"}:
        head = a[0] if a[0] == b[0] else f"[{a[0]}-{b[0]}]"
        return [head + r"\d" * (len(a) - 1)]
    if a[0] == b[0]:
        return [a[0] + "(?:" + "|".join(_same_length(a[1:], b[1:])) + ")"]
    rest = len(a) - 1
    parts = _same_length(a, a[0] + "9" * rest)
    if int(a[0]) + 1 <= int(b[0]) - 1:
        parts += _same_length(str(int(a[0]) + 1) + "0" * rest, str(int(b[0]) - 1) + "9" * rest)
    return parts + _same_length(b[0] + "0" * rest, b)


def bare_window(cutoff: int) -> tuple[int, int]:
    """The bare four-digit numbers read as later years: cutoff+1 (at least 1000) to cutoff+100 (at least 2099)."""
    return max(cutoff + 1, 1000), min(max(LAST_YEAR, cutoff + BARE_SPAN), MAX_YEAR)


def years_after(cutoff: int) -> str:
    """Regex alternation of the bare numbers read as later years: 1969 -> 197\\d|19[89]\\d|20\\d\\d."""
    return number_range(*bare_window(cutoff))


def later_year_pattern(cutoff: int, extra_centuries: list[str] = ()) -> re.Pattern:
    """A year or century after `cutoff`, in the forms the module docstring lists, plus the persona's own
    `later_centuries` patterns. Case-insensitive, except the AD/BC markers."""
    unmarked = range(cutoff + 1, MAX_YEAR + 1) if cutoff > 0 else range(1, -cutoff)
    marked_ad = f"(?:{number_range(max(cutoff + 1, 1), MAX_YEAR)})"
    num = f"(?:{number_range(unmarked.start, unmarked.stop - 1)})" if len(unmarked) else r"(?!)"
    decades = [n // 10 for n in unmarked if n % 10 == 0 and n >= 100]
    alternatives = [
        rf"\b{_AD}\s?{marked_ad}\b",                                         # AD 410, A.D. 410
        rf"(?<![\d,.]){marked_ad}\s?{_AD}(?!\w)",                            # 410 AD, 410 CE
        rf"(?<=\byear ){num}\b{_NOT_BC}",                                    # the year 410
        rf"(?<=\bin ){num}\b(?![.,]\d){_NOT_BC}{_CLAUSE}",                   # in 410, the Goths ...
        rf"\b(?:{years_after(cutoff)})(?:'?s)?\b{_NOT_BC}",                  # 1975, 1970s
    ]
    if decades:
        alternatives.append(rf"(?<=\bthe )(?:{number_range(decades[0], decades[-1])})0'?s\b{_NOT_BC}")  # the 300s
    if cutoff < -1:
        alternatives.append(rf"(?<![\d,.])(?:{number_range(1, -cutoff - 1)})\s?{_BC}(?!\w)")  # 30 BC
    first = century_of(cutoff) + 1 if cutoff > 0 else 1  # AD centuries after the cutoff's
    alternatives.append(_centuries(range(first, MAX_CENTURY + 1)) + rf"(?:\s*{_AD}(?!\w))?{_NOT_BC}{_UNIT}")
    if cutoff < 0 and -century_of(cutoff) > 1:  # BC centuries after the cutoff's: the 2nd century BC for 250 BC
        alternatives.append(_centuries(range(1, -century_of(cutoff))) + rf"\s*{_BC}(?!\w)")
    alternatives += [rf"\b(?:{c})\b" for c in extra_centuries]
    return re.compile("|".join(alternatives), re.IGNORECASE)


def _centuries(ordinals: range) -> str:
    words = [w for n in ordinals for w in ordinal_words(n)]
    words.sort(key=len, reverse=True)  # "twenty-first" before "twentieth"... and before "first"
    suffixed = rf"(?:{number_range(ordinals.start, ordinals.stop - 1)})(?:st|nd|rd|th)"
    return rf"\b(?:{suffixed}|{'|'.join(words)})[- ]centur(?:y|ies)\b"


def year_key(text: str) -> str:
    """One spelling per year or century, so that "AD 410" in a prompt and "410 AD" in an answer are one year:
    digits (BC negative; "1970s" -> 1970), or "century N" / "century -N"; other text lower-cased."""
    text = text.lower().strip()
    bc = bool(re.search(r"\bb\.?c", text))
    if "centur" in text:
        digits = re.match(r"\d+", text)
        words = text.replace("-", " ").split(" centur")[0]
        number = int(digits.group(0)) if digits else next(
            (n for n in range(1, MAX_CENTURY + 1) if any(w.replace("-", " ") == words for w in ordinal_words(n))),
            None)
        return text if number is None else f"century {-number if bc else number}"
    digits = re.search(r"\d+", text)
    if not digits:
        return text
    return str(-int(digits.group(0)) if bc else int(digits.group(0)))
