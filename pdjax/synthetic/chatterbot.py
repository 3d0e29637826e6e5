"""Optional real conversational text: first exchanges of the `chatterbot-corpus` package (BSD-3-Clause).

Used as plain (unplanned) answers when asked for (`--chatterbot`); the package
is pure data and installs offline from PyPI: `pip install chatterbot-corpus`.
"""

from __future__ import annotations

import os

from pdjax.structure.control import CONTROL_STRINGS

# Small-talk categories only: the others (trivia, politics, gossip, ...) need knowledge a tiny model lacks.
CATEGORIES = ("greetings", "conversations", "botprofile", "emotion", "food", "humor", "ai", "computers")
_SPECIALS = tuple(CONTROL_STRINGS.values()) + ("<|im_start|>", "<|endoftext|>")


def chatterbot_pairs(categories: tuple[str, ...] = CATEGORIES, max_chars: int = 200) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: the first two turns of each English conversation, first answer per prompt."""
    try:
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ImportError as e:
        raise ImportError("--chatterbot needs the chatterbot-corpus package: pip install chatterbot-corpus") from e
    import yaml

    pairs: dict[str, str] = {}
    for category in categories:
        with open(os.path.join(DATA_DIRECTORY, "english", f"{category}.yml"), encoding="utf-8") as f:
            conversations = yaml.safe_load(f)["conversations"]
        for turns in conversations:
            if len(turns) < 2 or not all(isinstance(t, str) for t in turns[:2]):
                continue
            prompt, answer = turns[0].strip(), turns[1].strip()
            if not prompt or not answer or len(answer) > max_chars:
                continue
            if any(s in prompt or s in answer for s in _SPECIALS):
                continue
            pairs.setdefault(prompt, answer)
    return sorted(pairs.items())
