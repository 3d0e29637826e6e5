"""The jitted, cached decoder equals a plain decoder written here from METHOD §4, token for token.

The reference recomputes the whole sequence with no KV cache at every step,
takes its attention masks from `pdjax.structure.segments_from_tokens`, and
follows the documented decoding rules (schedule with exact linspace
fractions, plan grammar, budget). Both run a tiny random DreamModel, greedy,
with a scripted logits bias that forces the plan's structure (promise tags,
digits, closers) while the model itself picks the topic words, plain text and
every span token, so a wrong cache entry or mask changes the output.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdjax.decode import DecodeConfig, DecodeInputError, DecodeOptions, Decoder, Forward, model_forward
from pdjax.model import DreamConfig, DreamModel
from pdjax.structure import (
    Segments,
    padding_segments,
    parse_response,
    segments_from_tokens,
)
from pdjax.structure.errors import UnclosedPromise
from structures import IDS, plan_banned  # control ids 50..57, digits 60..69

V = 160
MAX_LEN = 44
BIG = 1e4
CONTROLS = sorted(IDS.control_set)
DIGITS = list(IDS.digits)


# ---- the model, with a scripted bias by position -------------------------------------------


@pytest.fixture(scope="module")
def model() -> DreamModel:
    m = DreamModel(DreamConfig.tiny(vocab_size=V), rngs=nnx.Rngs(0))
    m.lm_head[...] = m.lm_head[...] * 15.0  # peaky distributions: confidences far apart
    return m


def bias_table(forced: dict[int, int]) -> np.ndarray:
    """[MAX_LEN + 1, V]: the row of position p biases the prediction made at p (of token p + 1).

    Controls and digits are suppressed everywhere; `forced[q] = tok` forces tok at position q.
    """
    table = np.zeros((MAX_LEN + 1, V), np.float32)
    table[:, CONTROLS + DIGITS] = -BIG
    for q, tok in forced.items():
        table[q - 1, tok] = 2 * BIG
    return table


def biased(forward: Forward, batch: int) -> Forward:
    """The model plus a per-row bias table [B, MAX_LEN + 1, V] passed with the parameters (no recompiles)."""

    def apply(params, tokens, segments, cache):
        return forward.apply(params[0], tokens, segments, cache)

    def head(params, hidden, row, position):
        weights, table = params
        return forward.head(weights, hidden, row, position) + table[row, jnp.clip(position, 0, MAX_LEN)]

    table = np.zeros((batch, MAX_LEN + 1, V), np.float32)
    return Forward(apply, (forward.params, table), forward.make_cache, head)


# ---- the scripted plans ----------------------------------------------------------------


def clip_lengths(lengths: list[int], start: int, max_length: int) -> list[int] | None:
    """The documented budget rule: spans keep their length in promise order while it lasts."""
    spare = max_length - start - 2 * len(lengths) - 1
    if spare < 0:
        return None
    out = []
    for n in lengths:
        out.append(max(0, min(n, spare)))
        spare -= out[-1]
    return out


def script(prompt_len: int, rounds: list, tail: int | None, length_scale: int = 1) -> dict[int, int]:
    """Forced tokens by position for `rounds` = [([(topic_words, number), ...], closer), ...] then a
    plain tail of `tail` free words and <|im_end|>. Topic words and tail words stay free."""
    forced: dict[int, int] = {}
    cur = prompt_len
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
        lengths = clip_lengths([n * length_scale for _, n in promises], cur, MAX_LEN)
        if lengths is None:
            return forced
        cur += sum(n + 2 for n in lengths) + 1  # the group, then the closer
    if tail is not None:
        forced[cur + tail] = IDS.eos
    return forced


# ---- the reference decoder ---------------------------------------------------------------


class Reference:
    """METHOD §4 with full recomputation: one uncached forward of the whole sequence per step."""

    def __init__(self, run, table: np.ndarray):
        self.run = run  # the jitted uncached model on one padded row
        self.table = table

    def logits(self, seq: list[int], seg: Segments) -> np.ndarray:
        """[len(seq), V] float64 logits (+ scripted bias), the sequence padded to MAX_LEN + 1."""
        n = len(seq)
        pad = padding_segments(MAX_LEN + 1 - n, start_position=n)
        full = Segments(*(np.concatenate([np.asarray(a, np.int32), b]) for a, b in zip(seg, pad)))
        tokens = np.zeros(MAX_LEN + 1, np.int32)
        tokens[:n] = seq
        out = np.asarray(self.run(tokens[None], Segments(*(a[None] for a in full)))[0, :n], np.float64)
        return out + self.table[np.arange(n)]

    # segments ---------------------------------------------------------------------------

    @staticmethod
    def pd_segments(seq: list[int], prompt_len: int, dense: bool) -> Segments:
        try:
            parsed = parse_response(seq, IDS, prompt_len, allow_truncated=True, allow_masks=True)
            return segments_from_tokens(seq, prompt_len, IDS, dense, parsed=parsed)
        except UnclosedPromise:  # a plan step inside a promise: the current round's plan is causal text
            start = max([prompt_len] + [i + 1 for i in range(prompt_len, len(seq)) if seq[i] == IDS.sync])
            head = Reference.pd_segments(seq[:start], prompt_len, dense)
            pos = np.arange(start, len(seq), dtype=np.int32)
            tail = Segments(np.zeros_like(pos), pos, pos, np.ones_like(pos), np.ones_like(pos))
            return Segments(*(np.concatenate([a, b]) for a, b in zip(head, tail)))

    @staticmethod
    def ar_segments(seq: list[int], prompt_len: int) -> Segments:
        seg = segments_from_tokens(seq + [IDS.eos], prompt_len, IDS, mode="ar_only")
        return Segments(*(a[:-1] for a in seg))

    @staticmethod
    def diffusion_segments(seq: list[int], prompt_len: int) -> Segments:
        shape = [IDS.eos if t == IDS.mask else t for t in seq]  # the layout does not depend on content
        return segments_from_tokens(shape, prompt_len, IDS, mode="diffusion_only")

    # sampling and confidence (greedy) -------------------------------------------------------

    @staticmethod
    def confidences(pred: np.ndarray, alg: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs = np.exp(pred - pred.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        token = probs.argmax(-1)
        top = np.sort(probs, -1)
        prob = top[:, -1]
        conf = {
            "entropy": np.sum(probs * np.log(probs + 1e-10), -1),
            "maskgit_plus": prob,
            "topk_margin": top[:, -1] - top[:, -2],
        }[alg]
        return token, prob, conf

    # the schedule ---------------------------------------------------------------------------

    @staticmethod
    def scheduled(masked: int, i: int, steps: int) -> int:
        if i >= steps - 1:
            return masked
        eps = Fraction(1, 1000)
        t = 1 + i * (eps - 1) / steps  # linspace(1, eps, steps + 1), exactly
        s = 1 + (i + 1) * (eps - 1) / steps
        return min(masked, max(1, int(masked * (1 - s / t))))

    def denoise(self, seq, spans, segments_of, steps, alg, threshold, banned) -> list[int]:
        """Unmask every span of `spans` (lists of positions) in `seq`; returns the step count."""
        i, carry = 0, [0] * len(spans)
        while any(seq[p] == IDS.mask for sp in spans for p in sp):
            logits = self.logits(seq, segments_of(seq))
            pred = np.concatenate([logits[:1], logits[:-1]])  # Dream: position j is read at j - 1
            pred[:, banned] = -np.inf
            token, prob, conf = self.confidences(pred, "maskgit_plus" if threshold is not None else alg)
            take = []
            for k, sp in enumerate(spans):
                masked = [p for p in sp if seq[p] == IDS.mask]
                if not masked:
                    continue
                order = sorted(masked, key=lambda p: (-conf[p], p))
                if threshold is None:
                    take += order[: self.scheduled(len(masked), i, steps)]
                else:
                    base = len(masked) // (steps - i) if i < steps else 0
                    budget = min(max(1, base) + carry[k], len(masked))
                    chosen = [p for r, p in enumerate(order[:budget]) if r == 0 or prob[p] >= threshold]
                    carry[k] = budget - len(chosen)
                    take += chosen
            for p in take:
                seq[p] = int(token[p])
            i += 1
        return i

    # the three modes -----------------------------------------------------------------------

    def pd(self, prompt, *, dense=False, steps_ratio=1.0, alg="entropy", threshold=None, length_scale=1,
           max_new_tokens=None):
        seq, plen = list(prompt), len(prompt)
        limit = min(MAX_LEN, plen + (max_new_tokens or MAX_LEN))
        round_start = plen
        calls = 1  # the prefill gives the first token
        banned = sorted(set(CONTROLS) - {IDS.pad})
        seg_of = lambda s: self.pd_segments(s, plen, dense)  # noqa: E731
        while True:
            logits = self.logits(seq, seg_of(seq))[-1]
            grammar = plan_banned(seq[round_start:])
            allowed = [t not in grammar for t in range(V)]
            tok = int(np.argmax(np.where(allowed, logits, -np.inf)))
            if tok not in (IDS.sync, IDS.eos):
                seq.append(tok)
                if len(seq) >= limit:
                    return seq[plen:], calls
                calls += 1
                continue
            promises = parse_response(seq, IDS, round_start, allow_truncated=True).rounds[-1].promises
            if not promises:
                return seq[plen:] + [tok], calls
            lengths = clip_lengths([p.number * length_scale for p in promises], len(seq), limit)
            if lengths is None:
                return seq[plen:], calls
            spans = []
            for n in lengths:
                start = len(seq)
                seq += [IDS.async_start] + [IDS.mask] * n + [IDS.async_end]
                spans.append(list(range(start + 1, start + 1 + n)))
            steps = max(1, int(max(lengths) * steps_ratio)) if max(lengths) else 0
            calls += self.denoise(seq, spans, seg_of, steps, alg, threshold, banned)
            seq.append(tok)
            if tok == IDS.eos or len(seq) >= limit:
                return seq[plen:], calls
            round_start = len(seq)
            calls += 1  # the commit gives the next plan token

    def ar(self, prompt):
        seq, plen = list(prompt), len(prompt)
        while True:
            tok = int(np.argmax(self.logits(seq, self.ar_segments(seq, plen))[-1]))
            seq.append(tok)
            if tok == IDS.eos or len(seq) >= MAX_LEN:
                return seq[plen:], len(seq) - plen

    def diffusion(self, prompt, *, steps_ratio=1.0, alg="entropy", threshold=None, max_new_tokens=None):
        plen = len(prompt)
        n = min(MAX_LEN - plen, max_new_tokens or MAX_LEN)
        seq = list(prompt) + [IDS.mask] * n
        steps = max(1, int(n * steps_ratio))
        banned = sorted(set(CONTROLS) - {IDS.eos})
        seg_of = lambda s: self.diffusion_segments(s, plen)  # noqa: E731
        calls = 1 + self.denoise(seq, [list(range(plen, plen + n))], seg_of, steps, alg, threshold, banned)
        answer = seq[plen:]
        if IDS.eos in answer:
            answer = answer[: answer.index(IDS.eos) + 1]
        return answer, calls


# ---- decoders under test (one compiled program each, shared across tests) -------------------

PROMPTS = [[100, 101, 102], [103, 104, 105, 106, 107, 108], [109, 110]]
# one scripted plan per prompt: 2 rounds / 1 round ending the answer / 3 rounds with a plain tail
PLANS = [
    ([([(1, 3), (0, 5)], "sync"), ([(1, 2)], "eos")], None),
    ([([(2, 4), (1, 2), (0, 3)], "eos")], None),
    ([([(0, 2)], "sync"), ([(1, 3)], "sync"), ([(0, 2), (0, 1)], "sync")], 3),
]


@pytest.fixture(scope="module")
def forward(model) -> Forward:
    return model_forward(model)


@pytest.fixture(scope="module")
def ref_run(model):
    graphdef, params = nnx.split(model)
    return jax.jit(lambda tokens, seg: nnx.merge(graphdef, params)(tokens, seg)[0])


_decoders: dict = {}


@pytest.fixture(scope="module")
def decoders(forward):
    """decoders(mode, batch): one compiled program per (mode, batch), shared by every test."""

    def get(mode: str, batch: int) -> Decoder:
        if (mode, batch) not in _decoders:
            # two window buckets where the no-recompilation test needs them, one elsewhere (compile time)
            buckets = (16,) if (mode, batch) == ("pd", 1) else (MAX_LEN,)
            cfg = DecodeConfig(mode=mode, max_length=MAX_LEN, batch_size=batch, buckets=buckets)
            _decoders[mode, batch] = Decoder(biased(forward, batch), eos_id=IDS.eos, ids=IDS, config=cfg)
        return _decoders[mode, batch]

    return get


def run(decoder: Decoder, prompts, tables, **options):
    """Decode with per-row bias tables (rows past the prompts get zeros)."""
    stacked = np.zeros((decoder.config.batch_size, MAX_LEN + 1, V), np.float32)
    stacked[: len(tables)] = tables
    params = (decoder.forward.params[0], stacked)
    return decoder.generate(prompts, DecodeOptions(**{**GREEDY, **options}), params=params)


GREEDY = dict(temperature=0.0, top_p=None, length_scale=1)


@pytest.mark.parametrize("dense", [False, True])
def test_pd_batch1_equals_reference(ref_run, decoders, dense):
    for prompt, (rounds, tail) in zip(PROMPTS, PLANS):
        table = bias_table(script(len(prompt), rounds, tail))
        got = run(decoders("pd", 1), [prompt], [table], dense=dense)[0]
        want, calls = Reference(ref_run, table).pd(prompt, dense=dense)
        assert got.token_ids == want
        assert got.stats.model_calls == calls
        parse_response(prompt + got.token_ids, IDS, len(prompt), allow_truncated=True)


def test_pd_batch1_structure_counts(decoders):
    prompt, (rounds, tail) = PROMPTS[2], PLANS[2]
    got = run(decoders("pd", 1), [prompt], [bias_table(script(len(prompt), rounds, tail))])[0]
    resp = parse_response(prompt + got.token_ids, IDS, len(prompt))
    assert [len(r.promises) for r in resp.rounds] == [1, 1, 2, 0]  # 3 planned rounds, then plain text
    assert [s.end - s.start - 1 for s in resp.spans] == [2, 3, 2, 1] == got.stats.span_lengths
    assert (got.stats.rounds, got.stats.groups, got.stats.spans) == (4, 3, 4)
    assert got.stats.commit_calls == 3 and got.stats.prefill_calls == 1
    assert got.stats.finish_reason == "eos"
    # steps_ratio 1: every group takes its longest span's length in steps
    assert got.stats.denoise_calls == 2 + 3 + 2


def test_dense_and_sparse_groups_differ(decoders):
    """The two attention layouts give different answers on these plans (so both checks above bite)."""
    outs = {
        dense: [run(decoders("pd", 1), [p], [bias_table(script(len(p), r, t))], dense=dense)[0].token_ids
                for p, (r, t) in zip(PROMPTS, PLANS)]
        for dense in (False, True)
    }
    assert outs[False] != outs[True]


@pytest.mark.parametrize("dense", [False, True])
def test_pd_batch3_equals_reference(ref_run, decoders, dense):
    tables = [bias_table(script(len(p), r, t)) for p, (r, t) in zip(PROMPTS, PLANS)]
    got = run(decoders("pd", 3), PROMPTS, tables, dense=dense)
    for prompt, table, result in zip(PROMPTS, tables, got):
        want, calls = Reference(ref_run, table).pd(prompt, dense=dense)
        assert result.token_ids == want
        assert result.stats.model_calls == calls


@pytest.mark.parametrize(
    "options",
    [
        dict(alg="maskgit_plus", steps_ratio=0.5),
        dict(alg="topk_margin", steps_ratio=0.34),
        dict(alg="entropy", steps_ratio=0.75, dense=True),
        dict(confidence_threshold=0.15, steps_ratio=0.5, length_scale=2),
        dict(confidence_threshold=0.25, steps_ratio=0.8, length_scale=2),
    ],
)
def test_pd_schedules_equal_reference(ref_run, decoders, options):
    """Per-span unmask counts (every alg, several steps_ratios, the threshold variant) as METHOD §4."""
    scale = options.get("length_scale", 1)
    tables = [bias_table(script(len(p), r, t, scale)) for p, (r, t) in zip(PROMPTS, PLANS)]
    got = run(decoders("pd", 3), PROMPTS, tables, **options)
    ref_options = {k: v for k, v in options.items() if k != "confidence_threshold"}
    for prompt, table, result in zip(PROMPTS, tables, got):
        want, calls = Reference(ref_run, table).pd(
            prompt, threshold=options.get("confidence_threshold"), **ref_options
        )
        assert result.token_ids == want
        assert result.stats.model_calls == calls


def _free_table(eos_at: int | None = None) -> np.ndarray:
    return bias_table({} if eos_at is None else {eos_at: IDS.eos})


# ar and diffusion: one request alone and three together, through one compiled batch-3 program
# (rows without a prompt are finished from the start); pd above has its own batch-1 program too


@pytest.mark.parametrize("batch", [1, 3])
def test_ar_equals_reference(ref_run, decoders, batch):
    # the first prompt stops at a forced <|im_end|>, the others run into max_length
    tables = [_free_table(12), _free_table(), _free_table(30)][:batch]
    prompts = PROMPTS[:batch]
    got = run(decoders("ar", 3), prompts, tables)
    for prompt, table, result in zip(prompts, tables, got):
        want, calls = Reference(ref_run, table).ar(prompt)
        assert result.token_ids == want
        assert result.stats.model_calls == calls == result.stats.tokens_generated


@pytest.mark.parametrize(("batch", "options"), [(1, {}), (3, {}), (3, dict(alg="topk_margin", steps_ratio=0.3)),
                                                (3, dict(confidence_threshold=0.25, steps_ratio=0.25)),
                                                (3, dict(max_new_tokens=17, steps_ratio=0.5))])
def test_diffusion_equals_reference(ref_run, decoders, batch, options):
    prompts = PROMPTS[:batch]
    tables = [_free_table() for _ in prompts]
    got = run(decoders("diffusion", 3), prompts, tables, **options)
    ref_options = {k: v for k, v in options.items() if k != "confidence_threshold"}
    for prompt, table, result in zip(prompts, tables, got):
        want, calls = Reference(ref_run, table).diffusion(
            prompt, threshold=options.get("confidence_threshold"), **ref_options
        )
        assert result.token_ids == want
        assert result.stats.model_calls == calls


# ---- structure: budget, no recompilation, grammar, batch independence, bad input ----------


def test_promise_longer_than_the_budget_is_shortened(ref_run, decoders):
    """Spans keep their promised length in promise order while the budget lasts (documented rule)."""
    prompt = [100, 101, 102]
    rounds = [([(0, 9), (0, 9)], "eos")]  # 2 x 18 masks at length_scale 2; only 30 slots remain
    table = bias_table(script(len(prompt), rounds, None, 2))
    got = run(decoders("pd", 1), [prompt], [table], length_scale=2)[0]
    want, calls = Reference(ref_run, table).pd(prompt, length_scale=2)
    assert got.token_ids == want and got.stats.model_calls == calls
    assert got.stats.span_lengths == [18, 12]
    assert len(prompt) + len(got.token_ids) == MAX_LEN and got.token_ids[-1] == IDS.eos
    assert got.stats.finish_reason == "eos"
    parse_response(prompt + got.token_ids, IDS, len(prompt))


def test_max_new_tokens_is_the_budget(ref_run, decoders):
    prompt = [100, 101, 102]
    rounds = [([(0, 9), (0, 9)], "eos")]
    table = bias_table(script(len(prompt), rounds, None, 2))
    got = run(decoders("pd", 1), [prompt], [table], length_scale=2, max_new_tokens=25)[0]
    want, calls = Reference(ref_run, table).pd(prompt, length_scale=2, max_new_tokens=25)
    assert got.token_ids == want and got.stats.model_calls == calls
    # limit 3 + 25 = 28; the closer at 9, 4 tags and the closer leave 14 masks, all for the first promise
    assert len(got.token_ids) == 25 and got.stats.span_lengths == [14, 0]


def test_group_whose_tags_do_not_fit_stops_after_the_plan(ref_run, decoders):
    prompt = [100, 101, 102]
    rounds = [([(0, 9)], "sync"), ([(0, 1), (0, 1)], "eos")]  # the second group has no room for its tags
    table = bias_table(script(len(prompt), rounds, None, 3))
    got = run(decoders("pd", 1), [prompt], [table], length_scale=3)[0]
    want, calls = Reference(ref_run, table).pd(prompt, length_scale=3)
    assert got.token_ids == want and got.stats.model_calls == calls
    assert got.stats.span_lengths == [27] and got.stats.finish_reason == "length"
    assert got.token_ids[-1] == IDS.promise_end  # the plan is kept, no group is laid out
    parse_response(prompt + got.token_ids, IDS, len(prompt), allow_truncated=True)


def test_no_recompilation_across_prompt_lengths(decoders):
    decoder = decoders("pd", 1)
    rounds, tail = PLANS[2]
    run(decoder, [[100, 101]], [bias_table(script(2, rounds, tail))])  # warm-up
    before = decoder.compiled_programs()
    compiles = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        lengths = [1, 2, 4, 7, 9, 12, 15, 17, 20, 26]  # prefill windows 16 and 44 both serve
        for n in lengths:
            prompt = list(range(100, 100 + n))
            result = run(decoder, [prompt], [bias_table(script(n, [([(0, 1)], "sync")], 2))])[0]
            assert result.stats.spans == 1 and result.stats.finish_reason == "eos"
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert decoder.compiled_programs() == before == 1
    assert compiles == []


def test_unscripted_plans_always_parse(decoders):
    """The plan grammar keeps sampled plans well-formed, whatever a random model proposes."""
    boost = np.zeros((3, MAX_LEN + 1, V), np.float32)
    boost[:, :, [IDS.promise_start, IDS.promise_end, IDS.sync]] = 6.0  # frequent plans
    boost[:, :, DIGITS] = 1.0
    decoder = decoders("pd", 3)
    params = (decoder.forward.params[0], boost)
    spans = 0
    for seed in range(4):
        options = DecodeOptions(temperature=1.0, top_p=None, length_scale=1, seed=seed)
        for prompt, result in zip(PROMPTS, decoder.generate(PROMPTS, options, params=params)):
            tokens = prompt + result.token_ids
            if result.stats.finish_reason == "length" and IDS.promise_start in tokens:
                last = len(tokens) - 1 - tokens[::-1].index(IDS.promise_start)
                if IDS.promise_end not in tokens[last:]:  # the budget ran out inside a promise
                    tokens = tokens[:last]
            resp = parse_response(tokens, IDS, len(prompt), allow_truncated=True)
            assert len(resp.spans) == result.stats.spans
            spans += result.stats.spans
    assert spans > 0


def test_sampled_results_do_not_depend_on_the_batch(decoders):
    tables = [bias_table(script(len(p), r, t)) for p, (r, t) in zip(PROMPTS, PLANS)]
    options = dict(temperature=0.8, top_p=0.9, top_k=20, seed=7)
    batch = run(decoders("pd", 3), PROMPTS, tables, **options)
    alone = run(decoders("pd", 1), PROMPTS[1:2], tables[1:2], **options)[0]
    assert batch[1].token_ids == alone.token_ids
    other_seed = run(decoders("pd", 1), PROMPTS[1:2], tables[1:2], **{**options, "seed": 8})[0]
    assert other_seed.token_ids != alone.token_ids


def test_bad_input_is_a_clear_error(forward, decoders):
    decoder = decoders("pd", 1)
    with pytest.raises(DecodeInputError, match="empty"):
        decoder.generate([[]])
    with pytest.raises(DecodeInputError, match="max_length 44"):
        decoder.generate([list(range(100, 100 + MAX_LEN))])
    with pytest.raises(DecodeInputError, match="outside the vocabulary"):
        decoder.generate([[V + 5]])
    with pytest.raises(DecodeInputError, match="control token ids"):
        Decoder(forward, eos_id=IDS.eos, ids=None, config=DecodeConfig(mode="pd", max_length=MAX_LEN))
    with pytest.raises(ValueError, match="unknown alg"):
        DecodeOptions(alg="origin")


def test_profiling_times_each_kind_of_call(decoders, forward):
    """Opt-in host callbacks: phase times that add up to at most the wall time (ar: prefill and plan)."""
    config = DecodeConfig(mode="ar", max_length=MAX_LEN, buckets=(MAX_LEN,), profile=True)
    decoder = Decoder(biased(forward, 1), eos_id=IDS.eos, ids=None, config=config)
    result = run(decoder, [PROMPTS[0]], [_free_table(20)])[0]
    times = result.stats.phase_time_s
    assert times["prefill"] > 0 and times["plan"] > 0 and times["denoise"] == times["commit"] == 0
    assert sum(times.values()) <= result.stats.wall_time_s
    assert result.stats.model_calls == 18 == len(result.token_ids) and result.token_ids[-1] == IDS.eos  # eos at 20


def test_the_decoder_lowers_for_tpu(decoders):
    """The whole batched program (while_loop, switch over windows, sampling) exports for TPU."""
    assert "while" in decoders("pd", 3).export(["tpu"]).mlir_module()
