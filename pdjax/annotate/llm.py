"""Annotate (prompt, response) pairs with an LLM endpoint: validate, retry with feedback, resume.

Rows are annotated concurrently by a thread pool (requests are I/O bound); the
main thread writes each finished row as one JSONL line and flushes it, so an
interrupted run loses nothing and a re-run skips every row already in the
output or in the report of discarded rows.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Iterable, Mapping, Protocol, Sequence

from pdjax.annotate.client import EndpointError
from pdjax.annotate.instructions import feedback_message, messages
from pdjax.annotate.rows import Row, append_jsonl, finished_ids, read_rows
from pdjax.annotate.validate import AnnotationRejected, recompute_lengths, validate_annotation
from pdjax.structure.plan import DEFAULT_LENGTH_SCALE


class Chat(Protocol):
    """Anything that answers a conversation with text (`ChatClient`, or a fake in tests)."""

    def complete(self, messages: Sequence[Mapping[str, str]]) -> str: ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The result for one row: a completion, or the reason it was discarded; the errors of every failed attempt."""

    row: Row
    completion: str | None
    reason: str | None
    attempts: int
    errors: tuple[str, ...]
    lengths_changed: int = 0
    last_answer: str | None = None


def _unfence(text: str) -> str:
    """Drop a Markdown code fence around the whole answer (a transport habit of chat models, not content)."""
    body = text.strip("\n")
    if body.startswith("```") and body.endswith("```") and body.count("```") == 2:
        return body[body.index("\n") + 1 : -3].rstrip("\n") if "\n" in body else text
    return text


class Annotator:
    """Annotates one row at a time; thread-safe (the tokenizer is used under a lock)."""

    def __init__(
        self,
        chat: Chat,
        tokenizer: Any,
        *,
        max_attempts: int = 3,
        fix_lengths: bool = True,
        length_scale: int = DEFAULT_LENGTH_SCALE,
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.chat = chat
        self.tokenizer = tokenizer
        self.max_attempts = max_attempts
        self.fix_lengths = fix_lengths
        self.length_scale = length_scale
        self._lock = threading.Lock()

    def check(self, response: str, answer: str) -> tuple[str, int]:
        """Validate one answer; with `fix_lengths` rewrite its promise numbers honestly."""
        with self._lock:
            if self.fix_lengths:
                return recompute_lengths(response, answer, self.tokenizer, self.length_scale)
            validate_annotation(response, answer, self.tokenizer)
            return answer, 0

    def annotate(self, row: Row) -> Outcome:
        """Ask, validate, and on a rejection ask again with the reason, up to `max_attempts` requests."""
        conversation = messages(row.prompt, row.response)
        errors: list[str] = []
        reason = None
        answer = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                answer = _unfence(self.chat.complete(conversation))
            except EndpointError as e:
                errors.append(str(e))
                reason = e.reason
                continue
            try:
                completion, changed = self.check(row.response, answer)
            except AnnotationRejected as e:
                errors.append(str(e))
                reason = e.reason
                conversation = conversation + [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": feedback_message(e.feedback)},
                ]
                continue
            return Outcome(row, completion, None, attempt, tuple(errors), changed)
        return Outcome(row, None, reason, self.max_attempts, tuple(errors), last_answer=answer)


@dataclasses.dataclass
class RunSummary:
    """What one run did: rows skipped as already finished, written, discarded (with reasons)."""

    skipped: int = 0
    written: int = 0
    discarded: int = 0
    planned: int = 0
    lengths_changed: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def default_report_path(output: str | os.PathLike) -> str:
    root, _ = os.path.splitext(str(output))
    return root + ".discarded.jsonl"


def annotate_rows(
    rows: Iterable[Row],
    annotator: Annotator,
    output: str | os.PathLike,
    report: str | os.PathLike | None = None,
    *,
    concurrency: int = 8,
    retry_discarded: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Annotate every row not yet finished; append results to `output` and discards to `report`."""
    report = report or default_report_path(output)
    if retry_discarded and os.path.exists(report):
        open(report, "w").close()  # the report then describes this run's discards only
    done = finished_ids(output) | finished_ids(report)
    summary = RunSummary()
    pending: list[Row] = []
    seen: set[str] = set()
    for row in rows:
        if row.id in done or row.id in seen:
            summary.skipped += 1
            continue
        seen.add(row.id)
        pending.append(row)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        Progress(*columns, disable=not progress, transient=False) as bar,
        ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool,
    ):
        task = bar.add_task("annotating", total=len(pending))
        futures = [pool.submit(annotator.annotate, row) for row in pending]
        try:
            for future in as_completed(futures):
                _record(future.result(), output, report, summary)
                bar.update(task, advance=1, description=f"annotating ({summary.discarded} discarded)")
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return summary


def _record(outcome: Outcome, output: str | os.PathLike, report: str | os.PathLike, summary: RunSummary) -> None:
    row = outcome.row
    if outcome.completion is not None:
        append_jsonl(
            output,
            {"id": row.id, "prompt": row.prompt, "completion": outcome.completion, "attempts": outcome.attempts},
        )
        summary.written += 1
        summary.planned += "<async>" in outcome.completion
        summary.lengths_changed += outcome.lengths_changed
    else:
        append_jsonl(
            report,
            {
                "id": row.id,
                "index": row.index,
                "reason": outcome.reason,
                "attempts": outcome.attempts,
                "errors": list(outcome.errors),
                "last_answer": outcome.last_answer,
            },
        )
        summary.discarded += 1
        summary.reasons[outcome.reason] += 1


def summary_text(summary: RunSummary) -> str:
    """A one-paragraph account of a run for the terminal."""
    lines = [
        f"written {summary.written} ({summary.planned} with a plan, {summary.lengths_changed} promise lengths "
        f"corrected), discarded {summary.discarded}, skipped {summary.skipped} already finished"
    ]
    lines += [f"  discarded for {reason}: {n}" for reason, n in summary.reasons.most_common()]
    return "\n".join(lines)


def annotate_file(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    annotator: Annotator,
    report: str | os.PathLike | None = None,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    limit: int | None = None,
    **kw: Any,
) -> RunSummary:
    """`annotate_rows` over a JSONL file of rows with a prompt and a response field."""
    rows = read_rows(input_path, prompt_field, response_field, limit=limit)
    return annotate_rows(rows, annotator, output, report, **kw)
