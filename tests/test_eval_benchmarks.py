"""benchmarks/gpu_dream7b.py on CPU: the forced METHOD §5 workload, the bandwidth arithmetic, the refusal.

Timings need a GPU; here the parts that decide what is measured are checked:
the workload's statistics, that the forced plans parse (pdjax.structure's
parser) and that the decoder follows them on a tiny model, the byte counts
against parameter counts written out by hand, and the exit status without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdjax.decode import model_forward
from pdjax.decode.forward import full_logits
from pdjax.model import DreamConfig, DreamModel
from pdjax.structure import Segments, parse_response
from structures import IDS

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_dream7b.py"
spec = importlib.util.spec_from_file_location("gpu_dream7b", PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["gpu_dream7b"] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)

TINY_VOCAB = bench.Vocab(IDS, topic=100, text=101, prompt_base=110)


@pytest.mark.parametrize("n, seed", [(10, 0), (30, 5)])
def test_workload_has_the_papers_first_round_statistics(n, seed):
    reqs = bench.paper_workload(n, seed)
    spans = [len(r.numbers) for r in reqs]
    assert len(reqs) == n and statistics.median(spans) == 2 and math.isclose(statistics.fmean(spans), 3.1)
    assert sum(r.sync for r in reqs) == 0.6 * n
    lengths = [k * bench.LENGTH_SCALE for r in reqs for k in r.numbers]
    assert min(lengths) >= 10 and max(lengths) <= 200 and len(set(lengths)) > 5


def test_workload_needs_a_multiple_of_ten():
    with pytest.raises(ValueError):
        bench.paper_workload(7)


def test_expected_responses_parse_as_the_plan_says():
    vocab = bench.dream_vocab()
    for req in bench.paper_workload(10, 1):
        toks = bench.expected_response(req, vocab)
        parsed = parse_response(toks, vocab.ids, allow_masks=True)
        assert [p.number for p in parsed.promises] == list(req.numbers)
        assert [s.end - s.start - 1 for s in parsed.spans] == [10 * k for k in req.numbers]
        assert len(parsed.rounds) == (2 if req.sync else 1)


def layer_params(d, f, heads, kv, hd):
    """One Qwen2 layer by hand: q/k/v with biases, o, gate/up/down, two RMSNorm weights."""
    return (d * heads * hd + heads * hd) + 2 * (d * kv * hd + kv * hd) + heads * hd * d + 3 * d * f + 2 * d


@pytest.mark.parametrize("preset", ["tiny", "dream_7b"])
def test_ar_step_bytes_against_a_hand_count(preset):
    config = getattr(DreamConfig, preset)(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    d, v = config.hidden_size, config.vocab_size
    layers = config.num_layers * layer_params(d, config.intermediate_size, config.num_heads, config.num_kv_heads,
                                              config.head_dim)
    # read per AR step: the layers, the final norm, the untied head, one embedding row; 2 bytes each
    assert bench.ar_step_weight_bytes(config) == 2 * (layers + d + v * d + d)
    assert bench.kv_bytes(config, 100) == 2 * config.num_layers * 100 * config.num_kv_heads * config.head_dim * 2
    if preset == "tiny":  # the hand count is the model's real size
        abstract = nnx.eval_shape(lambda: DreamModel(config, rngs=nnx.Rngs(0)))
        total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert total == layers + d + 2 * v * d


def test_bandwidth_fraction_and_peaks():
    assert bench.bandwidth_fraction(15e9, 5e-3, 4e12) == pytest.approx(0.75)
    assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.peak_bandwidth("some new GPU") is None
    assert bench.peak_bandwidth("some new GPU", override_tbs=2.5) == 2.5e12


def test_refuses_without_a_gpu(capsys):
    assert bench.main([]) == bench.SKIPPED == 77
    assert "no GPU" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_forward():
    return model_forward(DreamModel(DreamConfig.tiny(vocab_size=160), rngs=nnx.Rngs(0)))


def test_forced_requests_decode_as_planned(tiny_forward):
    reqs = [bench.Request((3, 12), True), bench.Request((1,), False), bench.Request((2, 5, 1), True)]
    rows = bench.run_requests(tiny_forward, reqs, TINY_VOCAB, 64, length_scale=1, prompt_len=6, modes=("pd",))
    for req, row in zip(reqs, rows):  # run_requests itself checks every forced token of the response
        pd = row["pd"]
        assert pd["tokens"] == len(bench.expected_response(req, TINY_VOCAB, length_scale=1)) and pd["finish"] == "eos"
        plan = len(bench.plan_tokens(req.numbers, TINY_VOCAB))
        # prefill + plan steps: the plan and its closer; max(numbers) denoising steps (steps_ratio 1, length_scale 1);
        # after a <sync/>: the commit gives the tail's first token, then one step per further tail token and eos
        after_sync = bench.TAIL_TOKENS + 1 if req.sync else 0
        assert pd["calls"] == plan + 1 + max(req.numbers) + after_sync


def test_ar_forcing_ends_at_the_given_length_and_bans_eos_before(tiny_forward):
    size, prompt_len, tokens = 24, 5, 9
    fwd = bench.forced(tiny_forward, IDS.eos, size)
    table = bench.ar_forcing(prompt_len, tokens, IDS.eos, size)
    seq = np.arange(1, size, dtype=np.int32)[None] % 40 + 70
    pos = np.arange(seq.shape[1], dtype=np.int32)[None]
    causal = Segments(0 * pos, pos, pos, 1 + 0 * pos, 1 + 0 * pos)  # plain text, every token visible from itself
    params = (tiny_forward.params, jnp.asarray(table[None]))
    logits, _ = jax.jit(lambda p, t, s: full_logits(fwd, p, t, s))(params, seq, causal)
    logits = np.asarray(logits[0])
    last = prompt_len + tokens - 1  # the position of the last response token, predicted at last - 1
    assert np.isneginf(np.delete(logits[last - 1], IDS.eos)).all() and logits[last - 1, IDS.eos] == 0
    others = [p for p in range(seq.shape[1]) if p != last - 1]
    assert np.isneginf(logits[others, IDS.eos]).all() and np.isfinite(np.delete(logits[others], IDS.eos, 1)).all()


def test_single_call_timings_run(tiny_forward):
    out = bench.single_call_timings(tiny_forward, 1, prefix=8, sizes=(8,))
    assert set(out) == {"ar_step", "denoise_8", "commit_8"} and all(t > 0 for t in out.values())
