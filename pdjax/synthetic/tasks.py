"""Task families: prompts whose answers are made of independent, checkable facts.

Each family draws its subjects from a `random.Random` and returns an `Example`:
the prompt, the answer as plan rounds of (topic, sentence) spans and an optional
plain tail, and the facts a checker expects. Three shapes:

- ``one_round``: 2-4 facts asked at once, one promise and one span each;
- ``multi_round``: round 1 states facts, `<sync/>`, a later round derives a fact
  from them (as a promised span, or as plain text after the last `<sync/>`);
  calendar chains take two or three rounds, each stepping on from the last;
- ``plain``: a single fact or a bit of chat, answered without a plan.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Literal, Sequence

from pdjax.synthetic.facts import (
    DAYS,
    ITEMS,
    MONTHS,
    WORDS,
    Fact,
    calendar_fact,
    conclusion,
    number_fact,
    price_fact,
    word_fact,
)

Shape = Literal["one_round", "multi_round", "plain"]
SHAPES: tuple[Shape, ...] = ("one_round", "multi_round", "plain")
ORDINALS = ("first", "second", "third", "fourth")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One planned span: its topic words (letters only; the length number is added when rendering) and text."""

    topic: str
    text: str


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt and its structured answer; `key` names the question independently of its wording."""

    prompt: str
    shape: Shape
    family: str
    key: str
    rounds: tuple[tuple[Unit, ...], ...]  # planned rounds; empty for plain answers
    tail: str  # plain text: the whole answer of a plain example, or the text after the last <sync/>
    facts: tuple[Fact, ...]

    @property
    def answer(self) -> str:
        """The answer without its plan: what AR-only and diffusion-only baselines are trained on."""
        return "".join(u.text for r in self.rounds for u in r) + self.tail


def _spaced(texts: Sequence[str]) -> list[str]:
    """Sentences of one answer joined by single spaces: every one but the first gets a leading space.

    The space lives inside the span, so the answer with its plan stripped reads as normal text.
    """
    return [t if i == 0 else " " + t for i, t in enumerate(texts)]


def _listing(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _planned(prompt: str, family: str, key: str, units: Sequence[tuple[str, Fact]]) -> Example:
    texts = _spaced([f.sentence() for _, f in units])
    rnd = tuple(Unit(topic, text) for (topic, _), text in zip(units, texts))
    return Example(prompt, "one_round", family, key, (rnd,), "", tuple(f for _, f in units))


# ----------------------------------------------------------------------------- one round

NUMBER_ASK = {
    "parity": ("parity", ("its parity", "whether it is even or odd")),
    "next": ("next number", ("the number after it", "the next number")),
    "previous": ("previous number", ("the number before it", "the previous number")),
    "tens": ("tens digit", ("its tens digit", "the tens digit")),
    "ones": ("ones digit", ("its ones digit", "the ones digit")),
    "compare": ("comparison", ("how it compares with {m}", "whether it is greater or less than {m}")),
}
NUMBER_PROMPTS = (
    "Tell me about the number {n}: {asks}.",
    "For the number {n}, give {asks}.",
    "What can you say about {n}? I want {asks}.",
    "Describe the number {n}: {asks}.",
)


def number_facts(rng: random.Random) -> Example:
    n = rng.randint(10, 99)
    kinds = rng.sample(list(NUMBER_ASK), rng.randint(2, 4))
    m = rng.choice([x for x in range(1, 100) if x != n])
    asks = [rng.choice(NUMBER_ASK[k][1]).format(m=m) for k in kinds]
    prompt = rng.choice(NUMBER_PROMPTS).format(n=n, asks=_listing(asks))
    units = [(NUMBER_ASK[k][0], number_fact(k, n, m)) for k in kinds]
    key = f"number_facts|{n}|{','.join(kinds)}|{m if 'compare' in kinds else ''}"
    return _planned(prompt, "number_facts", key, units)


NUMBER_LIST_PROMPTS = {
    "parity": ("Are these numbers even or odd: {xs}?", "Give the parity of {xs}."),
    "next": ("What comes after each of {xs}?", "Give the next number for {xs}."),
    "previous": ("What comes before each of {xs}?", "Give the previous number for {xs}."),
    "tens": ("What is the tens digit of each of {xs}?", "Give the tens digits of {xs}."),
    "ones": ("What is the ones digit of each of {xs}?", "Give the ones digits of {xs}."),
}


def number_list(rng: random.Random) -> Example:
    kind = rng.choice(list(NUMBER_LIST_PROMPTS))
    ns = rng.sample(range(10, 100), rng.randint(2, 4))
    prompt = rng.choice(NUMBER_LIST_PROMPTS[kind]).format(xs=_listing([str(n) for n in ns]))
    # Numbers cannot stand in a topic (its first digits are the length), so spans are named by order.
    units = [(f"{ORDINALS[i]} number", number_fact(kind, n)) for i, n in enumerate(ns)]
    return _planned(prompt, "number_list", f"number_list|{kind}|{','.join(map(str, ns))}", units)


WORD_ASK = {
    "first_letter": ("first letter", ("its first letter", "the letter it starts with")),
    "last_letter": ("last letter", ("its last letter", "the letter it ends with")),
    "letter_count": ("letter count", ("how many letters it has", "its number of letters")),
}
WORD_PROMPTS = (
    "Tell me about the word {w}: {asks}.",
    "For the word {w}, give {asks}.",
    "Describe the word {w}: {asks}.",
)


def word_facts(rng: random.Random) -> Example:
    w = rng.choice(WORDS)
    kinds = rng.sample(list(WORD_ASK), rng.randint(2, 3))
    asks = [rng.choice(WORD_ASK[k][1]) for k in kinds]
    prompt = rng.choice(WORD_PROMPTS).format(w=w, asks=_listing(asks))
    units = [(WORD_ASK[k][0], word_fact(k, w)) for k in kinds]
    return _planned(prompt, "word_facts", f"word_facts|{w}|{','.join(kinds)}", units)


WORD_LIST_PROMPTS = {
    "first_letter": ("What is the first letter of each word: {xs}?", "Give the first letters of {xs}."),
    "last_letter": ("What is the last letter of each word: {xs}?", "Give the last letters of {xs}."),
    "letter_count": ("How many letters do these words have: {xs}?", "Count the letters of {xs}."),
}
WORD_LIST_TOPIC = {"first_letter": "first", "last_letter": "last", "letter_count": "letters"}


def word_list(rng: random.Random) -> Example:
    kind = rng.choice(list(WORD_LIST_PROMPTS))
    ws = rng.sample(WORDS, rng.randint(2, 4))
    prompt = rng.choice(WORD_LIST_PROMPTS[kind]).format(xs=_listing(ws))
    units = [(f"{w} {WORD_LIST_TOPIC[kind]}", word_fact(kind, w)) for w in ws]
    return _planned(prompt, "word_list", f"word_list|{kind}|{','.join(ws)}", units)


DAY_ASK = {
    "next_day": ("next day", ("the day after it", "the next day")),
    "previous_day": ("previous day", ("the day before it", "the previous day")),
}
MONTH_ASK = {
    "next_month": ("next month", ("the month after it", "the next month")),
    "previous_month": ("previous month", ("the month before it", "the previous month")),
    "month_days": ("days", ("how many days it has", "its number of days")),
    "month_number": ("month number", ("its number in the year", "which month of the year it is")),
}
CALENDAR_PROMPTS = ("Tell me about {x}: {asks}.", "For {x}, give {asks}.", "What about {x}? I want {asks}.")


def day_facts(rng: random.Random) -> Example:
    d = rng.choice(DAYS)
    kinds = rng.sample(list(DAY_ASK), 2)
    asks = [rng.choice(DAY_ASK[k][1]) for k in kinds]
    prompt = rng.choice(CALENDAR_PROMPTS).format(x=d, asks=_listing(asks))
    units = [(DAY_ASK[k][0], calendar_fact(k, d)) for k in kinds]
    return _planned(prompt, "day_facts", f"day_facts|{d}|{','.join(kinds)}", units)


def month_facts(rng: random.Random) -> Example:
    mo = rng.choice(MONTHS)
    kinds = rng.sample(list(MONTH_ASK), rng.randint(2, 4))
    asks = [rng.choice(MONTH_ASK[k][1]) for k in kinds]
    prompt = rng.choice(CALENDAR_PROMPTS).format(x=mo, asks=_listing(asks))
    units = [(MONTH_ASK[k][0], calendar_fact(k, mo)) for k in kinds]
    return _planned(prompt, "month_facts", f"month_facts|{mo}|{','.join(kinds)}", units)


CALENDAR_LIST_PROMPTS = {
    "next_day": ("What day comes after each of {xs}?", "Give the next day for {xs}."),
    "previous_day": ("What day comes before each of {xs}?", "Give the previous day for {xs}."),
    "next_month": ("What month comes after each of {xs}?", "Give the next month for {xs}."),
    "previous_month": ("What month comes before each of {xs}?", "Give the previous month for {xs}."),
    "month_days": ("How many days do {xs} have?", "Give the number of days of {xs}."),
    "month_number": ("Which months of the year are {xs}?", "Give the month numbers of {xs}."),
}


def calendar_list(rng: random.Random) -> Example:
    kind = rng.choice(list(CALENDAR_LIST_PROMPTS))
    pool = DAYS if kind.endswith("_day") else MONTHS
    xs = rng.sample(pool, rng.randint(2, 4))
    prompt = rng.choice(CALENDAR_LIST_PROMPTS[kind]).format(xs=_listing(xs))
    units = [(x, calendar_fact(kind, x)) for x in xs]
    return _planned(prompt, "calendar_list", f"calendar_list|{kind}|{','.join(xs)}", units)


TABLE_PROMPTS = ("Prices: {table}. {question}", "Here is a price list: {table}. {question}")


def _table(rng: random.Random, size: int) -> dict[str, int]:
    items = rng.sample(ITEMS, size)
    prices = rng.sample(range(2, 21), size)  # distinct, so every comparison has a winner; plural 'coins'
    return dict(zip(items, prices))


def _table_text(table: dict[str, int]) -> str:
    return ", ".join(f"{item} {price}" for item, price in table.items())


def _table_key(table: dict[str, int]) -> str:
    return ",".join(f"{i}={p}" for i, p in table.items())


def table_lookup(rng: random.Random) -> Example:
    table = _table(rng, rng.randint(3, 5))
    asked = rng.sample(list(table), rng.randint(2, min(4, len(table))))
    question = rng.choice(("How much do {xs} cost?", "What are the prices of {xs}?"))
    question = question.format(xs=_listing([f"the {x}" for x in asked]))
    prompt = rng.choice(TABLE_PROMPTS).format(table=_table_text(table), question=question)
    units = [(f"{x} price", price_fact("price", table, x)) for x in asked]
    return _planned(prompt, "table_lookup", f"table_lookup|{_table_key(table)}|{','.join(asked)}", units)


# ----------------------------------------------------------------------------- two rounds


def _two_rounds(
    rng: random.Random, prompt: str, family: str, key: str, first: Sequence[tuple[str, Fact]], topic: str, last: Fact
) -> Example:
    """Round 1 states `first`; after `<sync/>` the derived fact `last` comes as a promised span or as plain text."""
    texts = _spaced([f.sentence() for _, f in first] + [conclusion(last)])
    round1 = tuple(Unit(t, text) for (t, _), text in zip(first, texts))
    facts = tuple(f for _, f in first) + (last,)
    if rng.random() < 0.5:
        return Example(prompt, "multi_round", family, key, (round1, (Unit(topic, texts[-1]),)), "", facts)
    return Example(prompt, "multi_round", family, key, (round1,), texts[-1], facts)


def longer_word(rng: random.Random) -> Example:
    a, b = rng.sample(WORDS, 2)
    while len(a) == len(b):
        b = rng.choice(WORDS)
    question = rng.choice(
        ("Which word is longer, {a} or {b}?", "Which has more letters: {a} or {b}?", "Compare the lengths of {a} and {b}.")
    )
    first = [(f"{w} letters", word_fact("letter_count", w)) for w in (a, b)]
    winner, loser = (a, b) if len(a) > len(b) else (b, a)
    last = word_fact("longer", winner, loser)
    return _two_rounds(rng, question.format(a=a, b=b), "longer_word", f"longer_word|{a},{b}", first, "longer word", last)


def larger_number(rng: random.Random) -> Example:
    """Which of two derived numbers is larger: successor vs predecessor, or tens digit vs ones digit."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        kinds, topics = ("next", "previous"), ("next number", "previous number")
        question = "Which is larger: the number after {a} or the number before {b}?"
    else:
        kinds, topics = ("tens", "ones"), ("tens digit", "ones digit")
        question = "Which is larger: the tens digit of {a} or the ones digit of {b}?"
    first = [(topics[0], number_fact(kinds[0], a)), (topics[1], number_fact(kinds[1], b))]
    x, y = int(first[0][1].value), int(first[1][1].value)
    if x == y:  # no winner; draw again
        return larger_number(rng)
    last = number_fact("compare", max(x, y), min(x, y))
    key = f"larger_number|{kinds[0]},{kinds[1]}|{a},{b}"
    return _two_rounds(rng, question.format(a=a, b=b), "larger_number", key, first, "larger number", last)


def costlier_item(rng: random.Random) -> Example:
    table = _table(rng, rng.randint(3, 5))
    a, b = rng.sample(list(table), 2)
    question = rng.choice(("Which costs more, the {a} or the {b}?", "Is the {a} or the {b} more expensive?"))
    prompt = rng.choice(TABLE_PROMPTS).format(table=_table_text(table), question=question.format(a=a, b=b))
    first = [(f"{x} price", price_fact("price", table, x)) for x in (a, b)]
    winner, loser = (a, b) if table[a] > table[b] else (b, a)
    last = price_fact("costlier", table, winner, loser)
    key = f"costlier_item|{_table_key(table)}|{a},{b}"
    return _two_rounds(rng, prompt, "costlier_item", key, first, "pricier item", last)


def calendar_steps(rng: random.Random) -> Example:
    """Two or three days/months after or before: each round steps on from the answer of the round before."""
    kind = rng.choice(("next_day", "previous_day", "next_month", "previous_month"))
    unit = "day" if kind.endswith("_day") else "month"
    x = rng.choice(DAYS if unit == "day" else MONTHS)
    steps = rng.choice((2, 3))
    side = "after" if kind.startswith("next") else "before"
    prompt = rng.choice(("What {u} is {k} {u}s {side} {x}?", "Which {u} comes {k} {u}s {side} {x}?"))
    prompt = prompt.format(u=unit, k=("two", "three")[steps - 2], side=side, x=x)
    facts = [calendar_fact(kind, x)]
    for _ in range(steps - 1):
        facts.append(calendar_fact(kind, facts[-1].value))
    texts = _spaced([f.sentence() for f in facts])
    topic = f"{'next' if side == 'after' else 'previous'} {unit}"
    rounds = tuple((Unit(topic, t),) for t in texts)
    key = f"calendar_steps|{kind}|{x}|{steps}"
    if rng.random() < 0.5:  # the last step as a promised span, or as plain text after the last <sync/>
        return Example(prompt, "multi_round", "calendar_steps", key, rounds, "", tuple(facts))
    return Example(prompt, "multi_round", "calendar_steps", key, rounds[:-1], texts[-1], tuple(facts))


# ----------------------------------------------------------------------------- plain

SINGLE_QUESTIONS = {
    "parity": ("Is {n} even or odd?", "Is the number {n} even or odd?"),
    "next": ("What number comes after {n}?", "What is the next number after {n}?"),
    "previous": ("What number comes before {n}?", "What is the number before {n}?"),
    "tens": ("What is the tens digit of {n}?",),
    "ones": ("What is the ones digit of {n}?",),
    "compare": ("Is {n} greater or less than {m}?", "How does {n} compare with {m}?"),
    "first_letter": ("What is the first letter of {w}?", "Which letter does {w} start with?"),
    "last_letter": ("What is the last letter of {w}?", "Which letter does {w} end with?"),
    "letter_count": ("How many letters does {w} have?", "How many letters are in the word {w}?"),
    "next_day": ("What day comes after {d}?", "Which day follows {d}?"),
    "previous_day": ("What day comes before {d}?",),
    "next_month": ("What month comes after {mo}?", "Which month follows {mo}?"),
    "previous_month": ("What month comes before {mo}?",),
    "month_days": ("How many days does {mo} have?",),
    "month_number": ("Which month of the year is {mo}?",),
    "price": ("Prices: {table}. How much does the {x} cost?", "Here is a price list: {table}. What is the price of the {x}?"),
}


def single_fact(rng: random.Random) -> Example:
    kind = rng.choice(list(SINGLE_QUESTIONS))
    n, m = rng.randint(10, 99), rng.randint(1, 99)
    while m == n:
        m = rng.randint(1, 99)
    w, d, mo = rng.choice(WORDS), rng.choice(DAYS), rng.choice(MONTHS)
    table = _table(rng, rng.randint(3, 5))
    x = rng.choice(list(table))
    if kind in NUMBER_ASK:
        fact, subject = number_fact(kind, n, m), f"{n},{m}" if kind == "compare" else str(n)
    elif kind in WORD_ASK:
        fact, subject = word_fact(kind, w), w
    elif kind in DAY_ASK:
        fact, subject = calendar_fact(kind, d), d
    elif kind in MONTH_ASK:
        fact, subject = calendar_fact(kind, mo), mo
    else:
        fact, subject = price_fact(kind, table, x), f"{_table_key(table)}|{x}"
    prompt = rng.choice(SINGLE_QUESTIONS[kind]).format(n=n, m=m, w=w, d=d, mo=mo, x=x, table=_table_text(table))
    return Example(prompt, "plain", "single_fact", f"single_fact|{kind}|{subject}", (), fact.sentence(), (fact,))


GREETINGS = ("Hello", "Hi", "Hey", "Hello there", "Hi there", "Good morning", "Good afternoon", "Good evening")
CHAT = (
    ("How are you?", "I am fine, thank you."),
    ("How are you today?", "I am doing well, thank you."),
    ("Who are you?", "I am a small assistant."),
    ("What can you do?", "I can answer simple questions about numbers, words, days, months and prices."),
    ("Can you help me?", "Yes, I can help with simple questions."),
    ("Thank you!", "You are welcome."),
    ("Thanks for your help.", "You are welcome. I am glad I could help."),
    ("Are you a robot?", "I am a small language model."),
    ("What is your name?", "I am a small assistant without a name."),
    ("Nice to meet you.", "Nice to meet you too."),
    ("Goodbye!", "Goodbye! Have a nice day."),
    ("What should I ask you?", "Ask me about a number, a word, a day, a month or a price list."),
)


def chat(rng: random.Random) -> Example:
    greeting = rng.choice(GREETINGS)
    question, reply = rng.choice(CHAT)
    with_greeting = rng.random() < 0.7
    prompt = f"{greeting}! {question}" if with_greeting else question
    answer = f"{greeting}! {reply}" if with_greeting else reply
    return Example(prompt, "plain", "chat", f"chat|{prompt}", (), answer, ())


def pairs_family(pairs: Sequence[tuple[str, str]], name: str = "chatterbot") -> "Family":
    """A plain-answer family drawing from fixed (prompt, answer) pairs, e.g. `chatterbot_pairs()`."""

    def family(rng: random.Random) -> Example:
        prompt, answer = rng.choice(pairs)
        return Example(prompt, "plain", name, f"{name}|{prompt}", (), answer, ())

    return family


Family = Callable[[random.Random], Example]
FAMILIES: dict[Shape, tuple[Family, ...]] = {
    "one_round": (number_facts, number_list, word_facts, word_list, day_facts, month_facts, calendar_list, table_lookup),
    "multi_round": (longer_word, larger_number, costlier_item, calendar_steps),
    "plain": (single_fact, single_fact, single_fact, single_fact, chat),  # chat is a fifth of plain answers
}
