"""Checkable facts: one sentence form per kind, its value computed by a program, and a parser.

Every span of the synthetic data states exactly one `Fact`. The same regular
sentence forms are what the checker reads back out of a generated answer, so a
fact is "right" when the sentence found in the answer equals the expected one
(after putting two-sided comparisons in one orientation).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # common years

# Words whose letters the model must learn (lowercase, 3-8 letters, no repeats).
WORDS = (
    "ant", "bee", "cat", "cow", "dog", "egg", "fox", "hat", "ink", "jam", "key", "map", "net", "owl",
    "pen", "sun", "toy", "van", "bird", "boat", "cake", "desk", "door", "fish", "frog", "gold", "hill",
    "kite", "lake", "lamp", "leaf", "moon", "nest", "rain", "ring", "rose", "ship", "star", "tree",
    "wind", "apple", "bread", "chair", "cloud", "dream", "field", "grape", "horse", "house", "juice",
    "lemon", "light", "mouse", "music", "ocean", "paper", "piano", "river", "snake", "stone", "table",
    "tiger", "train", "water", "zebra", "animal", "basket", "bridge", "button", "candle", "forest",
    "garden", "island", "jacket", "kitten", "ladder", "mirror", "orange", "pencil", "rabbit", "rocket",
    "silver", "spring", "window", "blanket", "chicken", "dolphin", "morning", "picture", "rainbow",
    "teacher", "volcano", "elephant", "mountain", "notebook", "umbrella",
)  # fmt: skip

# Things with a price in the small tables of the prompts.
ITEMS = (
    "apple", "pear", "plum", "fig", "lemon", "melon", "bread", "milk", "tea", "soap",
    "lamp", "pen", "book", "cup", "hat", "kite",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Fact:
    """One checkable statement: `kind` of `args` is `value` (all strings, as written in the text)."""

    kind: str
    args: tuple[str, ...]
    value: str

    def sentence(self) -> str:
        """The one sentence form of this fact, e.g. 'The number after 47 is 48.'."""
        return KINDS[self.kind].template.format(*self.args, v=self.value)

    def canonical(self) -> "Fact":
        """Two-sided comparisons with their arguments in sorted order (value flipped to match)."""
        spec = KINDS[self.kind]
        if spec.flip and len(self.args) == 2 and _order(self.args[1]) < _order(self.args[0]):
            return Fact(self.kind, (self.args[1], self.args[0]), spec.flip[self.value])
        return self

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """What the fact is about (kind and arguments, canonical order), without its value."""
        c = self.canonical()
        return c.kind, c.args

    def to_json(self) -> dict:
        return {"kind": self.kind, "args": list(self.args), "value": self.value}

    @classmethod
    def from_json(cls, d: Mapping) -> "Fact":
        return cls(str(d["kind"]), tuple(str(a) for a in d["args"]), str(d["value"]))


def _order(arg: str) -> tuple[int, int | str]:
    return (0, int(arg)) if arg.isdigit() else (1, arg)


@dataclasses.dataclass(frozen=True)
class Kind:
    """A fact kind: its sentence template, the regex reading it back, and (for comparisons) the flip."""

    template: str  # positional args {0} {1}, value {v}
    pattern: str  # groups: args in order, then the value
    flip: Mapping[str, str] | None = None


_NUM = r"(?<![\w])(\d+)"
_WORD = r"(?<![\w])([a-z]+)"
_DAY = "(" + "|".join(DAYS) + ")"
_MONTH = "(" + "|".join(MONTHS) + ")"

KINDS: Mapping[str, Kind] = {
    # numbers
    "parity": Kind("{0} is {v}.", _NUM + r" is (even|odd)\."),
    "next": Kind("The number after {0} is {v}.", r"[Tt]he number after (\d+) is (\d+)\."),
    "previous": Kind("The number before {0} is {v}.", r"[Tt]he number before (\d+) is (\d+)\."),
    "tens": Kind("The tens digit of {0} is {v}.", r"[Tt]he tens digit of (\d+) is (\d+)\."),
    "ones": Kind("The ones digit of {0} is {v}.", r"[Tt]he ones digit of (\d+) is (\d+)\."),
    "compare": Kind(
        "{0} is {v} than {1}.", _NUM + r" is (greater|less) than (\d+)\.", {"greater": "less", "less": "greater"}
    ),
    # words
    "first_letter": Kind("The first letter of {0} is {v}.", r"[Tt]he first letter of ([a-z]+) is ([a-z])\."),
    "last_letter": Kind("The last letter of {0} is {v}.", r"[Tt]he last letter of ([a-z]+) is ([a-z])\."),
    "letter_count": Kind("{0} has {v} letters.", _WORD + r" has (\d+) letters\."),
    "longer": Kind(
        "{0} is {v} than {1}.", _WORD + r" is (longer|shorter) than ([a-z]+)\.", {"longer": "shorter", "shorter": "longer"}
    ),
    # days and months
    "next_day": Kind("The day after {0} is {v}.", r"[Tt]he day after " + _DAY + r" is " + _DAY + r"\."),
    "previous_day": Kind("The day before {0} is {v}.", r"[Tt]he day before " + _DAY + r" is " + _DAY + r"\."),
    "next_month": Kind(
        "The month after {0} is {v}.", r"[Tt]he month after " + _MONTH + r" is " + _MONTH + r"\."
    ),
    "previous_month": Kind(
        "The month before {0} is {v}.", r"[Tt]he month before " + _MONTH + r" is " + _MONTH + r"\."
    ),
    "month_days": Kind("{0} has {v} days.", r"(?<![\w])" + _MONTH + r" has (\d+) days\."),
    "month_number": Kind("{0} is month {v} of the year.", r"(?<![\w])" + _MONTH + r" is month (\d+) of the year\."),
    # small price tables given in the prompt
    "price": Kind("The {0} costs {v} coins.", r"[Tt]he ([a-z]+) costs (\d+) coins\."),
    "costlier": Kind(
        "The {0} costs {v} than the {1}.",
        r"[Tt]he ([a-z]+) costs (more|less) than the ([a-z]+)\.",
        {"more": "less", "less": "more"},
    ),
}

# Where the value group sits in each pattern (comparisons put it between the two args).
_VALUE_GROUP = {k: (2 if spec.flip else None) for k, spec in KINDS.items()}
_COMPILED = {k: re.compile(spec.pattern) for k, spec in KINDS.items()}


def parse_claims(text: str) -> list[Fact]:
    """Every fact sentence found in `text`, in reading order (a sentence may follow 'So ')."""
    found: list[tuple[int, Fact]] = []
    for kind, rx in _COMPILED.items():
        for m in rx.finditer(text):
            groups = m.groups()
            vg = _VALUE_GROUP[kind]
            if vg is None:
                args, value = groups[:-1], groups[-1]
            else:
                args, value = groups[: vg - 1] + groups[vg:], groups[vg - 1]
            found.append((m.start(), Fact(kind, tuple(args), value)))
    return [f for _, f in sorted(found, key=lambda p: p[0])]


# ----------------------------------------------------------------------------- values


def number_fact(kind: str, n: int, m: int | None = None) -> Fact:
    """A fact about the number n (and m for 'compare'), its value computed here."""
    if kind == "parity":
        return Fact(kind, (str(n),), "even" if n % 2 == 0 else "odd")
    if kind == "next":
        return Fact(kind, (str(n),), str(n + 1))
    if kind == "previous":
        return Fact(kind, (str(n),), str(n - 1))
    if kind == "tens":
        return Fact(kind, (str(n),), str(n // 10 % 10))
    if kind == "ones":
        return Fact(kind, (str(n),), str(n % 10))
    if kind == "compare":
        if m is None or m == n:
            raise ValueError("compare needs a second, different number")
        return Fact(kind, (str(n), str(m)), "greater" if n > m else "less")
    raise ValueError(f"not a number fact: {kind}")


def word_fact(kind: str, w: str, other: str | None = None) -> Fact:
    """A fact about the letters of word w (and `other` for 'longer')."""
    if kind == "first_letter":
        return Fact(kind, (w,), w[0])
    if kind == "last_letter":
        return Fact(kind, (w,), w[-1])
    if kind == "letter_count":
        return Fact(kind, (w,), str(len(w)))
    if kind == "longer":
        if other is None or len(other) == len(w):
            raise ValueError("longer needs a second word of a different length")
        return Fact(kind, (w, other), "longer" if len(w) > len(other) else "shorter")
    raise ValueError(f"not a word fact: {kind}")


def calendar_fact(kind: str, name: str) -> Fact:
    """A fact about a weekday or a month."""
    if kind in ("next_day", "previous_day"):
        i = DAYS.index(name)
        return Fact(kind, (name,), DAYS[(i + (1 if kind == "next_day" else -1)) % 7])
    i = MONTHS.index(name)
    if kind in ("next_month", "previous_month"):
        return Fact(kind, (name,), MONTHS[(i + (1 if kind == "next_month" else -1)) % 12])
    if kind == "month_days":
        return Fact(kind, (name,), str(MONTH_DAYS[i]))
    if kind == "month_number":
        return Fact(kind, (name,), str(i + 1))
    raise ValueError(f"not a calendar fact: {kind}")


def price_fact(kind: str, table: Mapping[str, int], a: str, b: str | None = None) -> Fact:
    """A fact read from a price table: one price, or which of two items costs more."""
    if kind == "price":
        return Fact(kind, (a,), str(table[a]))
    if kind == "costlier":
        if b is None or table[a] == table[b]:
            raise ValueError("costlier needs two items with different prices")
        return Fact(kind, (a, b), "more" if table[a] > table[b] else "less")
    raise ValueError(f"not a price fact: {kind}")


def conclusion(fact: Fact) -> str:
    """The sentence of a fact that a later round derives from earlier spans: 'So ...'."""
    s = fact.sentence()
    return "So " + (s[0].lower() + s[1:] if s.startswith("The ") else s)


def facts_json(facts: Sequence[Fact]) -> list[dict]:
    return [f.to_json() for f in facts]
