"""Compile a lowered program for a TPU and say what it costs per chip: memory term by term, time, and whether it fits.

The figures are XLA's own (`Compiled.memory_analysis()` and `cost_analysis()`), so they include what
an analytic estimate misses: temporaries the compiler adds, copies, fragmentation of the program's
buffers, and the program's code. A program the compiler itself cannot fit is reported, not raised.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from pdjax.aot.topology import GiB, Target
from pdjax.memory import MemoryEstimate

TERMS = ("arguments", "outputs", "aliased", "temporaries", "code")


@dataclasses.dataclass
class CompileReport:
    """One compiled program on one chip of `target`: the compiler's memory terms (bytes), compile seconds, the
    compiler's cost estimate, and the analytic estimate of `pdjax.memory` beside them."""

    what: str
    target: Target
    compile_s: float
    terms: dict[str, int]  # TERMS; total = arguments + outputs - aliased + temporaries + code
    estimate: MemoryEstimate | None = None
    cost: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None  # the compiler's reason when it refused the program (out of HBM)
    compile_cpu_s: float | None = None  # CPU seconds of the compile (all threads): comparable on a busy machine

    @property
    def total(self) -> int:
        t = self.terms
        return t["arguments"] + t["outputs"] - t["aliased"] + t["temporaries"] + t["code"]

    @property
    def fits(self) -> bool:
        return self.error is None and self.total <= self.target.hbm_bytes

    def largest(self) -> tuple[str, int]:
        """The largest term (aliased outputs counted once, with the arguments)."""
        terms = {k: v for k, v in self.terms.items() if k != "aliased"}
        terms["outputs"] -= self.terms["aliased"]
        return max(terms.items(), key=lambda kv: kv[1])

    def reason(self) -> str:
        """One line: why the program does not fit (empty when it does)."""
        if self.fits:
            return ""
        chip = f"{self.target.hbm_bytes / GiB:.1f} GiB of HBM per {self.target.generation.topology} chip"
        if self.error is not None:
            return f"{self.what} does not fit {self.target.accelerator}: the TPU compiler ran out of memory ({self.error})"
        name, size = self.largest()
        return (f"{self.what} does not fit {self.target.accelerator}: {self.total / GiB:.2f} GiB per chip > {chip}; "
                f"largest term: {name} {size / GiB:.2f} GiB")

    def table(self) -> str:
        """The report as text: compiled terms, the analytic estimate beside, the cost estimate, and the verdict."""
        t = self.target
        lines = [f"{self.what} on {t.accelerator} ({t.chips} chip{'s' * (t.chips > 1)}, {t.topology}), "
                 f"compiled in {self.compile_s:.1f} s"
                 + (f" ({self.compile_cpu_s:.1f} s of CPU)" if self.compile_cpu_s is not None else "")]
        if self.error is None:
            lines.append("compiled, per chip")
            for name in TERMS:
                sign = "-" if name == "aliased" else " "
                lines.append(f"  {name:<28}{sign}{size(self.terms[name]):>12}")
            lines.append(f"  {'total':<28} {size(self.total):>12}")
        if self.estimate is not None:
            ratio = f" (compiled / estimate: {self.total / self.estimate.total:.2f})" if self.error is None else ""
            lines.append(f"pdjax.memory's estimate{ratio}")
            lines += ["  " + line for line in self.estimate.table().splitlines()[1:]]
        if self.cost:
            lines.append("compiler's cost estimate (a scan over layers counts its body once): "
                         + ", ".join(f"{k} {_number(v)}" for k, v in self.cost.items()))
        hbm = f"HBM per chip {t.hbm_bytes / GiB:.2f} GiB"
        lines.append(f"fits: {hbm}, {(t.hbm_bytes - self.total) / GiB:.2f} GiB left" if self.fits
                     else "does not fit: " + self.reason())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``--json``)."""
        out: dict[str, Any] = {
            "what": self.what, "accelerator": self.target.accelerator, "topology": self.target.topology,
            "chips": self.target.chips, "fits": self.fits, "total_bytes": self.total if self.error is None else None,
            "hbm_bytes": self.target.hbm_bytes, "compile_s": round(self.compile_s, 2),
            "compile_cpu_s": None if self.compile_cpu_s is None else round(self.compile_cpu_s, 2),
            "terms": dict(self.terms) if self.error is None else None, "cost": self.cost, "error": self.error,
        }
        if self.estimate is not None:
            out["estimate_bytes"] = int(self.estimate.total)
            out["estimate_terms"] = {name: int(b) for name, b in self.estimate.terms}
        if not self.fits:
            out["reason"] = self.reason()
        return out


def size(n: float) -> str:
    """Bytes as GiB, or MiB below a tenth of a GiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _number(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.3g}"


_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED:\s*(.*)", re.S)


def compile_lowered(lowered: Any, what: str, target: Target, estimate: MemoryEstimate | None = None) -> CompileReport:
    """Compile `lowered` (a `jax.stages.Lowered` for a chip of `target`) and report it; the compiler's out-of-HBM
    refusal becomes a report that does not fit (any other compiler error is raised)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        compiled = lowered.compile()
    except Exception as e:  # jax's JaxRuntimeError: only the out-of-memory refusal is a verdict
        found = _OUT_OF_MEMORY.search(str(e))
        if found is None:
            raise
        message = " ".join(found.group(1).split())
        zero = dict.fromkeys(TERMS, 0)
        return CompileReport(what, target, time.perf_counter() - t0, zero, estimate, error=message[:300])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    m = compiled.memory_analysis()
    terms = {
        "arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    return CompileReport(what, target, seconds, terms, estimate, cost=cost_of(compiled), compile_cpu_s=cpu)


def cost_of(compiled: Any) -> dict[str, float]:
    """The compiler's flops, bytes accessed and optimal seconds of a compiled program (what it reports of them)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    keys = {"flops": "flops", "bytes accessed": "bytes_accessed", "optimal_seconds": "optimal_seconds"}
    return {name: float(cost[k]) for k, name in keys.items() if k in (cost or {})}
