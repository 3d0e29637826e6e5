"""Answer a prompt list into an alpaca_eval outputs file: sharded over hosts and devices, resumable.

Prompts are split first over processes (``shard_index`` of ``num_shards``,
by default JAX's process index and count: each host takes every
num_shards-th prompt), then the unfinished prompts of a process over its
worker devices (one thread and one parameter copy per device; on one device,
one worker). Every finished batch is appended to the worker's part file
(`pdjax.eval.store`), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import jax

from pdjax.decode import DecodeOptions
from pdjax.eval.prompts import Prompt, prompts_fingerprint, shard_of
from pdjax.eval.runner import EvalModel, Replica
from pdjax.eval.store import Assembly, OutputStore, clear_output


def run_settings(model: EvalModel, prompts: Sequence[Prompt], options: DecodeOptions, generator: str,
                 extra: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Everything that fixes the answers and their latencies (a resumed run must match it)."""
    c = model.config
    return {
        **dict(extra),
        "generator": generator,
        "mode": c.mode,
        "options": dataclasses.asdict(options),
        "max_length": c.max_length,
        "batch_size": c.batch_size,
        "max_spans": getattr(c, "max_spans", None),  # mode dream has no spans
        "buckets": list(c.buckets),
        "chat_template": model.chat_template,
        "system_prompt": model.system_prompt,
        "prompts": prompts_fingerprint(prompts),
    }


@dataclasses.dataclass
class GenerateReport:
    """What one call did: samples written now, samples found finished, and the assembly (process 0 only)."""

    written: int
    already_done: int
    shard_size: int
    assembly: Assembly | None


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _default_shard(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    if (shard_index is None) != (num_shards is None):
        raise ValueError("shard_index and num_shards go together")
    if num_shards is None:
        return jax.process_index(), jax.process_count()
    return shard_index, num_shards


def generate_outputs(model: EvalModel, prompts: Sequence[Prompt], output: str, *,
                     options: DecodeOptions = DecodeOptions(), generator: str | None = None,
                     settings: Mapping[str, Any] = (), shard_index: int | None = None,
                     num_shards: int | None = None, devices: Sequence[Any] | None = None,
                     stop_after: int | None = None, overwrite: bool = False,
                     on_batch: Callable[[int], None] | None = None) -> GenerateReport:
    """Decode this process's unfinished share of `prompts` and append the records under ``output + ".parts"``.

    ``devices``: local devices to decode on in parallel (default: one worker on the default device).
    ``stop_after``: stop once this many new samples are written (a partial run; run again to finish).
    When every prompt is finished, process 0 writes `output` (after a barrier across processes).
    """
    generator = generator or model.name
    if overwrite and jax.process_index() == 0:
        clear_output(output)
    if overwrite:
        _barrier("pdjax.eval.overwrite")  # no host writes before the old files are gone
    store = OutputStore(output, run_settings(model, prompts, options, generator, settings), len(prompts))
    shard_index, num_shards = _default_shard(shard_index, num_shards)
    mine = shard_of(prompts, shard_index, num_shards)
    done = store.finished()
    todo = [p for p in mine if p.index not in done]
    encoded = {p.index: model.encode(p.instruction) for p in todo}
    for p in todo:  # refuse bad prompts before spending any device time
        model.check(p, encoded[p.index], options)

    workers = list(devices) if devices else [None]
    state = {"written": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def work(j: int) -> None:
        share = todo[j::len(workers)]
        if not share:
            return
        replica = Replica(model, workers[j])
        writer = store.writer(f"shard{shard_index:03d}-of{num_shards:03d}-worker{j:02d}")
        b = model.config.batch_size
        try:
            for start in range(0, len(share), b):
                if stop.is_set():
                    break
                batch = share[start : start + b]
                records = replica.decode(batch, options, generator, [encoded[p.index] for p in batch])
                kind = getattr(workers[j] or jax.devices()[0], "device_kind", "unknown")
                writer.write([{**r, "device": kind} for r in records])
                with lock:
                    state["written"] += len(records)
                    if stop_after is not None and state["written"] >= stop_after:
                        stop.set()
                if on_batch is not None:
                    on_batch(len(records))
        except BaseException:
            stop.set()
            raise
        finally:
            writer.close()

    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        futures = [pool.submit(work, j) for j in range(len(workers))]
        for f in futures:
            f.result()

    assembly = None
    _barrier("pdjax.eval.generate")  # every host has written its share before process 0 assembles
    if jax.process_index() == 0:
        assembly = store.assemble()
    return GenerateReport(state["written"], len(mine) - len(todo), len(mine), assembly)
