"""Dream-7B on one GPU: an AR step vs a denoising round vs a commit, full PD requests vs AR, HBM bandwidth.

Dream-7B's shape (`DreamConfig.dream_7b()`) with random bfloat16 weights, batch size 1.
Plans are forced to the workload METHOD §5 reports for the released checkpoint
on AlpacaEval, so the decoder does the paper's work without the paper's weights:

- ``--requests`` requests (default 10) whose first rounds have exactly median 2
  and mean 3.1 spans; span lengths are promise numbers 1..20 x length_scale 10
  (10..200 tokens), drawn uniformly from a seed; 60% of first plans end in
  ``<sync/>``.
- What §5 does not give, fixed here and printed: prompts of 64 tokens; each
  promise is ``<promise>-<topic>`` + 2 topic words + the number + ``</topic>``;
  a round after a ``<sync/>`` is 16 plain tokens and ``<|im_end|>``.
- Plan tokens are forced through the logits (a per-position table passed with
  the parameters); span tokens are the model's own (random) choices. Sampling:
  the decoder's defaults (temperature 0.2, top-p 0.95, entropy confidence).

Measured, each in this run:

1. The time of one AR step (1 token), one denoising round over 64/128/256 span
   tokens (a group of 2 spans) and one commit (that group + ``<sync/>``), each a
   jitted forward with a KV cache holding a 256-token prefix, plus the
   sampling the decoder does on its logits; median of ``--iters`` calls.
2. Every forced request decoded in mode pd, and in mode ar producing exactly
   as many tokens (eos forced at that length, banned before): wall time, model
   calls, speedup.
3. The fraction of peak HBM bandwidth one AR step reaches: bytes of the weights
   an AR step reads (every parameter but the input embedding table, of which it
   reads one row) / step time / the device's peak bandwidth (vendor datasheets,
   `PEAK_HBM_BYTES_PER_S`, or ``--peak_tbs``); also with the KV cache's bytes.

The device, JAX version and settings are printed with the tables (and written
with ``--json PATH``).

    python benchmarks/gpu_dream7b.py [--requests 10] [--seed 0] [--iters 20] [--json out.json]

Without a GPU it prints why on stderr and exits with status 77 (the usual
"skipped" status), measuring nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

SKIPPED = 77
FREE = -1  # a position whose token the model chooses

# Peak HBM bandwidth by JAX `device_kind`, bytes/s, from the vendors' datasheets.
PEAK_HBM_BYTES_PER_S = {
    "NVIDIA H100 80GB HBM3": 3.35e12,  # SXM5
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA H200 NVL": 4.8e12,
    "NVIDIA GH200 480GB": 4.0e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "NVIDIA A100 80GB PCIe": 1.935e12,
    "NVIDIA A100-PCIE-40GB": 1.555e12,
    "NVIDIA L40S": 0.864e12,
    "NVIDIA A10G": 0.6e12,
    "NVIDIA L4": 0.3e12,
    "NVIDIA B200": 8.0e12,
}

# METHOD §5's first-round workload, exactly: 10 requests -> spans median 2, mean 3.1; 6 of 10 plans end in <sync/>
FIRST_ROUND_SPANS = (1, 1, 2, 2, 2, 2, 3, 5, 6, 7)
SYNC_SHARE = 0.6
NUMBER_RANGE = (1, 20)  # promise numbers; x length_scale 10 -> spans of 10..200 tokens
LENGTH_SCALE = 10
PROMPT_TOKENS = 64
TOPIC_WORDS = 2
TAIL_TOKENS = 16
PREFIX_TOKENS = 256  # cached context of the single-call timings
ROUND_SIZES = (64, 128, 256)


# ---- the workload ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """One forced request: promise numbers of its first round, and whether that round ends in `<sync/>`."""

    numbers: tuple[int, ...]
    sync: bool


def paper_workload(n: int, seed: int = 0) -> list[Request]:
    """`n` requests (a multiple of 10) with METHOD §5's first-round statistics; numbers drawn from `seed`."""
    if n % len(FIRST_ROUND_SPANS):
        raise ValueError(f"--requests must be a multiple of {len(FIRST_ROUND_SPANS)} to hit the statistics exactly")
    rng = np.random.default_rng(seed)
    reps = n // len(FIRST_ROUND_SPANS)
    counts = list(FIRST_ROUND_SPANS) * reps
    syncs = [True] * round(SYNC_SHARE * n) + [False] * (n - round(SYNC_SHARE * n))
    order = rng.permutation(n)
    syncs = [syncs[i] for i in order]  # which plans sync, independent of their span counts
    lo, hi = NUMBER_RANGE
    return [Request(tuple(int(x) for x in rng.integers(lo, hi + 1, size=c)), s) for c, s in zip(counts, syncs)]


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token ids the forced plans use: control ids, digits '0'..'9', topic and text words, prompt tokens."""

    ids: Any  # pdjax.structure.ControlIds
    topic: int
    text: int
    prompt_base: int


def dream_vocab() -> Vocab:
    """The released checkpoints' control ids (METHOD §1) and Qwen2's digit ids ('0' is 15 ... '9' is 24)."""
    from pdjax.structure import ControlIds

    ids = ControlIds(async_start=151667, async_end=151668, sync=151671, eos=151645, pad=151672,
                     promise_start=151669, promise_end=151670, mask=151666, digits=tuple(range(15, 25)))
    return Vocab(ids, topic=1000, text=2000, prompt_base=5000)


def plan_tokens(numbers: Sequence[int], vocab: Vocab) -> list[int]:
    """The promises of one round: `<promise>-<topic>` word word <digits> `</topic>` each."""
    out = []
    for n in numbers:
        out += [vocab.ids.promise_start] + [vocab.topic] * TOPIC_WORDS
        out += [vocab.ids.digits[int(d)] for d in str(n)] + [vocab.ids.promise_end]
    return out


def expected_response(request: Request, vocab: Vocab, length_scale: float = LENGTH_SCALE) -> list[int]:
    """The response the decoder must produce, with `<|mask|>` where the model picks span tokens."""
    ids = vocab.ids
    out = plan_tokens(request.numbers, vocab)
    for n in request.numbers:
        out += [ids.async_start] + [ids.mask] * int(n * length_scale) + [ids.async_end]
    if request.sync:
        return out + [ids.sync] + [vocab.text] * TAIL_TOKENS + [ids.eos]
    return out + [ids.eos]


def prompt_tokens(vocab: Vocab, length: int = PROMPT_TOKENS) -> list[int]:
    return [vocab.prompt_base + i for i in range(length)]


def pd_forcing(request: Request, prompt_len: int, vocab: Vocab, size: int,
               length_scale: float = LENGTH_SCALE) -> np.ndarray:
    """[size] int32: the token forced at each position in pd mode (FREE elsewhere).

    A closer is sampled right after the plan (position q) and the layout then moves it
    behind the group, so it is forced at q; the next round's tokens follow the group and closer.
    """
    table = np.full(size, FREE, np.int32)
    plan = plan_tokens(request.numbers, vocab)
    q = prompt_len + len(plan)
    table[prompt_len:q] = plan
    table[q] = vocab.ids.sync if request.sync else vocab.ids.eos
    if request.sync:
        group = sum(int(n * length_scale) + 2 for n in request.numbers)
        start = q + group + 1
        table[start : start + TAIL_TOKENS + 1] = [vocab.text] * TAIL_TOKENS + [vocab.ids.eos]
    return table


def ar_forcing(prompt_len: int, tokens: int, eos: int, size: int) -> np.ndarray:
    """[size] int32: eos forced as the `tokens`-th response token, everything else free (eos banned there)."""
    table = np.full(size, FREE, np.int32)
    table[prompt_len + tokens - 1] = eos
    return table


def forced(forward: Any, eos: int, size: int, batch: int = 1) -> Any:
    """`forward` with parameters (weights, table [batch, size]): the logits predicting position p allow only
    table[b, p] where it is set; at free positions eos is banned (so AR runs to its forced length)."""
    import jax.numpy as jnp

    from pdjax.decode import Forward

    def apply(params: Any, tokens: Any, segments: Any, cache: Any) -> Any:
        return forward.apply(params[0], tokens, segments, cache)

    def head(params: Any, hidden: Any, row: Any, position: Any) -> Any:
        weights, table = params
        logits = forward.head(weights, hidden, row, position)
        want = table[row, jnp.clip(position + 1, 0, table.shape[1] - 1)][:, None]  # [N, 1]
        vocab = jnp.arange(logits.shape[-1])
        free = jnp.where(vocab == eos, -jnp.inf, logits)
        return jnp.where(want >= 0, jnp.where(vocab == want, 0.0, -jnp.inf), free)

    return Forward(apply, (forward.params, jnp.full((batch, size), FREE, jnp.int32)), forward.make_cache, head)


# ---- bandwidth arithmetic ----------------------------------------------------------------


def ar_step_weight_bytes(config: Any) -> int:
    """Bytes of the weights one AR step reads: every parameter but the input embedding table, plus one row of it."""
    itemsize = np.dtype(config.param_dtype).itemsize
    table = config.vocab_size * config.hidden_size
    reads_table = config.tie_word_embeddings  # a tied head reads the whole table anyway
    return (config.num_params - (0 if reads_table else table) + (0 if reads_table else config.hidden_size)) * itemsize


def kv_bytes(config: Any, context: int) -> int:
    """Bytes of keys and values an AR step reads at `context` cached tokens."""
    itemsize = np.dtype(config.dtype).itemsize
    return 2 * config.num_layers * context * config.num_kv_heads * config.head_dim * itemsize


def peak_bandwidth(device_kind: str, override_tbs: float | None = None) -> float | None:
    """The device's peak HBM bytes/s (``override_tbs`` in TB/s wins); None when the kind is not in the table."""
    if override_tbs is not None:
        return override_tbs * 1e12
    return PEAK_HBM_BYTES_PER_S.get(device_kind)


def bandwidth_fraction(nbytes: int, seconds: float, peak: float) -> float:
    """Achieved bytes/s over the peak."""
    return nbytes / seconds / peak


# ---- timing --------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    """Median wall time of `fn()` (which must return a blocked-on result) over `iters` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _segments(positions: np.ndarray, block: np.ndarray, visible: np.ndarray, role: int) -> Any:
    from pdjax.structure import Segments

    n = len(positions)
    return Segments(block[None].astype(np.int32), visible[None].astype(np.int32), positions[None].astype(np.int32),
                    np.ones((1, n), np.int32), np.full((1, n), role, np.int32))


def single_call_timings(forward: Any, iters: int, *, prefix: int = PREFIX_TOKENS,
                        sizes: Sequence[int] = ROUND_SIZES, seed: int = 0) -> dict[str, float]:
    """Seconds of one AR step, one denoising round over each of `sizes` tokens, and one commit of that group.

    Each call runs the model with a KV cache holding `prefix` tokens, writes its keys/values back
    (the cache is donated and carried from call to call, as in the decoder) and samples what the
    decoder samples: one token for an AR step or a commit, every position for a denoising round.
    """
    import jax

    from pdjax.decode import DecodeOptions, SamplingParams, sample
    from pdjax.decode.forward import full_logits
    from pdjax.structure import NEVER, Role

    d = DecodeOptions()
    sampling = SamplingParams.make(d.temperature, d.top_p, d.top_k, d.alg)
    c = prefix
    rng = np.random.default_rng(seed)
    pos = np.arange(c)
    prompt = rng.integers(0, 1000, size=(1, c)).astype(np.int32)
    _, cache = jax.jit(forward.apply)(forward.params, prompt, _segments(pos, 0 * pos, pos, int(Role.PROMPT)),
                                      forward.make_cache(1, c + max(sizes) + 2))
    box = [cache]
    key = jax.random.key(seed)

    def call(tokens: np.ndarray, segments: Any, sample_all: bool) -> Callable[[], Any]:
        @functools.partial(jax.jit, donate_argnums=1)
        def run(params: Any, cache: Any) -> Any:
            logits, cache = full_logits(forward, params, tokens, segments, cache)
            rows = logits if sample_all else logits[:, -1:]
            keys = jax.random.split(key, rows.shape[0] * rows.shape[1]).reshape(rows.shape[:2])
            return sample(keys, rows, sampling).token, cache

        def once() -> Any:
            token, box[0] = run(forward.params, box[0])
            return jax.block_until_ready(token)

        return once

    out = {}
    step = np.array([c])
    out["ar_step"] = median_seconds(call(np.ones((1, 1), np.int32), _segments(step, 0 * step, step, int(Role.PLAN)),
                                         False), iters)
    for n in sizes:
        p = np.arange(c, c + n)
        block = np.where(p < c + n // 2, 1, 2)  # two spans (the median group), each its own block
        out[f"denoise_{n}"] = median_seconds(
            call(np.ones((1, n), np.int32), _segments(p, block, np.full(n, NEVER), int(Role.SPAN)), True), iters)
        p1 = np.arange(c, c + n + 1)
        block1 = np.where(p1 < c + n // 2, 1, np.where(p1 < c + n, 2, 0))
        visible = np.where(p1 < c + n, c + n, p1)  # the group becomes visible from the <sync/>
        out[f"commit_{n}"] = median_seconds(
            call(np.ones((1, n + 1), np.int32), _segments(p1, block1, visible, int(Role.SPAN)), False), iters)
    return out


def run_requests(forward: Any, requests: Sequence[Request], vocab: Vocab, max_length: int, *,
                 length_scale: float = LENGTH_SCALE, prompt_len: int = PROMPT_TOKENS,
                 modes: Sequence[str] = ("pd", "ar")) -> list[dict[str, Any]]:
    """Decode every request in pd mode (checking that the plan followed the forcing), then in ar mode to the
    same number of tokens; per request and mode: tokens, model calls, seconds (after an untimed warm run)."""
    import jax.numpy as jnp

    from pdjax.decode import DecodeConfig, DecodeOptions, Decoder

    ids = vocab.ids
    size = max_length + 1
    fwd = forced(forward, ids.eos, size)
    decoders = {m: Decoder(fwd, eos_id=ids.eos, ids=ids, config=DecodeConfig(mode=m, max_length=max_length))
                for m in modes}
    options = DecodeOptions(length_scale=length_scale)
    prompt = prompt_tokens(vocab, prompt_len)
    rows = []
    for i, req in enumerate(requests):
        row: dict[str, Any] = {"request": i, "spans": len(req.numbers), "sync": req.sync}
        tables = {"pd": pd_forcing(req, len(prompt), vocab, size, length_scale)}
        for mode in modes:
            params = (forward.params, jnp.asarray(tables[mode][None]))
            decoders[mode].generate([prompt], options, params=params)  # compile / warm up
            t0 = time.perf_counter()
            (result,) = decoders[mode].generate([prompt], options, params=params)
            seconds = time.perf_counter() - t0
            s = result.stats
            row[mode] = {"tokens": s.tokens_generated, "calls": s.model_calls, "seconds": seconds,
                         "finish": s.finish_reason}
            if mode == "pd":
                expected = expected_response(req, vocab, length_scale)
                got = result.token_ids
                if len(got) != len(expected) or any(e not in (ids.mask, g) for e, g in zip(expected, got)):
                    raise AssertionError(f"request {i}: the decoder did not follow the forced plan")
                tables["ar"] = ar_forcing(len(prompt), s.tokens_generated, ids.eos, size)
        rows.append(row)
    return rows


# ---- main -------------------------------------------------------------------------------


def gpu_device() -> Any | None:
    """The first GPU JAX sees, or None."""
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return gpus[0] if gpus else None


def needed_length(requests: Sequence[Request], vocab: Vocab) -> int:
    """A max_length (a power of two) that holds the prompt and every expected response."""
    need = PROMPT_TOKENS + max(len(expected_response(r, vocab)) for r in requests) + 1
    return 1 << (need - 1).bit_length()


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything on the first GPU and print the tables (status 77 without a GPU)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak_tbs", type=float, default=None, help="peak HBM bandwidth in TB/s (default: by device)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    device = gpu_device()
    if device is None:
        print("gpu_dream7b: no GPU visible to JAX (install jax[cuda12] and run on a GPU machine); nothing measured",
              file=sys.stderr)
        return SKIPPED

    import jax
    from flax import nnx
    from rich.console import Console
    from rich.table import Table

    from pdjax.decode import model_forward
    from pdjax.model import DreamConfig, DreamModel

    console = Console()
    config = DreamConfig.dream_7b()
    vocab = dream_vocab()
    requests = paper_workload(args.requests, args.seed)
    max_length = needed_length(requests, vocab)
    t0 = time.perf_counter()
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DreamModel(config, rngs=nnx.Rngs(args.seed))))
    state = jax.jit(lambda: nnx.state(DreamModel(config, rngs=nnx.Rngs(args.seed))))()
    model = nnx.merge(graphdef, state)
    console.print(f"random bf16 Dream-7B ({config.num_params / 1e9:.2f}B parameters) on {device.device_kind} "
                  f"in {time.perf_counter() - t0:.0f} s")

    forward = model_forward(model)
    single = single_call_timings(forward, args.iters, seed=args.seed)
    rows = run_requests(forward, requests, vocab, max_length)

    weight_bytes = ar_step_weight_bytes(config)
    kv = kv_bytes(config, PREFIX_TOKENS)
    peak = peak_bandwidth(device.device_kind, args.peak_tbs)
    step = single["ar_step"]

    t = Table(title=f"one call, Dream-7B bf16, batch 1, {PREFIX_TOKENS}-token cached prefix ({device.device_kind})")
    for col in ("call", "tokens in", "ms", "vs AR step"):
        t.add_column(col, justify="left" if col == "call" else "right")
    t.add_row("AR step", "1", f"{step * 1e3:.2f}", "1.00x")
    for n in ROUND_SIZES:
        for kind, width in (("denoise", n), ("commit", n + 1)):
            s = single[f"{kind}_{n}"]
            t.add_row(f"{'denoising round' if kind == 'denoise' else 'commit'} ({n} span tokens)", str(width),
                      f"{s * 1e3:.2f}", f"{s / step:.2f}x")
    console.print(t)

    r = Table(title="full requests: PD vs AR producing the same tokens (forced METHOD §5 workload)")
    for col in ("request", "spans", "sync", "tokens", "PD calls", "AR calls", "PD s", "AR s", "speedup"):
        r.add_column(col, justify="right")
    for row in rows:
        pd_, ar = row["pd"], row["ar"]
        r.add_row(str(row["request"]), str(row["spans"]), "yes" if row["sync"] else "no", str(pd_["tokens"]),
                  str(pd_["calls"]), str(ar["calls"]), f"{pd_['seconds']:.3f}", f"{ar['seconds']:.3f}",
                  f"{ar['seconds'] / pd_['seconds']:.2f}x")
    tot = {m: sum(row[m]["seconds"] for row in rows) for m in ("pd", "ar")}
    calls = {m: statistics.fmean(row[m]["calls"] for row in rows) for m in ("pd", "ar")}
    r.add_row("all", "", "", "", f"{calls['pd']:.1f}", f"{calls['ar']:.1f}", f"{tot['pd']:.3f}", f"{tot['ar']:.3f}",
              f"{tot['ar'] / tot['pd']:.2f}x")
    console.print(r)

    frac = bandwidth_fraction(weight_bytes, step, peak) if peak else None
    frac_kv = bandwidth_fraction(weight_bytes + kv, step, peak) if peak else None
    console.print(
        f"AR step: {weight_bytes / 1e9:.2f} GB of weights (+{kv / 1e6:.1f} MB KV) in {step * 1e3:.2f} ms = "
        f"{weight_bytes / step / 1e12:.2f} TB/s; "
        + (f"{frac:.1%} of the {peak / 1e12:.2f} TB/s peak ({frac_kv:.1%} with the KV cache)" if peak else
           f"peak bandwidth of {device.device_kind!r} unknown: pass --peak_tbs")
    )
    env = {"device": device.device_kind, "jax": jax.__version__, "python": platform.python_version(),
           "requests": args.requests, "seed": args.seed, "iters": args.iters, "max_length": max_length}
    console.print(env)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "single_call_s": single, "requests": rows, "ar_step_weight_bytes": weight_bytes,
                       "kv_bytes": kv, "peak_bytes_per_s": peak, "hbm_fraction": frac,
                       "hbm_fraction_with_kv": frac_kv}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
