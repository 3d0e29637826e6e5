"""Seeded generation of the synthetic data set, its train / held-out split, and rendering.

`generate` draws examples shape by shape (exact counts from the mix), never the
same question twice (by `Example.key`, which ignores wording, and by prompt),
then splits every shape proportionally, so no held-out question is in train.
`render_completion` writes the annotated answer with honest lengths:
N = ceil(span tokens / length_scale) with the tokenizer the model will use.
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping, Sequence

from pdjax.structure.control import ASYNC_END, ASYNC_START, PROMISE_END, PROMISE_START, SYNC
from pdjax.structure.plan import DEFAULT_LENGTH_SCALE
from pdjax.synthetic.facts import facts_json
from pdjax.synthetic.tasks import FAMILIES, SHAPES, Example, Shape, pairs_family

# Draws that only repeat earlier questions, in a row, before `generate` gives up (a request beyond what the
# families can ask ends in seconds, not after 200 draws per example asked for).
MAX_REPEATS_IN_A_ROW = 20_000

DEFAULT_MIX: Mapping[Shape, float] = {"one_round": 0.45, "multi_round": 0.35, "plain": 0.20}

# Task sets: "default" is the data the shipped models were trained on (kept byte-identical);
# "paper" has the paper's shape: 2-4 long spans per round (pdjax.synthetic.paper).
TASK_SETS: tuple[str, ...] = ("default", "paper")


def task_families(tasks: str) -> dict:
    """The families of task set `tasks`, by shape."""
    if tasks == "default":
        return dict(FAMILIES)
    if tasks == "paper":
        from pdjax.synthetic.paper import PAPER_FAMILIES

        return dict(PAPER_FAMILIES)
    raise ValueError(f"unknown task set {tasks!r}; expected one of {TASK_SETS}")


def default_mix(tasks: str = "default") -> Mapping[str, float]:
    """The shape shares of task set `tasks` when none are given."""
    if tasks == "paper":
        from pdjax.synthetic.paper import PAPER_MIX

        return PAPER_MIX
    task_families(tasks)  # validates the name
    return DEFAULT_MIX


def shape_counts(total: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split `total` over the shapes in proportion to `mix` (largest remainder, so the sum is exact)."""
    if set(mix) - set(SHAPES) or any(v < 0 for v in mix.values()):
        raise ValueError(f"mix must give non-negative weights to {SHAPES}, got {dict(mix)}")
    weight = sum(mix.values())
    if weight <= 0:
        raise ValueError(f"the shape shares {dict(mix)} add up to 0: give at least one a positive share")
    exact = {s: total * mix.get(s, 0.0) / weight for s in SHAPES}
    counts = {s: int(v) for s, v in exact.items()}
    for s in sorted(SHAPES, key=lambda s: counts[s] - exact[s])[: total - sum(counts.values())]:
        counts[s] += 1
    return counts


def generate(
    seed: int,
    num_train: int,
    num_heldout: int,
    mix: Mapping[str, float] | None = None,
    plain_pairs: Sequence[tuple[str, str]] = (),
    tasks: str = "default",
) -> tuple[list[Example], list[Example]]:
    """Draw num_train + num_heldout distinct questions and split them by question (and so by prompt).

    ``plain_pairs`` (e.g. `chatterbot_pairs()`) add a family of fixed plain answers; ``tasks``
    picks the task set (`TASK_SETS`), ``mix`` defaults to that set's shares.
    """
    if num_train < 1 or num_heldout < 0:
        raise ValueError(f"need num_train >= 1 and num_heldout >= 0, got {num_train} and {num_heldout}")
    mix = default_mix(tasks) if mix is None else mix
    rng = random.Random(seed)
    families = task_families(tasks)
    if plain_pairs:
        families["plain"] = families["plain"] + (pairs_family(plain_pairs),)
    total = shape_counts(num_train + num_heldout, mix)
    held = shape_counts(num_heldout, mix)
    seen_keys: set[str] = set()
    seen_prompts: set[str] = set()
    train: list[Example] = []
    heldout: list[Example] = []
    for shape in SHAPES:
        drawn: list[Example] = []
        budget = 200 * total[shape] + 1000
        misses = 0  # repeats in a row: many means the families have run out of new questions
        while len(drawn) < total[shape]:
            budget -= 1
            if budget < 0 or misses >= MAX_REPEATS_IN_A_ROW:
                raise ValueError(
                    f"could not draw {total[shape]} distinct {shape} questions "
                    f"(got {len(drawn)}); ask for fewer examples"
                )
            ex = rng.choice(families[shape])(rng)
            if ex.key in seen_keys or ex.prompt in seen_prompts:
                misses += 1
                continue
            misses = 0
            seen_keys.add(ex.key)
            seen_prompts.add(ex.prompt)
            drawn.append(ex)
        rng.shuffle(drawn)
        heldout += drawn[: held[shape]]
        train += drawn[held[shape] :]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def span_length(text: str, tokenizer: Any, length_scale: int = DEFAULT_LENGTH_SCALE) -> int:
    """The promise number of a span: ceil(tokens / length_scale) with `tokenizer`."""
    count = len(tokenizer.encode(text, add_special_tokens=False))
    number = max(1, math.ceil(count / length_scale))
    if number > 99:
        raise ValueError(f"a span of {count} tokens needs a 3-digit length; split it")
    return number


def render_completion(example: Example, lengths: Sequence[Sequence[int]]) -> str:
    """The annotated answer: per round its promises, then its spans; rounds joined by `<sync/>`.

    ``lengths[r][i]`` is the promise number of span i of round r.
    """
    rounds = []
    for units, numbers in zip(example.rounds, lengths, strict=True):
        plan = "".join(f"{PROMISE_START}{u.topic} {n}{PROMISE_END}" for u, n in zip(units, numbers, strict=True))
        group = "".join(f"{ASYNC_START}{u.text}{ASYNC_END}" for u in units)
        rounds.append(plan + group)
    if not rounds:
        return example.tail
    return SYNC.join(rounds) + (SYNC + example.tail if example.tail else "")


def honest_lengths(example: Example, tokenizer: Any, length_scale: int = DEFAULT_LENGTH_SCALE) -> list[list[int]]:
    """Promise numbers of every span of `example`, counted with `tokenizer`."""
    return [[span_length(u.text, tokenizer, length_scale) for u in units] for units in example.rounds]


def to_record(example: Example, tokenizer: Any, id: str, length_scale: int = DEFAULT_LENGTH_SCALE) -> dict:
    """One JSONL row: `prompt`, `completion` (annotated, without the final `<|im_end|>`), and what checking needs."""
    return {
        "id": id,
        "prompt": example.prompt,
        "completion": render_completion(example, honest_lengths(example, tokenizer, length_scale)),
        "answer": example.answer,
        "shape": example.shape,
        "family": example.family,
        "facts": facts_json(example.facts),
    }
