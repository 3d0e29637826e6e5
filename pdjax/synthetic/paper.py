"""Task families of the paper's shape (``tasks="paper"``): few long, independent spans per round.

The default task set (`pdjax.synthetic.tasks`) gives one short fact per span, so
every ~8-token span costs a ~6-token promise. Planned Diffusion's data (METHOD §5,
arXiv 2510.18087) has a median of 2 and a mean of 3.1 spans of 10-200 tokens in
a first round. Here a prompt names 2-4 subjects (numbers, words, months, weekdays,
pairs from a price list) and each span states a *profile* of its subject: 2-5
facts that the prompt determines and a program checks, about 15-60 tokens. A span
depends only on the prompt and its own promise's topic, so the spans of a round
can be written in parallel. A topic is one word ("tiger", "March", "first",
or the first item of a compared pair), so a whole promise
`<promise>-<topic>tiger 3</topic>` is 5-6 tokens.

- ``one_round``: one span per subject, 2-4 subjects;
- ``multi_round``: round 1 as above; after `<sync/>` a second round of 2 spans,
  each restating two values from round 1 and comparing them ("So 7 is greater
  than 2."), which needs round 1's facts;
- ``plain``: the same kinds of questions (or one subject, or a line of chat) answered without a plan.

Every fact is one of `pdjax.synthetic.facts.KINDS`, so `check_completion` scores
these answers unchanged. `Example.key` names the *set of subjects* (not the
wording, order, family or shape), so a held-out prompt never asks about a
combination of subjects seen in training.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

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
from pdjax.synthetic.tasks import CHAT, GREETINGS, ORDINALS, Example, Shape, Unit, _listing, _spaced

PAPER_MIX: dict[str, float] = {"one_round": 0.7, "multi_round": 0.24, "plain": 0.06}

# ----------------------------------------------------------------------------- subject profiles

# Groups of number facts a prompt can ask for, with how the prompt names them.
NUMBER_GROUPS = {
    "neighbours": (("previous", "next"), ("the numbers before and after it", "its neighbours")),
    "parity": (("parity",), ("its parity", "whether it is even or odd")),
    "digits": (("tens", "ones"), ("its digits", "its tens and ones digits")),
}
MONTH_GROUPS = {
    "neighbours": (("previous_month", "next_month"), ("the months before and after it", "its neighbouring months")),
    "number": (("month_number",), ("its number in the year", "which month of the year it is")),
    "days": (("month_days",), ("how many days it has", "its number of days")),
}


def _number_facts(n: int, groups: Sequence[str]) -> list[Fact]:
    return [number_fact(k, n) for g in groups for k in NUMBER_GROUPS[g][0]]


def _word_facts(w: str) -> list[Fact]:
    return [word_fact(k, w) for k in ("first_letter", "last_letter", "letter_count")]


def _month_facts(mo: str, groups: Sequence[str]) -> list[Fact]:
    return [calendar_fact(k, mo) for g in groups for k in MONTH_GROUPS[g][0]]


def _text(facts: Sequence[Fact], conclude: bool = False) -> str:
    """The facts' sentences; with `conclude` the last one is written as a conclusion ('So ...')."""
    sentences = [f.sentence() for f in facts]
    if conclude:
        sentences[-1] = conclusion(facts[-1])
    return " ".join(sentences)


def _round(topics: Sequence[str], facts: Sequence[Sequence[Fact]], conclude: bool = False) -> tuple[Unit, ...]:
    texts = [_text(fs, conclude) for fs in facts]
    return tuple(Unit(t, x) for t, x in zip(topics, texts, strict=True))


def _respace(rounds: Sequence[tuple[Unit, ...]]) -> tuple[tuple[Unit, ...], ...]:
    """Give every span but the very first a leading space, so the answer without its plan reads as text."""
    flat = _spaced([u.text for r in rounds for u in r])
    out, i = [], 0
    for r in rounds:
        out.append(tuple(Unit(u.topic, flat[i + j]) for j, u in enumerate(r)))
        i += len(r)
    return tuple(out)


def _example(
    prompt: str,
    shape: Shape,
    family: str,
    key: str,
    rounds: Sequence[tuple[Unit, ...]],
    facts: Sequence[Sequence[Fact]],
) -> Example:
    flat = tuple(f for fs in facts for f in fs)
    return Example(prompt, shape, family, key, _respace(rounds), "", flat)


def _asks(rng: random.Random, groups: dict, low: int, high: int, required: Sequence[str] = ()) -> tuple[list[str], str]:
    """Draw `low`..`high` groups (always including `required`), in a random order; return them and their wording."""
    rest = [g for g in groups if g not in required]
    chosen = list(required) + rng.sample(rest, rng.randint(max(0, low - len(required)), high - len(required)))
    rng.shuffle(chosen)
    return chosen, _listing([rng.choice(groups[g][1]) for g in chosen])


# ----------------------------------------------------------------------------- one round

# Subjects per planned round: 3 or 4 (the 2-4 promises per round; 2-span rounds cannot pay for
# their promises at steps_ratio 1.0, see docs/default_model_v2.md).
def _count(rng: random.Random) -> int:
    return 3 if rng.random() < 0.35 else 4


def _others(count: int, i: int) -> tuple[int, int]:
    """The two subjects a span about subject i is compared with: the next two, cyclically."""
    return (i + 1) % count, (i + 2) % count


def _distinct(values: Sequence[object]) -> bool:
    return len(set(values)) == len(values)


NUMBERS_PROMPTS = (
    "For each of the numbers {xs}, give its neighbours, its parity and its digits, and compare it with the next number listed.",
    "Tell me about each of the numbers {xs}: the numbers before and after it, whether it is even or odd, its tens and ones digits, and how it compares with the next one in the list.",
    "Describe each of {xs}: neighbours, parity, digits, and a comparison with the number listed after it.",
)


def numbers(rng: random.Random, count: int | None = None) -> tuple[list[int], str]:
    ns = rng.sample(range(10, 100), count or _count(rng))
    return ns, rng.choice(NUMBERS_PROMPTS).format(xs=_listing([str(n) for n in ns]))


def _number_profile(ns: Sequence[int], i: int) -> list[Fact]:
    """Neighbours, parity and digits of ns[i], then how it compares with the next number listed (6 facts)."""
    n = ns[i]
    kinds = ("previous", "next", "parity", "tens", "ones")
    return [number_fact(k, n) for k in kinds] + [number_fact("compare", n, ns[(i + 1) % len(ns)])]


def number_profiles(rng: random.Random) -> Example:
    ns, prompt = numbers(rng)
    # Numbers cannot stand in a topic (its first digits are the length), so spans are named by order ("first", ...).
    facts = [_number_profile(ns, i) for i in range(len(ns))]
    rnd = _round([ORDINALS[i] for i in range(len(ns))], facts)
    return _example(prompt, "one_round", "number_profiles", f"numbers|{','.join(map(str, sorted(ns)))}", [rnd], facts)


WORDS_PROMPTS = (
    "For each of the words {xs}, give its first letter, its last letter and its length, and compare its length with each of the others.",
    "Spell out the words {xs}: first letter, last letter and length of each, and whether it is longer or shorter than each of the others.",
)


def _words(rng: random.Random, count: int) -> list[str]:
    """`count` words of different lengths (every comparison has a winner)."""
    for _ in range(1000):
        ws = rng.sample(WORDS, count)
        if _distinct([len(w) for w in ws]):
            return ws
    raise RuntimeError("no words of distinct lengths drawn")  # pragma: no cover


def _word_profile(ws: Sequence[str], i: int) -> list[Fact]:
    """First and last letter and length of ws[i], then its length against each other word, in list order (5-6 facts)."""
    w = ws[i]
    own = [word_fact(k, w) for k in ("first_letter", "last_letter", "letter_count")]
    return own + [word_fact("longer", w, ws[(i + j) % len(ws)]) for j in range(1, len(ws))]


def word_profiles(rng: random.Random) -> Example:
    ws = _words(rng, _count(rng))
    prompt = rng.choice(WORDS_PROMPTS).format(xs=_listing(ws))
    facts = [_word_profile(ws, i) for i in range(len(ws))]
    return _example(prompt, "one_round", "word_profiles", f"words|{','.join(sorted(ws))}", [_round(ws, facts)], facts)


MONTHS_PROMPTS = ("For each of {xs}, give {asks}.", "Tell me about the months {xs}: {asks}.")
# What a month's profile states, in the order the prompt asks for it (so a span's text varies with the prompt).
MONTH_ASKS = {
    "neighbours": ("the months before and after it", "its neighbouring months"),
    "number": ("its number in the year", "which month of the year it is"),
    "days": ("how many days it has", "its number of days"),
    "next_days": ("how many days the month after it has", "the days of the following month"),
}


def _month_asks(rng: random.Random) -> tuple[list[str], str]:
    """All four parts of a month profile in a random order, and the prompt's wording of them."""
    order = rng.sample(list(MONTH_ASKS), len(MONTH_ASKS))
    return order, _listing([rng.choice(MONTH_ASKS[g]) for g in order])


def _month_profile(mo: str, order: Sequence[str]) -> list[Fact]:
    """Neighbours, number and days of a month and the days of the month after it (5 facts), in `order`."""
    after = calendar_fact("next_month", mo)
    parts = {
        "neighbours": [calendar_fact("previous_month", mo), after],
        "number": [calendar_fact("month_number", mo)],
        "days": [calendar_fact("month_days", mo)],
        "next_days": [calendar_fact("month_days", after.value)],
    }
    return [f for g in order for f in parts[g]]


def month_profiles(rng: random.Random) -> Example:
    mos = rng.sample(MONTHS, _count(rng))
    order, asks = _month_asks(rng)
    prompt = rng.choice(MONTHS_PROMPTS).format(xs=_listing(mos), asks=asks)
    facts = [_month_profile(mo, order) for mo in mos]
    key = f"months|{','.join(sorted(mos))}"
    return _example(prompt, "one_round", "month_profiles", key, [_round(mos, facts)], facts)


DAYS_PROMPTS = (
    "For each of {xs}, give {asks}.",
    "Which days come around {xs}? Give {asks}.",
)
_COUNTS = {2: "two", 3: "three"}


def _day_asks(rng: random.Random) -> tuple[tuple[int, int, bool], str]:
    """How many days back and forward (2+3 or 3+2), which comes first, and the prompt's wording."""
    back, forward = rng.choice(((2, 3), (3, 2)))
    back_first = rng.random() < 0.5
    parts = [f"the {_COUNTS[back]} days before it", f"the {_COUNTS[forward]} days after it"]
    return (back, forward, back_first), " and ".join(parts if back_first else parts[::-1])


def _day_profile(d: str, how: tuple[int, int, bool]) -> list[Fact]:
    """A chain walking `back` days back and `forward` days forward from d (each fact checkable on its own)."""
    back, forward, back_first = how

    def walk(kind: str, steps: int) -> list[Fact]:
        chain, day = [], d
        for _ in range(steps):
            chain.append(calendar_fact(kind, day))
            day = chain[-1].value
        return chain

    before, after = walk("previous_day", back), walk("next_day", forward)
    return before + after if back_first else after + before


def day_profiles(rng: random.Random) -> Example:
    ds = rng.sample(DAYS, _count(rng))
    how, asks = _day_asks(rng)
    prompt = rng.choice(DAYS_PROMPTS).format(xs=_listing(ds), asks=asks)
    facts = [_day_profile(d, how) for d in ds]
    return _example(prompt, "one_round", "day_profiles", f"days|{','.join(sorted(ds))}", [_round(ds, facts)], facts)


PRICE_PROMPTS = (
    "Prices: {table}. For each of {xs}, give its price and compare it with the next two of them.",
    "Here is a price list: {table}. For each of {xs}, say what it costs and whether it costs more or less than the next two of them.",
)


def _price_table(rng: random.Random, items: int) -> dict[str, int]:
    names = rng.sample(ITEMS, items)
    return dict(zip(names, rng.sample(range(2, 21), items)))  # distinct prices: every comparison has a winner


def _table_text(table: dict[str, int]) -> str:
    return ", ".join(f"{item} {price}" for item, price in table.items())


def _price_profile(table: dict[str, int], names: Sequence[str], i: int) -> list[Fact]:
    """The price of names[i], then each of the next two items' prices and how names[i] compares with it (5 facts)."""
    a = names[i]
    facts = [price_fact("price", table, a)]
    for j in _others(len(names), i):
        facts += [price_fact("price", table, names[j]), price_fact("costlier", table, a, names[j])]
    return facts


def price_profiles(rng: random.Random) -> Example:
    count = _count(rng)
    table = _price_table(rng, rng.randint(count + 1, min(len(ITEMS), count + 4)))
    names = rng.sample(list(table), count)
    prompt = rng.choice(PRICE_PROMPTS).format(table=_table_text(table), xs=_listing([f"the {a}" for a in names]))
    facts = [_price_profile(table, names, i) for i in range(count)]
    key = "prices|" + ",".join(sorted(f"{a}={table[a]}" for a in names))
    return _example(prompt, "one_round", "price_profiles", key, [_round(names, facts)], facts)


MIXED_PROMPTS = ("Tell me about {xs}.", "Describe {xs}.", "What can you say about {xs}?")
MIXED_KINDS = ("number", "month", "day")  # a word's own profile is half as long: it would pad its round


def mixed_profiles(rng: random.Random) -> Example:
    """Subjects of different kinds in one prompt, each with its full profile (the prompt names only the subjects)."""
    kinds = rng.sample(MIXED_KINDS, len(MIXED_KINDS))
    named, topics, facts, key = [], [], [], []
    for kind in kinds:
        if kind == "number":
            n = rng.randint(10, 99)
            named.append(f"the number {n}")
            topics.append("number")
            facts.append(_number_profile([n, rng.choice([m for m in range(10, 100) if m != n])], 0)[:5])
            key.append(str(n))
        elif kind == "word":
            w = rng.choice(WORDS)
            named.append(f"the word {w}")
            topics.append(w)
            facts.append([word_fact(k, w) for k in ("first_letter", "last_letter", "letter_count")])
            key.append(w)
        elif kind == "month":
            mo = rng.choice(MONTHS)
            named.append(mo)
            topics.append(mo)
            facts.append(_month_profile(mo, tuple(MONTH_ASKS)))
            key.append(mo)
        else:
            d = rng.choice(DAYS)
            named.append(d)
            topics.append(d)
            facts.append(_day_profile(d, (2, 3, True)))
            key.append(d)
    prompt = rng.choice(MIXED_PROMPTS).format(xs=_listing(named))
    return _example(
        prompt, "one_round", "mixed_profiles", f"mixed|{','.join(sorted(key))}", [_round(topics, facts)], facts
    )


# ----------------------------------------------------------------------------- two rounds


def _against_two(restate: Sequence[Fact], verdicts: Sequence[Fact]) -> tuple[list[Fact], str]:
    """Round 2's span about subject i: its value, then each other value restated and the verdict as 'So ...'.

    restate = [value(i), value(j), value(k)], verdicts = [i vs j, i vs k]: 5 facts, all values from round 1.
    """
    facts = [restate[0], restate[1], verdicts[0], restate[2], verdicts[1]]
    text = " ".join(
        [restate[0].sentence(), restate[1].sentence(), conclusion(verdicts[0]), restate[2].sentence(), conclusion(verdicts[1])]
    )
    return facts, text


def _second_round(topics: Sequence[str], spans: Sequence[tuple[list[Fact], str]]) -> tuple[tuple[Unit, ...], list[list[Fact]]]:
    return tuple(Unit(t, text) for t, (_, text) in zip(topics, spans, strict=True)), [fs for fs, _ in spans]


def number_compare(rng: random.Random) -> Example:
    """Round 1: profiles of 3 numbers; round 2: each number's derived value (next, previous, tens, ones) against the next two."""
    for _ in range(1000):
        kind = rng.choice(("next", "previous", "tens", "ones"))
        ns, prompt = numbers(rng, 3)  # three: two rounds of four long spans would not fit 512 tokens
        values = [int(number_fact(kind, n).value) for n in ns]
        if _distinct(values):
            break
    else:  # pragma: no cover - 1000 draws without distinct values is practically impossible
        raise RuntimeError("number_compare: no distinct values drawn")
    what = {
        "next": "the numbers after them",
        "previous": "the numbers before them",
        "tens": "their tens digits",
        "ones": "their ones digits",
    }[kind]
    prompt += f" Then compare {what}, each with the next two."
    first = [_number_profile(ns, i) for i in range(len(ns))]
    spans = []
    for i in range(len(ns)):
        j, k = _others(len(ns), i)
        restate = [number_fact(kind, ns[x]) for x in (i, j, k)]
        spans.append(_against_two(restate, [number_fact("compare", values[i], values[x]) for x in (j, k)]))
    topics = [ORDINALS[i] for i in range(len(ns))]
    second_units, second = _second_round(topics, spans)
    rounds = [_round(topics, first), second_units]
    key = f"numbers|{','.join(map(str, sorted(ns)))}"
    return _example(prompt, "multi_round", "number_compare", key, rounds, first + second)


def month_compare(rng: random.Random) -> Example:
    """Round 1: profiles of 3 months; round 2: each month's number in the year against the next two months'."""
    mos = rng.sample(MONTHS, 3)  # three: two rounds of four long spans would not fit 512 tokens
    order, asks = _month_asks(rng)
    prompt = rng.choice(MONTHS_PROMPTS).format(xs=_listing(mos), asks=asks)
    prompt += " Then compare their numbers in the year, each with the next two."
    first = [_month_profile(mo, order) for mo in mos]
    spans = []
    for i in range(len(mos)):
        j, k = _others(len(mos), i)
        restate = [calendar_fact("month_number", mos[x]) for x in (i, j, k)]
        n = [int(f.value) for f in restate]
        spans.append(_against_two(restate, [number_fact("compare", n[0], n[1]), number_fact("compare", n[0], n[2])]))
    second_units, second = _second_round(mos, spans)
    rounds = [_round(mos, first), second_units]
    key = f"months|{','.join(sorted(mos))}"
    return _example(prompt, "multi_round", "month_compare", key, rounds, first + second)


# ----------------------------------------------------------------------------- plain

SINGLE_PROMPTS = {
    "number": ("Tell me about the number {x}: {asks}.", "For the number {x}, give {asks}."),
    "word": ("Tell me about the word {x}: its first and last letters and its length.",),
    "month": ("Tell me about {x}: {asks}.",),
    "day": ("Which days come around {x}? Give the day before it and the two days after it.",),
}


def single_profile(rng: random.Random) -> Example:
    """One subject's profile, answered as plain text (no plan)."""
    kind = rng.choice(("number", "word", "month", "day"))
    asks = ""
    if kind == "number":
        x = rng.randint(10, 99)
        groups, asks = _asks(rng, NUMBER_GROUPS, 2, 3)
        facts = _number_facts(x, groups)
    elif kind == "word":
        x = rng.choice(WORDS)
        facts = _word_facts(x)
    elif kind == "month":
        x = rng.choice(MONTHS)
        groups, asks = _asks(rng, MONTH_GROUPS, 2, 3, required=("neighbours",))
        facts = _month_facts(x, groups)
    else:
        x = rng.choice(DAYS)
        facts = _day_profile(x, (1, 2, True))  # the day before it and the two days after it
    prompt = rng.choice(SINGLE_PROMPTS[kind]).format(x=x, asks=asks)
    key = f"single|{kind}|{x}|{','.join(f.kind for f in facts)}"
    return Example(prompt, "plain", "single_profile", key, (), _text(facts), tuple(facts))


def plain(family: "Family") -> "Family":
    """The same questions as a planned family, answered as plain text (the share of answers left unplanned).

    The key stays the family's subject combination, so a combination is never both in train and held out.
    """

    def draw(rng: random.Random) -> Example:
        ex = family(rng)
        return Example(ex.prompt, "plain", f"plain_{ex.family}", ex.key, (), ex.answer, ex.facts)

    draw.__name__ = f"plain_{family.__name__}"
    return draw


def chat(rng: random.Random) -> Example:
    greeting = rng.choice(GREETINGS)
    question, reply = rng.choice(CHAT)
    prompt, answer = (f"{greeting}! {question}", f"{greeting}! {reply}") if rng.random() < 0.7 else (question, reply)
    return Example(prompt, "plain", "chat", f"chat|{prompt}", (), answer, ())


Family = Callable[[random.Random], Example]
PAPER_FAMILIES: dict[Shape, tuple[Family, ...]] = {
    "one_round": (number_profiles, word_profiles, month_profiles, day_profiles, price_profiles, mixed_profiles),
    "multi_round": (number_compare, month_compare),
    "plain": (plain(word_profiles), single_profile, chat),
}
