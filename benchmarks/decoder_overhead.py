"""What the decoder's loop machinery costs, and the critical path of PD against AR, measured on CPU.

Table 1 (overhead): for each mode, the wall time of one decode (the jitted
while_loop: sampling, schedules, layout, window gathers, lax.switch/cond) per
model call, against a bare jitted forward of the same shapes run back to back
in a `lax.fori_loop` (no host round trips either). Each decode uses one window
bucket (max_length), so every call is either width 1 (a plan / AR step) or
width max_length (prefill, denoising step, commit); the bare time of a decode
is n1 * t(1) + nL * t(max_length) with n1, nL its calls of each width, counted
by the decoder. Ratio = decoder / bare (1.00 = no overhead). Best of --repeats.

Table 2 (critical path): model calls per answer on the critical path, PD
against AR, on the same prompts, from the decoder's stats. The model is tiny
and random; a scripted logits bias forces each prompt's plan (METHOD §5's
workload: 1-3 rounds, 1-4 promises, spans of 10-60 tokens) in PD mode, and
forces AR to end after exactly as many answer tokens as PD's clean answer
(spans' content), so both produce answers of equal length.

    python benchmarks/decoder_overhead.py [--max_length 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table

from pdjax.decode import DecodeConfig, DecodeOptions, Decoder, Forward, model_forward
from pdjax.model import DreamConfig, DreamModel
from pdjax.structure import ControlIds, Segments, clean_tokens

IDS = ControlIds(async_start=50, async_end=51, sync=52, eos=53, pad=54, promise_start=55, promise_end=56, mask=57,
                 digits=tuple(range(60, 70)))
CONTROLS = sorted(IDS.control_set)
GREEDY = dict(temperature=0.0, top_p=None)
MODELS = {
    "tiny (0.2M)": lambda v: DreamConfig.tiny(vocab_size=v),
    "small (5M)": lambda v: DreamConfig.tiny(vocab_size=v, hidden_size=256, intermediate_size=768, num_layers=4,
                                            num_heads=8, num_kv_heads=4, head_dim=32),
}
# (rounds, length_scale): rounds = [([(topic_words, number), ...], closer), ...]
WORKLOAD = [
    ([([(2, 3), (1, 4)], "sync"), ([(1, 2)], "eos")], 10),
    ([([(1, 2), (2, 2), (1, 1)], "eos")], 10),
    ([([(1, 5)], "sync"), ([(2, 3), (1, 2)], "sync"), ([(1, 2)], "eos")], 10),
    ([([(1, 6), (1, 4), (2, 3), (1, 3)], "eos")], 10),
]


def with_bias(forward: Forward, max_length: int) -> Forward:
    """The model plus a bias table [1, max_length + 1, V] by position, passed with the parameters."""

    def apply(params, tokens, segments, cache):
        return forward.apply(params[0], tokens, segments, cache)

    def head(params, hidden, row, position):
        weights, table = params
        return forward.head(weights, hidden, row, position) + table[0][jnp.clip(position, 0, max_length)]

    return Forward(apply, (forward.params, np.zeros((1, max_length + 1, 1), np.float32)), forward.make_cache, head)


def table_for(forced: dict[int, int], v: int, max_length: int, suppress: list[int]) -> np.ndarray:
    table = np.zeros((1, max_length + 1, v), np.float32)
    table[0, :, suppress] = -1e4
    for q, tok in forced.items():
        if q <= max_length:
            table[0, q - 1, tok] = 2e4
    return table


def pd_script(prompt_len: int, rounds, scale: int) -> dict[int, int]:
    forced, cur = {}, prompt_len
    for promises, closer in rounds:
        for words, number in promises:
            forced[cur] = IDS.promise_start
            cur += 1 + words
            for d in str(number):
                forced[cur] = IDS.digits[int(d)]
                cur += 1
            forced[cur] = IDS.promise_end
            cur += 1
        forced[cur] = IDS.sync if closer == "sync" else IDS.eos
        cur += sum(n * scale + 2 for _, n in promises) + 1
    return forced


def bare_time(forward: Forward, params, width: int, calls: int, length: int, repeats: int) -> float:
    """Seconds per call of a jitted forward of `width` tokens with a cache, `calls` times in a fori_loop."""

    def body(i, carry, params):
        cache, acc = carry
        pos = jnp.clip(i * width + jnp.arange(width, dtype=jnp.int32), 0, length - 2)[None]
        seg = Segments(jnp.zeros_like(pos), pos, pos, jnp.ones_like(pos), jnp.ones_like(pos))
        hidden, cache = forward.apply(params, (pos % 97 + 100).astype(jnp.int32), seg, cache)
        # the logits of every position, as the decoder computes them for a denoising window's masks
        logits = forward.head(params, hidden[0], jnp.zeros_like(pos[0]), pos[0])
        return cache, acc + jnp.sum(logits)

    def loop(p):
        return jax.lax.fori_loop(0, calls, lambda i, c: body(i, c, p), (forward.make_cache(1, length), 0.0))[1]

    run = jax.jit(loop)
    run(params).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(params).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best / calls


def best_decode(decoder: Decoder, prompt, options, params, repeats: int):
    decoder.generate([prompt], options, params=params)  # compile
    best = None
    for _ in range(repeats):
        result = decoder.generate([prompt], options, params=params)[0]
        if best is None or result.stats.wall_time_s < best.stats.wall_time_s:
            best = result
    return best


def overhead_table(args) -> Table:
    v, length = 512, args.max_length
    prompt = list(range(100, 108))
    table = Table(title=f"decoder overhead per model call (CPU, batch 1, max_length {length}, best of {args.repeats})")
    for col in ("model", "mode", "calls (w=1 / w=L)", "decoder ms/call", "bare fwd ms/call", "ratio"):
        table.add_column(col, justify="right")
    for name, make in MODELS.items():
        model = DreamModel(make(v), rngs=nnx.Rngs(0))
        base = model_forward(model)
        forward = with_bias(base, length)
        t1 = bare_time(forward, (base.params, np.zeros((1, length + 1, v), np.float32)), 1, 64, length + 1, args.repeats)
        tl = bare_time(forward, (base.params, np.zeros((1, length + 1, v), np.float32)), length, 8, length + 1,
                       args.repeats)
        rounds, scale = WORKLOAD[0]
        cases = {
            "ar": (table_for({}, v, length, CONTROLS), DecodeOptions(**GREEDY)),
            "pd": (table_for(pd_script(len(prompt), rounds, scale), v, length, CONTROLS + list(IDS.digits)),
                   DecodeOptions(length_scale=scale, **GREEDY)),
            "diffusion": (table_for({}, v, length, [c for c in CONTROLS if c != IDS.eos]),
                          DecodeOptions(steps_ratio=0.25, **GREEDY)),
        }
        for mode, (bias, options) in cases.items():
            decoder = Decoder(forward, eos_id=IDS.eos, ids=IDS,
                              config=DecodeConfig(mode=mode, max_length=length, buckets=(length,)))
            r = best_decode(decoder, prompt, options, (base.params, bias), args.repeats)
            s = r.stats
            narrow, wide = s.plan_calls, s.model_calls - s.plan_calls  # plan steps are width 1, the rest width L
            bare = narrow * t1 + wide * tl
            table.add_row(name, mode, f"{narrow} / {wide}", f"{1e3 * s.wall_time_s / s.model_calls:.3f}",
                          f"{1e3 * bare / s.model_calls:.3f}", f"{s.wall_time_s / bare:.2f}")
    return table


def critical_path_table(args) -> Table:
    v, length = 512, args.max_length
    model = DreamModel(MODELS["tiny (0.2M)"](v), rngs=nnx.Rngs(0))
    base = model_forward(model)
    forward = with_bias(base, length)
    decoders = {mode: Decoder(forward, eos_id=IDS.eos, ids=IDS, config=DecodeConfig(mode=mode, max_length=length))
                for mode in ("pd", "ar")}
    table = Table(title="model calls on the critical path per answer, PD vs AR (same prompts, equal answer lengths)")
    for col in ("prompt", "rounds", "spans", "answer tokens", "steps_ratio", "attention", "PD calls", "AR calls",
                "AR / PD"):
        table.add_column(col, justify="right")
    totals: dict[tuple, list[int]] = {}
    for i, (rounds, scale) in enumerate(WORKLOAD):
        prompt = list(range(100, 104 + 3 * i))
        pd_bias = table_for(pd_script(len(prompt), rounds, scale), v, length, CONTROLS + list(IDS.digits))
        for ratio, dense in ((1.0, False), (0.5, False), (1.0, True)):
            options = DecodeOptions(length_scale=scale, steps_ratio=ratio, dense=dense, **GREEDY)
            pd = decoders["pd"].generate([prompt], options, params=(base.params, pd_bias))[0]
            answer = len(clean_tokens(prompt + pd.token_ids, IDS, len(prompt)))
            ar_bias = table_for({len(prompt) + answer: IDS.eos}, v, length, CONTROLS)
            ar = decoders["ar"].generate([prompt], options, params=(base.params, ar_bias))[0]
            assert len(ar.token_ids) == answer + 1 and pd.stats.finish_reason == "eos"
            key = (ratio, dense)
            totals.setdefault(key, [0, 0])
            totals[key][0] += pd.stats.model_calls
            totals[key][1] += ar.stats.model_calls
            table.add_row(str(i), str(pd.stats.rounds), str(pd.stats.span_lengths), str(answer), f"{ratio}",
                          "dense" if dense else "sparse", str(pd.stats.model_calls), str(ar.stats.model_calls),
                          f"{ar.stats.model_calls / pd.stats.model_calls:.2f}x")
    for (ratio, dense), (p, a) in totals.items():
        table.add_row("all", "", "", "", f"{ratio}", "dense" if dense else "sparse", str(p), str(a), f"{a / p:.2f}x")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=150)
    console.print(f"jax {jax.__version__}, devices {jax.devices()}")
    console.print(overhead_table(args))
    console.print(critical_path_table(args))


if __name__ == "__main__":
    main()
