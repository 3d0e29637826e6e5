"""Per-request decoding statistics, and the opt-in phase profiler.

Model calls are counted on device, per example: every call an example takes
part in is on its critical path (its calls are sequential), so
``model_calls`` is that example's critical path in forward passes. Wall time
is measured on the host around the whole batch (one device round trip); phase
times exist only with profiling, which timestamps each model call through an
ordered host callback after its results exist and charges the time since the
previous timestamp to that call's kind.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

PHASES = ("prefill", "plan", "denoise", "commit")


@dataclasses.dataclass
class DecodeStats:
    """What one request cost and what it produced."""

    model_calls: int  # forward passes on this request's critical path (the sum of the four below)
    prefill_calls: int
    plan_calls: int
    denoise_calls: int
    commit_calls: int
    tokens_generated: int  # response tokens, control tokens and the final <|im_end|> included
    rounds: int  # plan rounds (each ended by <sync/>, <|im_end|> or the budget)
    groups: int  # groups laid out
    spans: int
    span_lengths: list[int]  # content tokens of each span, [PAD] included, in order
    finish_reason: str  # "eos" or "length"
    wall_time_s: float  # of the whole batch this request was decoded in
    batch_size: int
    loop_iterations: int  # of the batch's while_loop
    phase_time_s: dict[str, float] | None = None  # of the batch, with profiling only
    compile_time_s: float = 0.0  # compiling (or reading from the cache) before this batch; not in wall_time_s

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    def line(self) -> str:
        """A one-line summary for terminals."""
        spans = f", spans {self.span_lengths}" if self.span_lengths else ""
        return (
            f"{self.model_calls} model calls (prefill {self.prefill_calls}, plan {self.plan_calls}, "
            f"denoise {self.denoise_calls}, commit {self.commit_calls}), {self.tokens_generated} tokens, "
            f"{self.rounds} rounds, {self.spans} spans{spans}; decode {self.wall_time_s:.2f} s"
            + (f" (+ compile {self.compile_time_s:.2f} s)" if self.compile_time_s else "")
            + f", finish {self.finish_reason}"
        )

    def phase_lines(self) -> list[str]:
        """The profiled phase times as table rows (empty without profiling)."""
        if not self.phase_time_s:
            return []
        total = sum(self.phase_time_s.values()) or 1.0
        calls = {"prefill": self.prefill_calls, "plan": self.plan_calls, "denoise": self.denoise_calls,
                 "commit": self.commit_calls}
        rows = [f"{'phase':<8} {'calls':>6} {'seconds':>9} {'share':>6}"]
        for phase, seconds in self.phase_time_s.items():
            rows.append(f"{phase:<8} {calls.get(phase, 0):>6} {seconds:>9.3f} {seconds / total:>6.1%}")
        return rows


class Profiler:
    """Host side of the profiling callbacks: timestamps per call kind (-1 marks the start)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget earlier runs."""
        with self._lock:
            self._last: float | None = None
            self.seconds = dict.fromkeys(PHASES, 0.0)

    def mark(self, kinds: Any, value: Any) -> Any:
        """Called by the device program after each model call with the kinds it served ([4] bool).

        The time since the previous mark is split evenly between those kinds (exact at batch
        size 1, where a call serves one kind). Returns `value` unchanged.
        """
        now = time.perf_counter()
        served = [PHASES[i] for i, on in enumerate(list(kinds)) if on]
        with self._lock:
            if served and self._last is not None:
                for phase in served:
                    self.seconds[phase] += (now - self._last) / len(served)
            self._last = now
        return value
