"""What the pipeline read, kept, skipped (and why) and how well it packed."""

from __future__ import annotations

import collections
import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    """A source row left out of training: its index in the split, the rule it breaks, where, and the detail.

    ``row`` indexes the split's rows (-1 for a line that never became a row:
    not UTF-8, empty, not JSON). ``position`` indexes the row's token sequence
    (prompt included), -1 when the row never got as far as tokens (e.g. no
    assistant turn). ``file`` and ``line`` (1-based; the item of a .json list,
    the row of a Parquet file) say where it is, None for Hub datasets.
    """

    row: int
    rule: str
    position: int
    detail: str
    file: str | None = None
    line: int | None = None

    @property
    def where(self) -> str:
        """``file:line`` when known, else ``row N``."""
        return f"{self.file}:{self.line}" if self.file is not None and self.line is not None else f"row {self.row}"


@dataclasses.dataclass
class DataReport:
    """One host's account of the data: counts, skipped rows, epochs and packing.

    ``rows_per_epoch`` are this host's packed rows of each planned epoch
    (only the first when ``num_epochs`` is None); ``total_batches`` is what the
    iterator yields (None: forever), agreed by all hosts when the shards come
    from jax; ``filler_rows`` are all-padding rows (no targets) appended so that
    this host yields that many full batches.
    ``packing_efficiency`` is the fraction of non-padding tokens over the
    planned epochs (filler rows included).
    """

    source: str
    mode: str
    host: int
    num_hosts: int
    rows_read: int
    documents: int
    tokens: int
    skipped: list[SkippedRow]
    row_length: int
    batch_size: int
    rows_per_epoch: list[int]
    total_batches: int | None
    filler_rows: int
    packing_efficiency: float
    fingerprint: str
    skipped_path: str | None = None

    @property
    def skipped_by_rule(self) -> dict[str, int]:
        """Number of skipped rows per rule, most frequent first."""
        return dict(collections.Counter(s.rule for s in self.skipped).most_common())

    def write_skipped(self, path: str) -> None:
        """One JSON object per skipped row: row, rule, position, detail, file, line."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for s in self.skipped:
                f.write(json.dumps(dataclasses.asdict(s)) + "\n")
        self.skipped_path = path

    def summary(self) -> str:
        """A few lines for the training log."""
        unreadable = sum(s.row < 0 for s in self.skipped)  # lines that never became a row
        lines = [
            f"data: {self.source} (mode {self.mode}, host {self.host}/{self.num_hosts}): "
            f"{self.rows_read} rows read" + (f" and {unreadable} unreadable line(s)" if unreadable else "")
            + f", {self.documents} documents kept ({self.tokens} tokens), {len(self.skipped)} skipped",
        ]
        for rule, count in self.skipped_by_rule.items():
            example = next(s for s in self.skipped if s.rule == rule)
            lines.append(f"  skipped {count:>7} {rule:<24} e.g. {example.where}: {example.detail}")
        if self.skipped:
            where = self.skipped_path or "not written (set DataConfig.skipped_path)"
            lines.append(f"  skipped rows with their reasons: {where}")
        total = "forever" if self.total_batches is None else f"{self.total_batches} batches"
        lines.append(
            f"  packing: {self.rows_per_epoch[0]} rows of {self.row_length} tokens in epoch 0, "
            f"{self.packing_efficiency:.1%} non-padding; {self.batch_size} rows per host batch, {total}"
            + (f" ({self.filler_rows} all-padding filler rows)" if self.filler_rows else "")
        )
        return "\n".join(lines)

