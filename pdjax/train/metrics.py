"""Training metrics: throughput and MFU, JSONL and TensorBoard logs, a live progress bar (rich).

Throughput is measured over each logging interval (the step is asynchronous,
so only the interval's end blocks on the device). ``tokens_per_s`` counts
document tokens (padding excluded); MFU counts the FLOPs of every position of
the batch against the devices' peak.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax

from pdjax.model import DreamConfig

# Peak dense bf16 TFLOP/s per chip, by jax device_kind prefix (vendor datasheets).
PEAK_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
}


def peak_flops(device: jax.Device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, else the table by device kind, else None (no MFU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    kind = getattr(device, "device_kind", "")
    for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_TFLOPS[prefix] * 1e12
    return None


def flops_per_token(config: DreamConfig, row_length: int, *, frozen_weights: bool = False) -> float:
    """Training FLOPs per position: 6 per matmul weight (forward 2, input and weight gradients 2 each; 4
    when the base weights are frozen, as with LoRA), plus attention over the whole row (12 * row_length *
    heads * head_dim per layer: an upper bound, the segment mask leaves part of it out).
    """
    d, f = config.hidden_size, config.intermediate_size
    attn = d * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim + config.num_heads * config.head_dim * d
    matmul = config.num_layers * (attn + 3 * d * f) + config.vocab_size * d
    per_weight = 4.0 if frozen_weights else 6.0
    attention = 12.0 * config.num_layers * config.num_heads * config.head_dim * row_length
    return per_weight * matmul + attention


class Throughput:
    """Time between logging points, turned into step time, tokens/s and MFU."""

    def __init__(self, flops_per_position: float, positions_per_step: int, num_devices: int, peak: float | None):
        self.flops_per_position = flops_per_position
        self.positions_per_step = positions_per_step
        self.num_devices = num_devices
        self.peak = peak
        self._t = time.perf_counter()
        self._steps = 0
        self._tokens: list[Any] = []

    def add(self, tokens: Any) -> None:
        """Count one step; `tokens` may be a device scalar (read only at the next `read`, no sync per step)."""
        self._steps += 1
        self._tokens.append(tokens)

    def read(self) -> dict[str, float]:
        """Averages since the last read (call after blocking on the last step's results)."""
        tokens = float(sum(int(t) for t in jax.device_get(self._tokens)))
        now = time.perf_counter()
        elapsed = max(now - self._t, 1e-9)
        steps = max(self._steps, 1)
        out = {"step_time_s": elapsed / steps, "tokens_per_s": tokens / elapsed}
        if self.peak:
            achieved = self.flops_per_position * self.positions_per_step * steps / elapsed
            out["mfu"] = achieved / (self.peak * self.num_devices)
        self._t, self._steps, self._tokens = now, 0, []
        return out


class MetricsLog:
    """JSONL (one object per logged step) and TensorBoard scalars under `directory`, plus a rich progress bar.

    Only the main process writes; the others get a silent instance. A run that
    starts at ``start_step`` (a resume) first drops what an earlier, interrupted
    run logged after that step, so every step is in the logs once however
    often a run is resumed. ``console`` (a rich Console) forces the live bar,
    e.g. at a fixed width in tests.
    """

    def __init__(
        self,
        directory: str | None,
        *,
        tensorboard: bool = True,
        progress: bool = True,
        total_steps: int | None = None,
        start_step: int = 0,
        enabled: bool = True,
        console: Any = None,
    ):
        self.enabled = enabled
        self._lines = progress  # without a terminal: one plain line per logged step instead of a live bar
        self._total = total_steps
        self._jsonl = None
        self._tb = None
        self._progress = None
        dropped = 0
        if not enabled:
            return
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "metrics.jsonl")
            dropped = truncate_jsonl(path, start_step)
            self._jsonl = open(path, "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter

                # purge_step: TensorBoard hides the earlier events of steps from here on (the interrupted run's)
                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if progress and (console is not None or sys.stdout.isatty()):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            from rich.table import Column

            # Step count and time remaining first and never squeezed; the bar and the metrics give way on
            # narrow terminals (the metrics are cut with an ellipsis, not wrapped).
            self._progress = Progress(
                TextColumn("[bold]train"),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=4, max_width=40)),
                TextColumn("{task.fields[status]}", table_column=Column(ratio=3, no_wrap=True, overflow="ellipsis")),
                console=console,
                transient=False,
                expand=True,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")
            self._progress.start()
        if dropped:
            self.print(f"{path}: dropped {dropped} line(s) after step {start_step} logged by an earlier (interrupted) run")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record the metrics of `step` (after the step: the number of optimizer updates done)."""
        if not self.enabled:
            return
        plain = {k: _plain(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **plain}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in plain.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        if self._progress is not None:
            status = " ".join(f"{_SHOWN[k]} {_short(plain[k])}" for k in _SHOWN if k in plain)
            self._progress.update(self._task, completed=step, status=status)
        elif self._lines:
            status = " ".join(f"{k} {_short(plain[k])}" for k in _SHOWN if k in plain)
            total = f"/{self._total}" if self._total else ""
            print(f"step {step}{total} {status}", flush=True)

    def advance(self, step: int) -> None:
        """Move the progress bar without writing metrics."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def print(self, message: str) -> None:
        """A line above the progress bar (or on stdout)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# Metrics shown while training, with their short labels in the live bar (full names in plain lines).
_SHOWN = {
    "loss": "loss",
    "ar_loss": "ar",
    "diffusion_loss": "diff",
    "grad_norm": "gnorm",
    "learning_rate": "lr",
    "tokens_per_s": "tok/s",
    "mfu": "mfu",
}


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keep only the records of steps <= `last_step` (and no half-written line) in `path`; how many were dropped.

    Rewritten through a temporary file and an atomic rename, so a crash here loses nothing.
    """
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record["step"]) <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


def _short(v: Any) -> str:
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    return str(v)
