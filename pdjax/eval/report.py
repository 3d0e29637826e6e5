"""Speed summaries of outputs files, judge win rates, and the speed-quality table of `compare`.

Speed ratios are ratios of means over the instructions every compared file
answered (the paper's "average critical path AR 367.3, PD 155.2, 2.37x" is
one): speedup = AR mean latency / mean latency, critical-path ratio = AR mean
model calls / mean model calls. tokens/s = generated tokens / decoding time,
where each batch's wall time counts once (a record's ``latency_s`` is its
batch's wall time, shared by ``batch_fill`` records).

Win rates come from alpaca_eval's annotations file (``annotations.json`` of
``alpaca_eval evaluate``): a JSON list with, per judged pair, ``generator_2``
(the evaluated model; its output is ``output_2``), ``generator_1`` (the
reference it was judged against; its output is ``output_1``) and
``preference`` in [1, 2] (1: the reference wins, 2: the model wins, 1.5 or the
legacy 0: a draw; missing or out-of-range values are not counted). As
alpaca_eval computes it (``pairwise_to_winrate``), win rate = 100 *
mean(preference - 1) and its standard error = 100 * sample std / sqrt(n); wins
and losses are preference > 1.5 and < 1.5. The length-controlled win rate
needs alpaca_eval's own regression and is not recomputed here.

Win rates are kept per (model, reference) pair: a model judged against two
references gets two rows, never one pooled number. The same judgement read
twice (same instruction, outputs and generators, e.g. one annotations file
passed twice) counts once. Every judged model must have its outputs file
among those compared (its speed is in the same row).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import warnings
from typing import Any, Mapping, Sequence

from pdjax.eval.store import FormatError
from pdjax.jsonl import LineError, read_records

SPEED_FIELDS = ("latency_s", "model_calls")


@dataclasses.dataclass(frozen=True)
class SpeedSummary:
    """Means and medians of one set of records (None where the records carry no such field)."""

    samples: int
    latency_mean: float | None
    latency_median: float | None
    calls_mean: float | None
    calls_median: float | None
    tokens_mean: float | None
    tokens_per_s: float | None
    rounds_mean: float | None
    spans_mean: float | None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _field(records: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    values = [r.get(name) for r in records]
    return [float(v) for v in values] if values and all(isinstance(v, (int, float)) for v in values) else []


def summarize_speed(records: Sequence[Mapping[str, Any]]) -> SpeedSummary:
    """Latency, model calls on the critical path, tokens, tokens/s, rounds and spans of `records`."""
    latency, calls, tokens = (_field(records, k) for k in ("latency_s", "model_calls", "tokens"))
    fills = _field(records, "batch_fill") or ([1.0] * len(records))
    seconds = sum(t / f for t, f in zip(latency, fills))
    return SpeedSummary(
        samples=len(records),
        latency_mean=_mean(latency),
        latency_median=_median(latency),
        calls_mean=_mean(calls),
        calls_median=_median(calls),
        tokens_mean=_mean(tokens),
        tokens_per_s=sum(tokens) / seconds if tokens and latency and seconds > 0 else None,
        rounds_mean=_mean(_field(records, "rounds")),
        spans_mean=_mean(_field(records, "spans")),
    )


# ---- win rates --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WinRate:
    """alpaca_eval's head-to-head numbers of one generator against the reference."""

    win_rate: float
    standard_error: float | None
    n_wins: int
    n_losses: int
    n_draws: int
    n_total: int


def _preference(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    value = 1.5 if value == 0 else float(value)  # alpaca_eval's legacy draw
    return value if 1.0 <= value <= 2.0 else None


def win_rate(preferences: Sequence[Any]) -> WinRate | None:
    """The win rate of alpaca_eval preferences (see the module docstring); None when none is valid."""
    p = [v - 1.0 for v in (_preference(x) for x in preferences) if v is not None]
    if not p:
        return None
    se = statistics.stdev(p) / math.sqrt(len(p)) * 100 if len(p) > 1 else None
    return WinRate(
        win_rate=statistics.fmean(p) * 100,
        standard_error=se,
        n_wins=sum(v > 0.5 for v in p),
        n_losses=sum(v < 0.5 for v in p),
        n_draws=sum(v == 0.5 for v in p),
        n_total=len(p),
    )


def read_annotations(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The judged pairs of one or more alpaca_eval annotations files (JSON lists)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:  # one line naming the file and line of a broken file (pdjax.jsonl)
            data = [r for _, r in read_records(path, what="an annotation", objects=False)]
        except LineError as e:
            raise FormatError(str(e)) from None
        if not isinstance(data, list) or not all(isinstance(r, dict) and "generator_2" in r and "preference" in r
                                                 for r in data):
            raise FormatError(f"{path} is not an alpaca_eval annotations file (a list with generator_2 and preference)")
        rows.extend(data)
    return rows


class UnknownGenerators(FormatError):
    """Annotations judge a model that none of the compared outputs files holds."""


Pair = tuple[str, str | None]  # (model = generator_2, reference = generator_1; None when not recorded)


def _pair(row: Mapping[str, Any]) -> Pair:
    ref = row.get("generator_1")
    return str(row["generator_2"]), None if ref is None else str(ref)


def unique_annotations(annotations: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
    """The annotations with repeats of one judgement (same instruction, outputs and generators) dropped,
    and how many were dropped (the first occurrence is kept)."""
    seen: set[tuple[Any, ...]] = set()
    kept: list[Mapping[str, Any]] = []
    for row in annotations:
        key = tuple(str(row.get(k)) for k in ("instruction", "output_1", "output_2", "generator_1", "generator_2"))
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(annotations) - len(kept)


def win_rates_by_pair(annotations: Sequence[Mapping[str, Any]]) -> dict[Pair, WinRate]:
    """Win rate of every (model, reference) pair (``generator_2``, ``generator_1``) in the annotations."""
    prefs: dict[Pair, list[Any]] = collections.defaultdict(list)
    for row in annotations:
        prefs[_pair(row)].append(row["preference"])
    return {pair: w for pair, p in prefs.items() if (w := win_rate(p)) is not None}


# ---- compare ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompareRow:
    """One outputs file in the speed-quality table."""

    path: str
    generator: str
    mode: str | None
    speed: SpeedSummary  # over the instructions every timed file answered
    speedup: float | None  # reference mean latency / this mean latency
    critical_path_ratio: float | None  # reference mean model calls / this mean model calls
    win: WinRate | None
    judged_against: str | None = None  # the judge's reference (generator_1) of `win`


def generator_of(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """The file's generator name (the most common `generator` field; the file name if none)."""
    names = collections.Counter(str(r["generator"]) for r in records if r.get("generator") is not None)
    return names.most_common(1)[0][0] if names else path


def mode_of(records: Sequence[Mapping[str, Any]]) -> str | None:
    modes = {r.get("mode") for r in records}
    return modes.pop() if len(modes) == 1 else None


def _keyed(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    """Records keyed by (instruction, occurrence), so repeated instructions pair up in order."""
    seen: collections.Counter[str] = collections.Counter()
    out = {}
    for r in records:
        out[(r["instruction"], seen[r["instruction"]])] = r
        seen[r["instruction"]] += 1
    return out


def is_timed(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every record carries the speed fields (files of other generators may not)."""
    return bool(records) and all(all(isinstance(r.get(k), (int, float)) for k in SPEED_FIELDS) for r in records)


def pick_reference(files: Mapping[str, Sequence[Mapping[str, Any]]], reference: str | None) -> str | None:
    """The AR file the ratios divide by: `reference` if given, else the one timed file in mode "ar" (or None)."""
    if reference is not None:
        if reference not in files:
            raise FormatError(f"--reference {reference} is not one of the compared files")
        return reference
    ar = [p for p, recs in files.items() if is_timed(recs) and mode_of(recs) == "ar"]
    return ar[0] if len(ar) == 1 else None


def compare(files: Mapping[str, Sequence[Mapping[str, Any]]], *, reference: str | None = None,
            annotations: Sequence[Mapping[str, Any]] = ()) -> tuple[list[CompareRow], str | None, int]:
    """The rows of the speed-quality table, the reference file, and how many paired instructions the speed uses.

    One row per outputs file without judgements, else one per (model, judge reference) pair. Repeated
    judgements count once (a `UserWarning` says how many were dropped); a judged model with no outputs
    file raises `UnknownGenerators`.
    """
    annotations, duplicates = unique_annotations(annotations)
    if duplicates:
        warnings.warn(f"{duplicates} duplicate annotations (same instruction, outputs and generators) counted once",
                      stacklevel=2)
    reference = pick_reference(files, reference)
    timed = {p: _keyed(recs) for p, recs in files.items() if is_timed(recs)}
    common = set.intersection(*(set(k) for k in timed.values())) if timed else set()
    wins = win_rates_by_pair(annotations)
    generators = {path: generator_of(recs, path) for path, recs in files.items()}
    unknown = sorted({model for model, _ in wins} - set(generators.values()))
    if unknown:
        raise UnknownGenerators(
            f"the annotations judge {unknown}, which no outputs file holds (the outputs files hold "
            f"{sorted(set(generators.values()))}; the annotations judge {sorted({m for m, _ in wins})}): pass the "
            "outputs file of every judged model"
        )
    speed = {p: summarize_speed([keyed[k] for k in sorted(common)]) for p, keyed in timed.items()}
    ref = speed.get(reference) if reference is not None else None
    rows = []
    for path, recs in files.items():
        s = speed.get(path, summarize_speed([]))
        speedup = cp = None
        if ref is not None and path in speed and s.latency_mean and s.calls_mean:
            speedup = ref.latency_mean / s.latency_mean
            cp = ref.calls_mean / s.calls_mean
        gen = generators[path]
        judged = sorted(((against, w) for (model, against), w in wins.items() if model == gen),
                        key=lambda x: str(x[0]))
        for against, w in judged or [(None, None)]:
            rows.append(CompareRow(path, gen, mode_of(recs), s, speedup, cp, w, against))
    return rows, reference, len(common)


def rows_json(rows: Sequence[CompareRow]) -> list[dict[str, Any]]:
    """The table as JSON-ready dicts."""
    return [dataclasses.asdict(r) for r in rows]


# ---- tables ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def speed_table(title: str, summaries: Mapping[str, SpeedSummary]) -> Any:
    """A rich table of speed summaries (one row per generator)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("generator", "samples", "latency mean (s)", "latency median (s)", "model calls mean",
                "model calls median", "tokens mean", "tokens/s", "rounds mean", "spans mean"):
        t.add_column(col, justify="left" if col == "generator" else "right", no_wrap=col == "generator")
    for name, s in summaries.items():
        t.add_row(name, str(s.samples), _fmt(s.latency_mean, ".3f"), _fmt(s.latency_median, ".3f"),
                  _fmt(s.calls_mean, ".1f"), _fmt(s.calls_median, ".1f"), _fmt(s.tokens_mean, ".1f"),
                  _fmt(s.tokens_per_s, ".1f"), _fmt(s.rounds_mean), _fmt(s.spans_mean))
    return t


def compare_table(rows: Sequence[CompareRow], reference: str | None, paired: int) -> Any:
    """The speed-quality table: speed over the paired instructions, ratios against the AR reference, win rates."""
    from rich.table import Table

    ref_name = next((r.generator for r in rows if r.path == reference), None)
    caption = (f"ratios vs AR = {ref_name}: mean latency and mean model calls of AR / of the row, "
               f"over the {paired} instructions every timed file answered" if ref_name else
               "no AR reference (pass --reference FILE, or one timed file with mode \"ar\"): no ratios")
    t = Table(title="speed and quality", caption=caption)
    for col in ("generator", "mode", "latency mean (s)", "speedup vs AR", "model calls mean",
                "critical path vs AR", "tokens mean", "tokens/s", "judged against", "win rate", "judged"):
        t.add_column(col, justify="left" if col in ("generator", "mode", "judged against") else "right",
                     no_wrap=col in ("generator", "judged against"))
    for r in rows:
        s = r.speed
        win = "-" if r.win is None else (
            f"{r.win.win_rate:.1f}" + ("" if r.win.standard_error is None else f" ± {r.win.standard_error:.1f}"))
        t.add_row(r.generator, r.mode or "-", _fmt(s.latency_mean, ".3f"), _fmt(r.speedup, ".2f", "x"),
                  _fmt(s.calls_mean, ".1f"), _fmt(r.critical_path_ratio, ".2f", "x"), _fmt(s.tokens_mean, ".1f"),
                  _fmt(s.tokens_per_s, ".1f"), "-" if r.win is None else (r.judged_against or "?"), win,
                  "-" if r.win is None else str(r.win.n_total))
    return t
