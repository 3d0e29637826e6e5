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

PAPER_MIX: dict[str, float] = {"one_round": 0.5, "multi_round": 0.35, "plain": 0.15}

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


def _day_facts(d: str) -> list[Fact]:
    """The day before, the day after, and the day after that (a chain, each fact checkable on its own)."""
    after = calendar_fact("next_day", d)
    return [calendar_fact("previous_day", d), after, calendar_fact("next_day", after.value)]


def _pair_facts(table: dict[str, int], a: str, b: str) -> list[Fact]:
    return [price_fact("price", table, a), price_fact("price", table, b), price_fact("costlier", table, a, b)]


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

NUMBERS_PROMPTS = (
    "For each of the numbers {xs}, give {asks}.",
    "Tell me about each of the numbers {xs}: {asks}.",
    "Describe each of {xs}: {asks}.",
)


def numbers(
    rng: random.Random, count: int | None = None, required: Sequence[str] = ()
) -> tuple[list[int], list[str], str]:
    ns = rng.sample(range(10, 100), count or rng.randint(2, 4))
    groups, asks = _asks(rng, NUMBER_GROUPS, 2, 3, required)
    return ns, groups, rng.choice(NUMBERS_PROMPTS).format(xs=_listing([str(n) for n in ns]), asks=asks)


def number_profiles(rng: random.Random) -> Example:
    ns, groups, prompt = numbers(rng)
    # Numbers cannot stand in a topic (its first digits are the length), so spans are named by order ("first", ...).
    facts = [_number_facts(n, groups) for n in ns]
    rnd = _round([ORDINALS[i] for i in range(len(ns))], facts)
    return _example(prompt, "one_round", "number_profiles", f"numbers|{','.join(map(str, sorted(ns)))}", [rnd], facts)


WORDS_PROMPTS = (
    "For each of the words {xs}, give its first letter, its last letter and how many letters it has.",
    "Spell out the words {xs}: first letter, last letter and length of each.",
    "Tell me about the words {xs}: their first and last letters and their lengths.",
)


def word_profiles(rng: random.Random) -> Example:
    ws = rng.sample(WORDS, rng.randint(2, 4))
    prompt = rng.choice(WORDS_PROMPTS).format(xs=_listing(ws))
    facts = [_word_facts(w) for w in ws]
    return _example(prompt, "one_round", "word_profiles", f"words|{','.join(sorted(ws))}", [_round(ws, facts)], facts)


MONTHS_PROMPTS = ("For each of {xs}, give {asks}.", "Tell me about the months {xs}: {asks}.")


def month_profiles(rng: random.Random) -> Example:
    mos = rng.sample(MONTHS, rng.randint(2, 4))
    groups, asks = _asks(rng, MONTH_GROUPS, 2, 3, required=("neighbours",))
    prompt = rng.choice(MONTHS_PROMPTS).format(xs=_listing(mos), asks=asks)
    facts = [_month_facts(mo, groups) for mo in mos]
    key = f"months|{','.join(sorted(mos))}"
    return _example(prompt, "one_round", "month_profiles", key, [_round(mos, facts)], facts)


DAYS_PROMPTS = (
    "For each of {xs}, give the day before it and the two days after it.",
    "Which days come around {xs}? Give the day before each and the two days after it.",
)


def day_profiles(rng: random.Random) -> Example:
    ds = rng.sample(DAYS, rng.randint(2, 3))
    prompt = rng.choice(DAYS_PROMPTS).format(xs=_listing(ds))
    facts = [_day_facts(d) for d in ds]
    return _example(prompt, "one_round", "day_profiles", f"days|{','.join(sorted(ds))}", [_round(ds, facts)], facts)


PRICE_PROMPTS = ("Prices: {table}. Compare {pairs}.", "Here is a price list: {table}. Compare {pairs}.")


def _price_table(rng: random.Random, items: int) -> dict[str, int]:
    names = rng.sample(ITEMS, items)
    return dict(zip(names, rng.sample(range(2, 21), items)))  # distinct prices: every comparison has a winner


def _table_text(table: dict[str, int]) -> str:
    return ", ".join(f"{item} {price}" for item, price in table.items())


def _pairs_text(pairs: Sequence[tuple[str, str]]) -> str:
    return _listing([f"the {a} with the {b}" for a, b in pairs])


def _pairs_key(table: dict[str, int], pairs: Sequence[tuple[str, str]]) -> str:
    return ",".join(sorted("+".join(sorted((f"{a}={table[a]}", f"{b}={table[b]}"))) for a, b in pairs))


def price_pairs(rng: random.Random) -> Example:
    count = rng.randint(2, 4)
    table = _price_table(rng, rng.randint(2 * count, min(len(ITEMS), 2 * count + 2)))
    names = rng.sample(list(table), 2 * count)
    pairs = [(names[2 * i], names[2 * i + 1]) for i in range(count)]
    prompt = rng.choice(PRICE_PROMPTS).format(table=_table_text(table), pairs=_pairs_text(pairs))
    facts = [_pair_facts(table, a, b) for a, b in pairs]
    rnd = _round([a for a, _ in pairs], facts)  # an item is in one pair only: it names the pair
    return _example(prompt, "one_round", "price_pairs", f"prices|{_pairs_key(table, pairs)}", [rnd], facts)


MIXED_PROMPTS = ("Tell me about {xs}.", "Describe {xs}.", "What can you say about {xs}?")
MIXED_KINDS = ("number", "word", "month", "day")


def mixed_profiles(rng: random.Random) -> Example:
    """Subjects of different kinds in one prompt, each with its full profile (the prompt names only the subjects)."""
    kinds = rng.sample(MIXED_KINDS, rng.randint(2, 4))
    rng.shuffle(kinds)
    named, topics, facts, key = [], [], [], []
    for kind in kinds:
        if kind == "number":
            n = rng.randint(10, 99)
            named.append(f"the number {n}")
            topics.append("number")
            facts.append(_number_facts(n, ("neighbours", "parity", "digits")))
            key.append(str(n))
        elif kind == "word":
            w = rng.choice(WORDS)
            named.append(f"the word {w}")
            topics.append(w)
            facts.append(_word_facts(w))
            key.append(w)
        elif kind == "month":
            mo = rng.choice(MONTHS)
            named.append(mo)
            topics.append(mo)
            facts.append(_month_facts(mo, ("number", "days", "neighbours")))
            key.append(mo)
        else:
            d = rng.choice(DAYS)
            named.append(d)
            topics.append(d)
            facts.append(_day_facts(d))
            key.append(d)
    prompt = rng.choice(MIXED_PROMPTS).format(xs=_listing(named))
    return _example(
        prompt, "one_round", "mixed_profiles", f"mixed|{','.join(sorted(key))}", [_round(topics, facts)], facts
    )


# ----------------------------------------------------------------------------- two rounds


def _comparison_pairs(count: int) -> list[tuple[int, int]]:
    """Which round-1 subjects the 2 spans of round 2 compare: (1,2),(2,3) for three, (1,2),(3,4) for four."""
    return [(0, 1), (1, 2)] if count == 3 else [(0, 1), (2, 3)]


def number_compare(rng: random.Random) -> Example:
    """Round 1: profiles of 3-4 numbers; round 2: compare one derived value (next, previous, tens, ones) pairwise."""
    for _ in range(100):
        kind = rng.choice(("next", "previous", "tens", "ones"))
        group = "neighbours" if kind in ("next", "previous") else "digits"
        ns, groups, prompt = numbers(rng, rng.randint(3, 4), required=(group,))
        pairs = _comparison_pairs(len(ns))
        values = [int(number_fact(kind, n).value) for n in ns]
        if all(values[i] != values[j] for i, j in pairs):
            break
    else:  # pragma: no cover - 100 draws without a strict comparison is practically impossible
        raise RuntimeError("number_compare: no distinct values drawn")
    what = {"next": "numbers after", "previous": "numbers before", "tens": "tens digits", "ones": "ones digits"}[kind]
    prompt += f" Then compare the {what} " + "; ".join(f"{ns[i]} and {ns[j]}" for i, j in pairs) + "."
    first = [_number_facts(n, groups) for n in ns]
    second = [
        [number_fact(kind, ns[i]), number_fact(kind, ns[j]), number_fact("compare", values[i], values[j])]
        for i, j in pairs
    ]
    topics1 = [ORDINALS[i] for i in range(len(ns))]
    topics2 = [ORDINALS[i] for i, _ in pairs]  # named by the first number compared
    rounds = [_round(topics1, first), _round(topics2, second, conclude=True)]
    key = f"numbers|{','.join(map(str, sorted(ns)))}"
    return _example(prompt, "multi_round", "number_compare", key, rounds, first + second)


def word_compare(rng: random.Random) -> Example:
    """Round 1: profiles of 3-4 words; round 2: which of two words is longer, from their letter counts."""
    count = rng.randint(3, 4)
    pairs = _comparison_pairs(count)
    for _ in range(100):
        ws = rng.sample(WORDS, count)
        if all(len(ws[i]) != len(ws[j]) for i, j in pairs):
            break
    else:  # pragma: no cover
        raise RuntimeError("word_compare: no words of distinct lengths drawn")
    prompt = rng.choice(WORDS_PROMPTS).format(xs=_listing(ws))
    prompt += " Then say which is longer: " + "; ".join(f"{ws[i]} or {ws[j]}" for i, j in pairs) + "."
    first = [_word_facts(w) for w in ws]
    second = [
        [word_fact("letter_count", ws[i]), word_fact("letter_count", ws[j]), word_fact("longer", ws[i], ws[j])]
        for i, j in pairs
    ]
    rounds = [_round(ws, first), _round([ws[i] for i, _ in pairs], second, conclude=True)]
    return _example(prompt, "multi_round", "word_compare", f"words|{','.join(sorted(ws))}", rounds, first + second)


def price_compare(rng: random.Random) -> Example:
    """Round 1: 3-4 compared pairs of a price list; round 2: compare the pricier items of two pairs."""
    count = rng.randint(3, 4)
    table = _price_table(rng, rng.randint(2 * count, min(len(ITEMS), 2 * count + 2)))
    names = rng.sample(list(table), 2 * count)
    pairs = [(names[2 * k], names[2 * k + 1]) for k in range(count)]
    winners = [a if table[a] > table[b] else b for a, b in pairs]
    prompt = rng.choice(PRICE_PROMPTS).format(table=_table_text(table), pairs=_pairs_text(pairs))
    later = _comparison_pairs(count)
    prompt += (
        " Then compare the pricier items: " + _listing([f"pair {i + 1} with pair {j + 1}" for i, j in later]) + "."
    )
    first = [_pair_facts(table, a, b) for a, b in pairs]
    second = [_pair_facts(table, winners[i], winners[j]) for i, j in later]
    topics1 = [a for a, _ in pairs]
    topics2 = [winners[i] for i, _ in later]
    rounds = [_round(topics1, first), _round(topics2, second, conclude=True)]
    key = f"prices|{_pairs_key(table, pairs)}"
    return _example(prompt, "multi_round", "price_compare", key, rounds, first + second)


# ----------------------------------------------------------------------------- plain

SINGLE_PROMPTS = {
    "number": ("Tell me about the number {x}: {asks}.", "For the number {x}, give {asks}."),
    "word": ("Tell me about the word {x}: its first and last letters and its length.",),
    "month": ("Tell me about {x}: {asks}.",),
    "day": ("Which days come around {x}? Give the day before it and the two days after it.",),
}


def single_profile(rng: random.Random) -> Example:
    """One subject's profile, answered as plain text (no plan)."""
    kind = rng.choice(MIXED_KINDS)
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
        facts = _day_facts(x)
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
    "one_round": (number_profiles, word_profiles, month_profiles, day_profiles, price_pairs, mixed_profiles),
    "multi_round": (number_compare, word_compare, price_compare),
    "plain": (
        plain(number_profiles),
        plain(word_profiles),
        plain(price_pairs),
        plain(mixed_profiles),
        single_profile,
        chat,
    ),
}
