"""Annotate (prompt, response) pairs with an LLM endpoint: validate, retry with feedback, resume.

Rows are annotated concurrently by a thread pool (requests are I/O bound); the
main thread writes each finished row as one JSONL line and flushes it, so an
interrupted run loses nothing and a re-run skips every row already in the
output or in the report of discarded rows.

Transport failures (timeouts, refused connections, 429, 5xx) are retried with
exponential backoff and jitter (`Retry`), honouring ``Retry-After``; they are
never recorded as discarded rows. After `Retry.max_failures` of them in a row
(no answer in between) the run stops with `EndpointUnavailable`, having written
every answer it got, so running the same command again resumes exactly there.
Only answers that fail validation (or a request the server refuses for that
row, e.g. a 400 for a prompt too long) are discarded.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

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


class EndpointUnavailable(RuntimeError):
    """The run stopped: the endpoint failed `Retry.max_failures` times in a row, or refused the settings."""

    def __init__(self, message: str, last: EndpointError | None = None):
        self.last = last
        super().__init__(message)


class Retry:
    """Backoff for transport failures, shared by all workers of a run (thread-safe).

    The k-th retry of a request waits ``min(max_delay, base_delay * 2**(k-1))``
    scaled by a random factor in [1 - jitter, 1] (so that many workers do not
    retry in lock step), or the server's ``Retry-After`` when it sent one (up to
    ``max_retry_after``). ``on_wait(error, seconds, failures)`` is told of every
    wait. ``max_failures`` transport failures in a row, counted
    over all workers and reset by any answer, stop the run. ``sleep`` and
    ``rng`` are injectable for tests; the default sleep wakes up early when the
    run stops.
    """

    def __init__(
        self,
        *,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        jitter: float = 0.5,
        max_failures: int = 64,
        max_retry_after: float = 600.0,
        sleep: Callable[[float], Any] | None = None,
        rng: random.Random | None = None,
        on_wait: Callable[[EndpointError, float, int], Any] | None = None,
    ):
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        if base_delay < 0 or max_delay < 0 or not 0 <= jitter <= 1:
            raise ValueError("delays must be >= 0 and jitter in [0, 1]")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self.max_failures = max_failures
        self.max_retry_after = max_retry_after
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._rng = rng or random.Random()
        self.on_wait = on_wait  # (error, seconds, failures in a row) before each wait: progress for the user
        self._lock = threading.Lock()
        self.failures = 0  # transport failures since the last answer
        self.total_failures = 0
        self.delays: list[float] = []  # every wait, in order (for the run's account and for tests)
        self.error: EndpointUnavailable | None = None

    def reset(self) -> None:
        """Start a new run: no failures counted, not stopped."""
        with self._lock:
            self.failures = 0
            self.total_failures = 0
            self.error = None
            self._stop.clear()

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds before the `retry`-th retry (1-based) of a request."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        cap = min(self.max_delay, self.base_delay * 2 ** min(retry - 1, 60))
        with self._lock:
            factor = 1.0 - self.jitter * self._rng.random()
        return cap * factor

    def check(self) -> None:
        """Raise the run's `EndpointUnavailable` if it has stopped."""
        if self.error is not None:
            raise self.error

    def stop(self, error: EndpointUnavailable) -> None:
        """Stop the run: every worker raises `error` at its next request or wait."""
        with self._lock:
            if self.error is None:
                self.error = error
        self._stop.set()

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0

    def failed(self, err: EndpointError, retry: int) -> None:
        """Count a transport failure; wait before the retry, or stop the run after `max_failures` in a row."""
        with self._lock:
            self.failures += 1
            self.total_failures += 1
            failures = self.failures
        if failures >= self.max_failures:
            self.stop(
                EndpointUnavailable(
                    f"the endpoint failed {failures} times in a row (last: {err})"
                    + ("; if only some rows time out, raise --timeout" if err.reason == "timeout" else ""),
                    err,
                )
            )
        self.check()
        wait = self.delay(retry, err.retry_after)
        with self._lock:
            self.delays.append(wait)
        if self.on_wait is not None:
            self.on_wait(err, wait, failures)
        self._sleep(wait)
        self.check()


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
        retry: Retry | None = None,
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.retry = retry or Retry()
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

    def ask(self, conversation: Sequence[Mapping[str, str]]) -> str:
        """One answer, retrying transport failures with backoff; raises `EndpointUnavailable` when the run stops.

        A request the server refuses for this row ('rejected') raises `EndpointError`.
        """
        retry = 0
        while True:
            self.retry.check()
            try:
                answer = self.chat.complete(conversation)
            except EndpointError as e:
                if e.kind == "fatal":
                    self.retry.stop(EndpointUnavailable(f"the endpoint refuses the request ({e}): check "
                                                        "--base_url, --model and --api_key", e))  # fmt: skip
                    self.retry.check()
                if not e.transient:
                    raise
                retry += 1
                self.retry.failed(e, retry)
                continue
            self.retry.succeeded()
            return answer

    def annotate(self, row: Row) -> Outcome:
        """Ask, validate, and on a rejection ask again with the reason, up to `max_attempts` answers."""
        conversation = messages(row.prompt, row.response)
        errors: list[str] = []
        reason = None
        answer = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                answer = _unfence(self.ask(conversation))
            except EndpointError as e:  # the server refuses this row's request: no retry can help
                errors.append(str(e))
                return Outcome(row, None, e.reason, attempt, tuple(errors), last_answer=answer)
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
    transport_failures: int = 0
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
    annotator.retry.reset()
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
                if future.cancelled():  # never started: the run stopped
                    continue
                try:
                    outcome = future.result()
                except EndpointUnavailable as e:  # keep recording the answers that still arrive
                    annotator.retry.stop(e)
                    for f in futures:
                        f.cancel()
                    continue
                _record(outcome, output, report, summary)
                bar.update(task, advance=1, description=f"annotating ({summary.discarded} discarded)")
        except BaseException:
            annotator.retry.stop(EndpointUnavailable("interrupted"))
            for f in futures:
                f.cancel()
            raise
    summary.transport_failures = annotator.retry.total_failures
    if annotator.retry.error is not None:
        left = len(pending) - summary.written - summary.discarded
        raise RunStopped(
            f"{annotator.retry.error}; stopped with {left} row(s) not yet annotated ({summary.written} written, "
            f"{summary.discarded} discarded this run): run the same command again to continue",
            summary,
        )
    return summary


class RunStopped(EndpointUnavailable):
    """`annotate_rows` stopped early because the endpoint is unavailable; `summary` is what it did before."""

    def __init__(self, message: str, summary: RunSummary):
        self.summary = summary
        super().__init__(message)


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
        + (f"; {summary.transport_failures} transport failure(s) retried" if summary.transport_failures else "")
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
