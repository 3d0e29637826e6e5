"""A readable toy vocabulary and a hypothesis strategy for planned-diffusion responses.

Shared by the structure, attention and loss tests. Control ids follow the
contract example of the foundation issue; digits are 60..69; words 100+.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from pdjax.structure import ControlIds

IDS = ControlIds(
    async_start=50,
    async_end=51,
    sync=52,
    eos=53,
    pad=54,
    promise_start=55,
    promise_end=56,
    mask=57,
    digits=tuple(range(60, 70)),
)
SYMBOLS = {
    "<async>": 50,
    "</async>": 51,
    "<sync/>": 52,
    "<|im_end|>": 53,
    "[PAD]": 54,
    "<promise>-<topic>": 55,
    "</topic>": 56,
    "<|mask|>": 57,
    **{str(d): 60 + d for d in range(10)},
}
_words: dict[str, int] = {}


def enc(text: str) -> list[int]:
    """Whitespace-separated symbols to ids; unknown words get stable ids from 100 on."""
    out = []
    for w in text.split():
        if w in SYMBOLS:
            out.append(SYMBOLS[w])
        else:
            out.append(_words.setdefault(w, 100 + len(_words)))
    return out


def parse_mask(rows: list[str]) -> np.ndarray:
    """Rows of '0'/'1' characters (spaces ignored) to a bool matrix."""
    return np.array([[c == "1" for c in r.replace(" ", "")] for r in rows], dtype=bool)


@dataclass
class Example:
    """A generated document: tokens, prompt length, and the ground-truth structure."""

    tokens: list[int]
    prompt_len: int
    spans: list[tuple[int, int]]  # (start, end) of each <async>..</async>, inclusive
    groups: list[list[int]]  # span indices per round that has a group
    syncs: list[int]  # positions of <sync/>
    planned: bool


def plan_banned(plan: list[int], max_spans: int = 16) -> set[int]:
    """The documented plan grammar (METHOD §1): the control and digit tokens banned after the round's `plan`."""
    inside, run, promises = False, 0, 0
    for t in plan:
        if not inside and t == IDS.promise_start:
            inside, run = True, 0
        elif inside and t == IDS.promise_end:
            inside, promises = False, promises + 1
        elif inside and t in IDS.digits:
            run = run + 1 if run < 2 else run
        elif inside and run > 0:
            run = 3
    banned = {IDS.async_start, IDS.async_end, IDS.pad, IDS.mask}
    if inside:
        banned |= {IDS.promise_start, IDS.sync, IDS.eos}
        banned |= {IDS.promise_end} if run == 0 else set()
        banned |= set(IDS.digits) if run == 2 else set()
    else:
        banned |= {IDS.promise_end}
        banned |= {IDS.sync} if promises == 0 else set()
        banned |= {IDS.promise_start} if promises >= max_spans else set()
    return banned


WORD = st.integers(100, 140)


@st.composite
def responses(draw, max_rounds: int = 3, max_promises: int = 4, allow_plain: bool = True) -> Example:
    """A well-formed prompt + response like real data.

    1-3 rounds, 1-4 promises per round, spans with [PAD], an optional plain-text
    tail after the last <sync/>, or (sometimes) a response with no plan at all.
    """
    prompt = draw(st.lists(WORD, min_size=1, max_size=4))
    toks = list(prompt)
    spans: list[tuple[int, int]] = []
    groups: list[list[int]] = []
    syncs: list[int] = []
    plain = allow_plain and draw(st.integers(0, 5)) == 0
    if plain:
        toks += draw(st.lists(WORD, min_size=0, max_size=5)) + [IDS.eos]
        return Example(toks, len(prompt), spans, groups, syncs, planned=False)
    n_rounds = draw(st.integers(1, max_rounds))
    tail = draw(st.booleans())
    for r in range(n_rounds):
        toks += draw(st.lists(WORD, min_size=0, max_size=1))  # optional plan text before promises
        n_prom = draw(st.integers(1, max_promises))
        for _ in range(n_prom):
            number = draw(st.integers(1, 20))
            toks += [IDS.promise_start] + draw(st.lists(WORD, min_size=0, max_size=2))
            toks += [IDS.digits[int(d)] for d in str(number)] + [IDS.promise_end]
        group = []
        for _ in range(n_prom):
            start = len(toks)
            content = draw(st.lists(WORD, min_size=0, max_size=4))
            toks += [IDS.async_start] + content + [IDS.pad] * draw(st.integers(0, 3)) + [IDS.async_end]
            spans.append((start, len(toks) - 1))
            group.append(len(spans) - 1)
        groups.append(group)
        last = r == n_rounds - 1
        if last and not tail:
            toks.append(IDS.eos)
        else:
            syncs.append(len(toks))
            toks.append(IDS.sync)
    if tail:
        toks += draw(st.lists(WORD, min_size=1, max_size=4)) + [IDS.eos]
    return Example(toks, len(prompt), spans, groups, syncs, planned=True)
