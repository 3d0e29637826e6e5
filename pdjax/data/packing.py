"""First-fit packing of documents into fixed-length rows.

Documents arrive in (shuffled) order; each goes into the first open row with
room for it, else opens a new row. At most ``window`` rows stay open: opening
one more closes the oldest, which is emitted. Rows are emitted in the order
they close, and the last open rows at the end. (A window keeps the plan fast
and the order close to the shuffle; with a window of a few dozen rows the
packing is within a fraction of a percent of unbounded first-fit, see
``benchmarks/packing.py``.) The row contents themselves are assembled by
`pdjax.structure.pack_documents`.
"""

from __future__ import annotations

from typing import Sequence


def first_fit(lengths: Sequence[int], row_length: int, window: int) -> list[list[int]]:
    """Rows as lists of indices into ``lengths``; every index appears exactly once."""
    rows: list[list[int]] = []
    open_rows: list[list[int]] = []
    room: list[int] = []
    for index, n in enumerate(int(x) for x in lengths):
        if n > row_length:
            raise ValueError(f"document {index} has {n} tokens, more than the row length {row_length}")
        for slot, free in enumerate(room):
            if free >= n:
                open_rows[slot].append(index)
                room[slot] = free - n
                break
        else:
            if len(open_rows) == window:
                rows.append(open_rows.pop(0))
                room.pop(0)
            open_rows.append([index])
            room.append(row_length - n)
    return rows + open_rows


def packing_efficiency(document_tokens: int, num_rows: int, row_length: int) -> float:
    """Fraction of the ``num_rows * row_length`` token slots that hold document tokens (not padding)."""
    return document_tokens / (num_rows * row_length) if num_rows else 0.0
