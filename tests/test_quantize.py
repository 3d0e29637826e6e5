"""Weight-only int8/int4 quantization (`pdjax.model.quantize`, qwix): the scheme against NumPy, the quantized
model against a float model holding NumPy-dequantized weights, the streamed loader, the memory figures, and the
--quantize flag of pdjax.decode, pdjax.eval, pdjax.serve and pdjax.aot with their one-line errors.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdjax.model import DreamConfig, DreamModel, load_pretrained, save_pretrained
from pdjax.model import quantize as quantizer
from pdjax.structure import Segments

SHIPPED = Path(__file__).resolve().parent.parent / "pdjax" / "assets" / "default_model"
BOUND = {"int8": (127, -128, 127), "int4": (7, -8, 7)}  # qmax (scale = absmax / (qmax + 0.5)), clip range
# Stated tolerances: the relative RMS error of a random Dream-shaped model's logits, quantized vs float.
LOGIT_RMS_TOLERANCE = {"int8": 0.02, "int4": 0.25}


@pytest.fixture(autouse=True)
def private_compilation_cache(tmp_path_factory, monkeypatch):
    """Keep the persistent compilation cache the CLIs turn on out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))


def numpy_quantize(w: np.ndarray, qtype: str, contracted: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax quantization in NumPy: one scale per index of the non-contracted axes."""
    qmax, low, high = BOUND[qtype]
    scale = np.abs(w).max(axis=contracted, keepdims=True) / np.float32(qmax + 0.5)
    return np.clip(np.round(w / scale), low, high).astype(np.int32), scale


def random_model(seed: int = 0) -> DreamModel:
    """A random float32 Dream-shaped model (GQA, biases, untied head) with non-zero norms and biases."""
    model = DreamModel(DreamConfig.tiny(dtype=jnp.float32, param_dtype=jnp.float32), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1].endswith(("norm", "bias")):
            var.set_value(jnp.asarray(1.0 + 0.1 * rng.standard_normal(var.get_value().shape), jnp.float32))
    return model


def causal_batch(batch: int = 2, length: int = 24, vocab: int = 1024) -> tuple[jax.Array, Segments]:
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return tokens, Segments(jnp.zeros_like(pos), pos, pos, jnp.ones_like(pos), jnp.ones_like(pos))


def flat_params(model: DreamModel) -> dict:
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_qwix_quantization_is_symmetric_absmax_per_output_channel(qtype):
    model = random_model()
    params = flat_params(quantizer.quantize_model(model, qtype))
    for path, w in flat_params(model).items():
        q = params[path]
        if path not in quantizer.CONTRACTED:
            assert not isinstance(q, quantizer.qwix.QArray) and np.array_equal(q, w)  # norms, biases: float
            continue
        w = np.asarray(w)
        values, scale = numpy_quantize(w, qtype, quantizer.CONTRACTED[path])
        assert q.qvalue.dtype == jnp.dtype(qtype) and q.scale.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=3e-7, err_msg=str(path))  # XLA's division: an ulp
        got = np.asarray(q.qvalue).astype(np.int32)
        # w / scale within an ulp of a half (a channel's absmax entry lands on +-(qmax + 0.5)) may round either way
        edge = np.abs(np.abs(w / scale) % 1 - 0.5) < 1e-4
        np.testing.assert_array_equal(np.where(edge, 0, got), np.where(edge, 0, values), err_msg=str(path))
        assert np.abs(got - values).max() <= 1 and edge.mean() < 0.02


def test_a_projection_equals_numpy_dequantize_then_matmul():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 96, 64)).astype(np.float32)  # [layers, out, in], as gate_proj
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    q = quantizer.quantize_array(w, "int8", (2,))
    values, scale = np.asarray(q.qvalue).astype(np.float64), np.asarray(q.scale)  # qwix's values, NumPy's math
    want = np.einsum("btd,fd->btf", x, (values * scale)[1])
    got = quantizer.einsum("btd,fd->btf", jnp.asarray(x), jax.tree.map(lambda a: a[1], q))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    table = jax.tree.map(lambda a: a[0], q)
    for rows in ([[0, 95, 7]], [[95]]):  # one row takes its own path (see take_rows)
        got = np.asarray(quantizer.take_rows(table, jnp.asarray(rows)))
        assert got.shape == (1, len(rows[0]), 64)
        np.testing.assert_allclose(got, (values * scale)[0][rows], rtol=1e-6)


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_quantized_logits_equal_a_float_model_with_numpy_dequantized_weights(qtype):
    """The quantized model (qwix einsum, row lookup, head) computes what the float model computes with every
    weight replaced by its values * scales dequantized in NumPy; and it stays within the stated tolerance of the
    float model."""
    model = random_model()
    tokens, seg = causal_batch()
    quantized = quantizer.quantize_model(model, qtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    qparams = flat_params(quantized)
    for path in quantizer.CONTRACTED:  # dequantized in NumPy from the QArray's values and scales
        q = qparams[path]
        flat[path] = flat[path].replace(jnp.asarray(np.asarray(q.qvalue).astype(np.float64) * np.asarray(q.scale),
                                                    jnp.float32))
    dequantized = nnx.merge(graphdef, nnx.from_flat_state(flat))
    got, _ = quantized(tokens, seg)
    want, _ = dequantized(tokens, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    exact, _ = model(tokens, seg)
    rms = float(jnp.sqrt(jnp.mean((got - exact) ** 2)) / jnp.sqrt(jnp.mean(exact**2)))
    assert 0 < rms < LOGIT_RMS_TOLERANCE[qtype], rms
    assert quantizer.weight_format(model) == "float32" and quantizer.weight_format(quantized) == qtype


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("random_dream"))
    save_pretrained(random_model(seed=3), path, dtype=jnp.bfloat16)
    return path


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_loading_quantizes_slice_by_slice_and_equals_quantizing_the_loaded_model(saved_model, qtype, monkeypatch):
    float_model = load_pretrained(saved_model, dtype="float32", param_dtype="float32")
    want = flat_params(quantizer.quantize_model(float_model, qtype))
    reads: list[int] = []
    real = quantizer.load_weight

    def spy(read, *args, **kwargs):
        def counted(box):
            block = read(box)
            reads.append(block.nbytes)
            return block
        return real(counted, *args, **kwargs)

    limit = 64 * 1024  # the embedding and the head [1024, 64]: 4 slices of 256 rows each
    monkeypatch.setattr(quantizer, "READ_BYTES", limit)
    monkeypatch.setattr(quantizer, "load_weight", spy)
    got = flat_params(load_pretrained(saved_model, dtype="float32", param_dtype="float32", quantize=qtype))
    assert max(reads) <= limit  # a slice of float32, never a whole weight
    shapes = {path: want[path].shape for path in quantizer.CONTRACTED}
    assert len(reads) == sum(math.ceil(s[0] / (limit // (math.prod(s[1:]) * 4))) for s in shapes.values()) == 15
    for path, w in want.items():
        leaves = jax.tree.leaves(w)
        for a, b in zip(leaves, jax.tree.leaves(got[path])):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


def test_weight_bytes_are_the_quantized_arrays_bytes():
    model = quantizer.quantize_model(random_model(), "int8")
    real = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    c = model.config
    from pdjax.memory import serving_memory

    for qtype, float_bytes in ((None, 4), ("int8", 4), ("int4", 2)):
        weights = dict(serving_memory(c, batch=1, max_length=64, weight_bytes=float_bytes, quantize=qtype).terms)
        term = weights[f"weights ({qtype})" if qtype else "weights"]
        if qtype is None:
            assert term == c.num_params * 4
        elif qtype == "int8":
            assert term == real
        else:  # half a byte a value; norms and biases at 2 bytes
            scales = sum(leaf.scale.size for leaf in jax.tree.leaves(
                nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, quantizer.qwix.QArray))
                if isinstance(leaf, quantizer.qwix.QArray))
            quantized = sum(math.prod(leaf.shape) for path, leaf in flat_params(random_model()).items()
                            if path in quantizer.CONTRACTED)
            assert term == quantized / 2 + scales * 4 + (c.num_params - quantized) * 2


def test_already_quantized_weights_are_one_line_errors(saved_model, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(saved_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(quantizer.QuantizeError, match="already quantized \\(gptq\\)"):
        load_pretrained(str(folder), quantize="int8")
    with pytest.raises(quantizer.QuantizeError, match="stored as I8"):
        quantizer.check_float_checkpoint(saved_model, {"model.norm.weight": "BF16", "lm_head.weight": "I8"})
    with pytest.raises(quantizer.QuantizeError, match="choose one of int8, int4"):
        load_pretrained(saved_model, quantize="fp8")
    quantized = quantizer.quantize_model(random_model(), "int8")
    with pytest.raises(quantizer.QuantizeError, match="already quantized"):
        quantizer.quantize_model(quantized, "int4")
    with pytest.raises(quantizer.QuantizeError, match="not saved"):
        save_pretrained(quantized, str(tmp_path / "out"))


# ---- the flag in the commands ---------------------------------------------------------------------------


def test_decode_flag_answers_with_the_shipped_model_and_says_int8(capsys):
    from pdjax.decode.cli import QUANTIZE_CHOICES, main

    assert QUANTIZE_CHOICES == quantizer.QUANTIZE_CHOICES
    prompt = json.loads((SHIPPED / "ar" / "heldout.jsonl").read_text().splitlines()[0])["prompt"]
    argv = ["--mode", "ar", "--prompt", prompt, "--temperature", "0", "--max_length", "160", "--json"]
    assert main([*argv, "--quantize", "int8"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["weights"] == "int8" and record["text"].strip() and record["finish_reason"] == "eos"
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["weights"] == "bfloat16"


@pytest.mark.parametrize("command", [["pdjax.decode", "--prompt", "hi"], ["pdjax.serve"],
                                     ["pdjax.eval", "generate", "--output", "x.json"],
                                     ["pdjax.aot", "decode", "--model", "tiny", "--topology", "v5litepod-1"]])
def test_unknown_quantize_values_are_one_line_errors(command, capsys):
    import importlib

    module = importlib.import_module(command[0] + ".cli")
    assert module.main([*command[1:], "--quantize", "int16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --quantize: invalid choice: 'int16'" in err[-1] and "Traceback" not in "\n".join(err)


def test_decode_of_an_already_quantized_folder_is_one_line(tmp_path, capsys):
    from pdjax.decode.cli import main

    folder = tmp_path / "awq"
    shutil.copytree(SHIPPED / "ar", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    assert main(["--mode", "ar", "--model", str(folder), "--prompt", "hi", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the status line ("loading ..."), then the error
    assert err[-1].startswith("pdjax.decode: error: ") and "already quantized (awq)" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_eval_generate_names_and_records_the_quantization(tmp_path, capsys):
    from pdjax.eval.cli import main

    prompts = tmp_path / "prompts.jsonl"
    rows = (SHIPPED / "ar" / "heldout.jsonl").read_text().splitlines()[:2]
    prompts.write_text("".join(json.dumps({"instruction": json.loads(r)["prompt"]}) + "\n" for r in rows))
    out = tmp_path / "ar.json"
    assert main(["generate", "--mode", "ar", "--prompts", str(prompts), "--output", str(out), "--max_length", "160",
                 "--temperature", "0", "--quantize", "int8"]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 2 and {r["generator"] for r in records} == {"pdjax-default-ar-int8"}
    run = json.loads(next((tmp_path / "ar.json.parts").glob("run.json")).read_text())
    assert run["settings"]["quantize"] == "int8"


def test_served_model_card_says_the_weights():
    from pdjax.decode import DecodeConfig, Decoder
    from pdjax.model.tokenizer import load_tokenizer
    from pdjax.serve import Engine
    from pdjax.serve.app import create_app

    path = str(SHIPPED / "ar")
    tokenizer = load_tokenizer(path)
    for qtype, weights in ((None, "bfloat16"), ("int4", "int4")):
        decoder = Decoder.from_model(load_pretrained(path, quantize=qtype), eos_id=tokenizer.convert_tokens_to_ids(
            "<|im_end|>"), config=DecodeConfig(mode="ar", max_length=64, batch_size=1))
        app = create_app(Engine(decoder), tokenizer, model_name="m")
        route = next(r for r in app.routes if getattr(r, "path", "") == "/v1/models")
        card = asyncio.run(route.endpoint())["data"][0]
        assert card["id"] == "m" and card["weights"] == weights


def test_aot_compiles_the_quantized_weights_it_would_load():
    """The abstract quantized decoder `pdjax.aot` compiles takes the arrays the loader makes (same tree, shapes
    and dtypes), and the program's arguments are the int8 weights' bytes plus the float model's other inputs."""
    from pdjax.aot.programs import ModelSpec, abstract_forward, decode_program
    from pdjax.decode.forward import model_forward

    config = DreamConfig.tiny()
    device = jax.devices()[0]
    abstract = abstract_forward(config, jax.sharding.SingleDeviceSharding(device), "int8").params
    real = model_forward(quantizer.quantize_model(DreamModel(config, rngs=nnx.Rngs(0)), "int8")).params
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)  # noqa: E731
    assert jax.tree.structure(abstract) == jax.tree.structure(real) and shapes(abstract) == shapes(real)
    spec = ModelSpec(config, None, 5, "tiny")  # mode ar: an eos id is all it needs
    args = {}
    for qtype in (None, "int8"):
        lowered, estimate = decode_program(spec, device, mode="ar", batch_size=1, max_length=64, buckets=(64,),
                                           quantize=qtype)
        args[qtype] = lowered.compile().memory_analysis().argument_size_in_bytes
        weights = dict(estimate.terms)["weights (int8)" if qtype else "weights"]
        args[qtype] -= weights
    assert args[None] == args["int8"]  # the rest of the inputs (tokens, knobs) are the same


@pytest.mark.slow
def test_dream_7b_int8_decoders_fit_one_v5e_chip():
    """Compiled for a v5e chip (16 GB) by libtpu, in one child process for the three modes (minutes each)."""
    import subprocess
    import sys
    import textwrap

    from pdjax.aot import topology

    if not topology.libtpu_available():
        pytest.skip("libtpu not installed (pip install -e '.[test]')")
    code = textwrap.dedent("""
        import json
        from pdjax.aot import programs, topology
        from pdjax.aot.report import compile_lowered
        target, device = topology.target("v5litepod-1"), topology.devices("v5litepod-1")[0]
        spec = programs.resolve_model("dream_7b")
        for mode in ("pd", "ar", "diffusion"):
            lowered, estimate = programs.decode_program(spec, device, mode=mode, batch_size=8, max_length=2048,
                                                        buckets=(2048,), quantize="int8")
            print(json.dumps(compile_lowered(lowered, mode, target, estimate).to_json()), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, env=topology.compile_environment(), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)  # the three reports, for `pytest -s`
    reports = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["what"] for r in reports] == ["pd", "ar", "diffusion"]
    for r in reports:
        terms = r["estimate_terms"]
        assert r["fits"] and r["total_bytes"] <= 14 * 2**30, r
        # the arguments are the int8 weights (+ the caches and inputs), not a float copy
        assert r["terms"]["arguments"] <= terms["weights (int8)"] + terms["KV cache"] + 2**30, r


def test_the_decode_notebook_loads_the_released_model_as_int8_on_a_16_gb_chip():
    """Its ``QUANTIZE = "auto"`` choice (cell code compiled on its own), and that the choice reaches the loader, the
    memory estimate and the compiled-memory check."""
    import ast

    import nbformat

    nb = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "decode.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    node = next(n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef) and n.name == "choose_quantize")
    namespace: dict = {}
    exec(compile(ast.Module([node], []), "decode.ipynb", "exec"), namespace)
    choose = namespace["choose_quantize"]
    assert choose("auto", "released", 15.75 * 2**30) == "int8"  # a v5e chip's bytes_limit
    assert choose("auto", "released", 31.25 * 2**30) is None  # a v6e chip keeps bfloat16
    assert choose("auto", "default", 15.75 * 2**30) is None and choose("auto", "released", None) is None
    assert choose(None, "released", 15.75 * 2**30) is None and choose("int4", "default", None) == "int4"
    assert 'QUANTIZE = "auto"' in code
    for use in ("quantize=quantize)", "widest_call=max_length, quantize=quantize", "buckets=BUCKETS, quantize=quantize"):
        assert use in code, use
