"""Weight-only int8/int4 quantization of a DreamModel with qwix: per-output-channel scales, matmuls that read them.

Each projection (q/k/v/o, gate/up/down), the embedding and the LM head becomes a `qwix.QArray`: int8 or int4
values with one float32 scale per output channel, per layer (the stacked layer axis keeps its own scales, so
`lax.scan` slices values and scales alike). The axes a weight is contracted over in the model's matmuls share
a scale; every other axis is channelwise. The model's matmuls go through `einsum`, which hands a QArray to
`qwix.einsum` (XLA fuses its dequantization into the matmul) and a plain array to `jnp.einsum`, so unquantized
models compute exactly what they did. Norms and biases stay in float.

A checkpoint is quantized while it is read (`load_weight`): a weight is read a slice of its first axis (a
layer, or a block of vocabulary rows) at a time, quantized, and written into an int8/int4 host block, so the
host holds one float slice beside the quantized weight, never the float model.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from pdjax.cli_errors import UserError

QTYPES: dict[str, Any] = {"int8": jnp.int8, "int4": jnp.int4}
QUANTIZE_CHOICES = tuple(QTYPES)
SCALE_DTYPE = jnp.float32  # scales are cast to the compute dtype where a matmul reads them
# Axes each quantized parameter is contracted over in the model's matmuls (pdjax layouts, layer axis first);
# the other axes are channelwise. embed_tokens' rows are also what the embedding lookup reads.
CONTRACTED: dict[tuple[str, ...], tuple[int, ...]] = {
    ("embed_tokens",): (1,),
    ("lm_head",): (1,),
    ("layers", "q_proj"): (3,),
    ("layers", "k_proj"): (3,),
    ("layers", "v_proj"): (3,),
    ("layers", "o_proj"): (2, 3),
    ("layers", "gate_proj"): (2,),
    ("layers", "up_proj"): (2,),
    ("layers", "down_proj"): (2,),
}
READ_BYTES = 64 * 2**20  # float32 bytes of one slice read and quantized at a time while loading (one layer at least)


class QuantizeError(UserError, ValueError):
    """A quantization that cannot be done: an unknown type, or weights that are already quantized."""


def qtype_of(name: str) -> Any:
    """The qwix value type of a ``--quantize`` name (int8, int4); `QuantizeError` for any other."""
    if name not in QTYPES:
        raise QuantizeError(f"--quantize {name!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    return QTYPES[name]


def quantize_array(array: Any, qtype: str, contracted: tuple[int, ...]) -> qwix.QArray:
    """`array` as a QArray: absmax scales (float32) shared over the `contracted` axes, one per other index."""
    x = jnp.asarray(array, jnp.float32)  # quantize from float32: bf16 division would round x / scale twice
    channelwise = tuple(a for a in range(x.ndim) if a not in contracted)
    return qwix.quantize(x, qtype_of(qtype), channelwise_axes=channelwise)


def einsum(spec: str, x: jax.Array, w: Any, **kwargs: Any) -> jax.Array:
    """``jnp.einsum(spec, x, w)``; a quantized `w` (QArray) goes through `qwix.einsum`."""
    if isinstance(w, qwix.QArray):
        return qwix.einsum(spec, x, w, **kwargs)
    return jnp.einsum(spec, x, w, **kwargs)


def take_rows(table: Any, ids: jax.Array) -> jax.Array:
    """``table[ids]`` (an embedding lookup); a quantized table's rows are taken with their scales, then dequantized."""
    if isinstance(table, qwix.QArray):
        if ids.size == 1:  # TPU's XLA gathers one int8 row by relayouting the whole table (1.1 GB per Dream-7B
            # AR step at batch 1, per its cost analysis); two rows it gathers in place
            two = jnp.concatenate([ids.reshape(-1)] * 2)
            return qwix.dequantize(table[two])[:1].reshape(*ids.shape, -1)
        return qwix.dequantize(table[ids])
    return jnp.take(table, ids, axis=0)


def quantize_model(model: Any, qtype: str) -> Any:
    """A copy of a DreamModel whose projections, embedding and head are QArrays (`CONTRACTED`); `model` is unchanged.

    `QuantizeError` if the model is already quantized. Under `nnx.eval_shape` it gives the abstract quantized
    model (the shapes and dtypes a loaded one has), which is how `pdjax.aot` compiles without weights.
    """
    qtype_of(qtype)
    if weight_format(model) in QTYPES:
        raise QuantizeError(f"the model's weights are already quantized ({weight_format(model)})")
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, contracted in CONTRACTED.items():
        if path in flat:  # new variables: `model` itself keeps its float weights
            flat[path] = flat[path].replace(quantize_array(flat[path].get_value(), qtype, contracted))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def weight_format(model_or_params: Any) -> str:
    """What the weights are: ``int8`` / ``int4`` when quantized, else the float dtype's name (``bfloat16``)."""
    tree = nnx.state(model_or_params) if isinstance(model_or_params, nnx.Module) else model_or_params
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, qwix.QArray))
    for leaf in leaves:
        if isinstance(leaf, qwix.QArray):
            return jnp.dtype(leaf.qtype).name
    floats = [leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return jnp.dtype(floats[0]).name if floats else "none"


def weight_bytes(shapes: dict[tuple[str, ...], tuple[int, ...]], qtype: str | None, float_bytes: float) -> int:
    """Bytes of a model's parameters (`shapes`: path -> shape) quantized to `qtype` (None: all float): values at
    8 or 4 bits plus float32 scales for the `CONTRACTED` parameters, `float_bytes` per value for the others."""
    bits = {"int8": 8, "int4": 4}.get(qtype or "", 0)
    total = 0.0
    for path, shape in shapes.items():
        n = math.prod(shape)
        if not bits or path not in CONTRACTED:
            total += n * float_bytes
        else:
            scales = math.prod(d for a, d in enumerate(shape) if a not in CONTRACTED[path])
            total += n * bits / 8 + scales * np.dtype(SCALE_DTYPE).itemsize
    return int(total)


def check_float_checkpoint(path: str, dtypes: dict[str, str]) -> None:
    """`QuantizeError` in one line when a folder's weights are already quantized: config.json's
    ``quantization_config`` (GPTQ, AWQ, bitsandbytes, ...) or integer tensors (`dtypes`: name -> safetensors dtype)."""
    config = os.path.join(path, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        raw = {}
    method = (raw.get("quantization_config") or {}) if isinstance(raw, dict) else {}
    if method:
        kind = method.get("quant_method", "quantized") if isinstance(method, dict) else "quantized"
        raise QuantizeError(f"{path}: config.json says its weights are already quantized ({kind}); --quantize "
                            "quantizes a float (bfloat16/float32) checkpoint")
    ints = sorted(n for n, d in dtypes.items() if not d.upper().startswith(("F", "BF")))
    if ints:
        raise QuantizeError(f"{path}: tensors {ints[:3]} are stored as {dtypes[ints[0]]}, not float: these weights "
                            "are already quantized; --quantize quantizes a float (bfloat16/float32) checkpoint")


# ---- loading --------------------------------------------------------------------------------------------------


Box = tuple[tuple[int, int], ...]


def scale_sharding(sharding: jax.sharding.Sharding, contracted: tuple[int, ...], ndim: int) -> jax.sharding.Sharding:
    """A scale's placement: the values' sharding with the contracted axes (size 1 in a scale) unsplit."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    spec = [None if a in contracted else s for a, s in enumerate(spec)]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def load_weight(read: Callable[[Box], np.ndarray], shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                path: tuple[str, ...], qtype: str,
                place: Callable[[Callable[[Box], np.ndarray], tuple[int, ...], Any], jax.Array]) -> qwix.QArray:
    """One parameter read from a checkpoint and quantized on the way, as a QArray placed like `sharding`.

    ``read(box)`` returns the float32 block `box` (a (start, stop) range per axis) of the parameter;
    ``place(read, shape, sharding)`` builds a global array from such blocks, one device shard at a time
    (`pdjax.model.checkpoint`'s loader). The values' shards are quantized from slices of the first axis
    read over the whole contracted extent (the scales need all of it), at most `READ_BYTES` of float32 each.
    """
    contracted = CONTRACTED[path]
    qt = qtype_of(qtype)
    scale_shape = tuple(1 if a in contracted else n for a, n in enumerate(shape))
    scales = np.zeros(scale_shape, np.float32)  # small: one per output channel; filled as values are read
    quantize = jax.jit(lambda x: quantize_array(x, qtype, contracted))
    cpu = jax.local_devices(backend="cpu")[0]
    row_bytes = math.prod(shape[1:]) * 4
    rows = max(1, READ_BYTES // row_bytes)

    def values(box: Box) -> np.ndarray:
        full = tuple((0, n) if a in contracted else box[a] for a, n in enumerate(shape))
        out = np.empty(tuple(b - a for a, b in box), np.dtype(qt))
        inner = tuple(slice(box[a][0], box[a][1]) if a in contracted else slice(None) for a in range(1, len(shape)))
        (r0, r1) = box[0]
        for start in range(r0, r1, rows):
            stop = min(start + rows, r1)
            with jax.default_device(cpu):  # host work: the accelerator holds only quantized weights
                q = quantize(read(((start, stop),) + full[1:]))
            out[start - r0 : stop - r0] = np.asarray(q.qvalue)[(slice(None),) + inner]
            where = ((slice(start, stop),) + tuple(slice(0, 1) if a in contracted else slice(*full[a])
                                                  for a in range(1, len(shape))))
            scales[where] = np.asarray(q.scale)
        return out

    qvalue = place(values, shape, sharding)  # fills `scales` for every box this process holds
    scale = place(lambda box: scales[tuple(slice(a, b) for a, b in box)], scale_shape,
                  scale_sharding(sharding, contracted, len(shape)))
    return qwix.QArray(qvalue, scale, qtype=qt)
