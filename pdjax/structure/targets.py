"""Autoregressive targets of METHOD §3.

Every position outside blocks, from the last prompt token on, predicts the next
token *outside blocks* of its document: a group is skipped, so the last promise
token of a round predicts the `<sync/>` / `<|im_end|>` after the group. The
final `<|im_end|>` and anything after it predict nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pdjax.structure.segments import RESPONSE_ROLES, Role, Segments

IGNORE = -1


def ar_targets(tokens: Sequence[int] | np.ndarray, seg: Segments) -> np.ndarray:
    """[L] int32: the AR target token predicted at each position, IGNORE (-1) where none."""
    toks = np.asarray(tokens).reshape(-1)
    role = np.asarray(seg.role)
    block = np.asarray(seg.block_id)
    doc = np.asarray(seg.doc_id)
    n = len(toks)
    targets = np.full(n, IGNORE, np.int32)
    # Positions whose token is an AR target: response tokens outside blocks.
    is_ar_token = (block == 0) & np.isin(role, RESPONSE_ROLES)
    next_target = -1  # index of the nearest AR-target token to the right, within the same doc
    for i in range(n - 1, -1, -1):
        if next_target >= 0 and doc[next_target] != doc[i]:
            next_target = -1
        predicts = block[i] == 0 and (
            role[i] == Role.PLAN or (role[i] == Role.PROMPT and i + 1 < n and role[i + 1] != Role.PROMPT and doc[i + 1] == doc[i])
        )
        if predicts and next_target >= 0:
            targets[i] = toks[next_target]
        if is_ar_token[i]:
            next_target = i
    return targets
