"""Hugging Face checkpoint I/O: safetensors (single file or sharded with an index) <-> a sharded DreamModel.

Loading streams tensor by tensor straight into the target sharding: for each
parameter, each distinct device shard is read from the files with safetensors
`get_slice` (only the bytes of that shard), put on its devices, and dropped. The
host never holds the model, a whole stacked parameter of a sharded model, nor a
replicated copy. Saving writes the Qwen2 tensor names (so transformers and the
released PyTorch code load the result), one shard file at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from pdjax.cli_errors import UserError
from pdjax.model import quantize as quantizer
from pdjax.model.config import DreamConfig
from pdjax.model.sharding import Rules, state_shardings
from pdjax.model.transformer import DreamModel, layer_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# pdjax stacked layer parameter -> Qwen2 tensor name suffix under model.layers.{i}.
LAYER_NAMES: dict[str, str] = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_proj": "self_attn.k_proj.weight",
    "k_bias": "self_attn.k_proj.bias",
    "v_proj": "self_attn.v_proj.weight",
    "v_bias": "self_attn.v_proj.bias",
    "o_proj": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}


class CheckpointError(UserError, ValueError):
    """A model folder that cannot be loaded: not a model folder, unreadable files, or tensors that do not match."""


def orbax_checkpoint(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """(checkpoint.dir, step or None) when `path` is an orbax training checkpoint (its folder or one step), else None."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    names = set(os.listdir(path))
    if names & {"_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt"}:
        step_dir = os.path.abspath(path)
        parent = os.path.dirname(step_dir)
        if "_CHECKPOINT_METADATA" not in names and os.path.exists(os.path.join(parent, "_CHECKPOINT_METADATA")):
            step_dir = parent  # an item folder (state/) of a step
        step = os.path.basename(step_dir)
        return os.path.dirname(step_dir), step if step.isdigit() else None
    if any(n.isdigit() and os.path.exists(os.path.join(path, n, "_CHECKPOINT_METADATA")) for n in names):
        return os.path.abspath(path), None
    return None


def check_model_folder(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` in one line unless `path` looks like a loadable HF model folder.

    An orbax training checkpoint gets the command that exports it; a missing or
    non-JSON config.json and missing weights are named.
    """
    path = os.fspath(path)
    orbax = orbax_checkpoint(path)
    if orbax is not None:
        root, step = orbax
        raise CheckpointError(
            f"{path} is an orbax training checkpoint, not a model folder: export it as a Hugging Face folder with "
            f"`python -m pdjax.train --config CONFIG checkpoint.dir={root} --export DIR"
            + (f" --step {step}" if step else "")
            + "` (CONFIG: the training config) and pass that DIR"
        )
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such model folder")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a folder (a model folder holds config.json and model.safetensors)")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise CheckpointError(f"{path}: no config.json (a model folder holds config.json and model.safetensors)")
    try:
        with open(config, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CheckpointError(f"{config}: not a JSON file{where}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{config}: must hold a JSON object, not {type(value).__name__}")
    _checkpoint_files(path)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one pdjax parameter is stored in HF tensors.

    ``hf_names`` has one name per layer for a stacked parameter (``stacked``), else one name.
    The pdjax per-tensor shape is the HF shape with dimension ``split`` (if any)
    split in two (heads x head_dim), so conversion is a reshape.
    """

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    stacked: bool
    split: int | None


def tensor_maps(config: DreamConfig) -> list[TensorMap]:
    """Every parameter of a DreamModel with its HF tensor names, in checkpoint order."""
    maps = [TensorMap(("embed_tokens",), ("model.embed_tokens.weight",), (config.vocab_size, config.hidden_size), (config.vocab_size, config.hidden_size), False, None)]
    for name, full in layer_shapes(config).items():
        shape = full[1:]
        if name in ("q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias"):
            split, hf_shape = 0, (shape[0] * shape[1], *shape[2:])
        elif name == "o_proj":
            split, hf_shape = 1, (shape[0], shape[1] * shape[2])
        else:
            split, hf_shape = None, shape
        names = tuple(f"model.layers.{i}.{LAYER_NAMES[name]}" for i in range(config.num_layers))
        maps.append(TensorMap(("layers", name), names, hf_shape, shape, True, split))
    maps.append(TensorMap(("norm",), ("model.norm.weight",), (config.hidden_size,), (config.hidden_size,), False, None))
    if not config.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), ("lm_head.weight",), (config.vocab_size, config.hidden_size), (config.vocab_size, config.hidden_size), False, None))
    return maps


# ---- reading ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Stored:
    file: str
    shape: tuple[int, ...]
    dtype: str


def _weight_map(index: str) -> dict[str, str]:
    """The tensor -> file map of a safetensors index; `CheckpointError` naming the file if it is unreadable."""
    try:
        with open(index, "rb") as f:
            weight_map = json.loads(f.read().decode("utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    return weight_map


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        weight_map = _weight_map(index)
        return sorted(set(weight_map.values()))
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return [SINGLE_FILE]
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (found {found}); only safetensors are read")


def read_headers(path: str | os.PathLike) -> dict[str, _Stored]:
    """name -> (file, shape, dtype) of every tensor of a safetensors checkpoint folder (headers only)."""
    path = os.fspath(path)
    stored: dict[str, _Stored] = {}
    for file in _checkpoint_files(path):
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: missing (named by {INDEX_FILE})")
        try:
            with safe_open(full, framework="numpy") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    stored[name] = _Stored(file, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:  # truncated or corrupt: "incomplete metadata, file not fully covered", ...
            raise CheckpointError(f"{full}: truncated or corrupt safetensors file ({e})") from None
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        weight_map = _weight_map(index)
        wrong = sorted(n for n, file in weight_map.items() if n not in stored or stored[n].file != file)
        if wrong:
            raise CheckpointError(f"{INDEX_FILE} lists tensors not found in the named files: {wrong[:20]}")
    return stored


def check_tensors(config: DreamConfig, stored: Mapping[str, _Stored]) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    expected = {name: tm.hf_shape for tm in tensor_maps(config) for name in tm.hf_names}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    misshaped = sorted(
        f"{n}: checkpoint {list(stored[n].shape)}, model {list(expected[n])}"
        for n in set(expected) & set(stored)
        if tuple(stored[n].shape) != tuple(expected[n])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors {misshaped}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config: " + "; ".join(problems))


def _norm_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for sl, size in zip(index, shape):
        start, stop, step = sl.indices(size)
        if step != 1:
            raise ValueError(f"strided shard index {sl}")
        out.append((start, stop))
    return tuple(out)


def _read_tensor(path: str, stored: _Stored, name: str, tm: TensorMap, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The block `box` (ranges over the pdjax per-tensor shape) of one HF tensor, as a pdjax-shaped array."""
    if tm.split is None:
        src = tuple(slice(a, b) for a, b in box)
        post = None
    else:
        j = tm.split
        inner = tm.shape[j + 1]
        (a0, a1), (b0, b1) = box[j], box[j + 1]
        src = tuple(slice(a, b) for a, b in box[:j]) + (slice(a0 * inner, a1 * inner),) + tuple(
            slice(a, b) for a, b in box[j + 2 :]
        )
        post = (j, a1 - a0, inner, b0, b1)
    # Opened per read so the memory map (and its resident pages) is released right after.
    with safe_open(os.path.join(path, stored.file), framework="numpy") as f:
        block = f.get_slice(name)[src]
    if post is not None:
        j, count, inner, b0, b1 = post
        block = block.reshape(block.shape[:j] + (count, inner) + block.shape[j + 1 :])
        if (b0, b1) != (0, inner):
            block = block[(slice(None),) * (j + 1) + (slice(b0, b1),)]
    return block


def _read_block(
    path: str, stored: Mapping[str, _Stored], tm: TensorMap, box: tuple[tuple[int, int], ...], dtype: np.dtype
) -> np.ndarray:
    """One device shard of a pdjax parameter, read from the checkpoint and cast to `dtype`."""
    if not tm.stacked:
        name = tm.hf_names[0]
        return np.asarray(_read_tensor(path, stored[name], name, tm, box), dtype=dtype)
    (l0, l1), rest = box[0], box[1:]
    out = np.empty((l1 - l0,) + tuple(b - a for a, b in rest), dtype)
    for layer in range(l0, l1):
        name = tm.hf_names[layer]
        out[layer - l0] = _read_tensor(path, stored[name], name, tm, rest)
    return out


def _load_array(
    read: Callable[[tuple[tuple[int, int], ...]], np.ndarray], shape: tuple[int, ...], sharding: jax.sharding.Sharding
) -> jax.Array:
    """A global array built shard by shard: each distinct shard is read once, put on its devices, then freed."""
    by_index: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        by_index.setdefault(_norm_index(index, shape), []).append(device)
    pieces: dict[jax.Device, jax.Array] = {}
    for box, devices in by_index.items():
        block = read(box)
        for device in devices:
            pieces[device] = jax.device_put(block, device)
        # Transfers are asynchronous: wait, so that only one host block is alive at a time.
        jax.block_until_ready([pieces[d] for d in devices])
        del block
    ordered = [pieces[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, ordered)


def load_pretrained(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: Any = None,
    param_dtype: Any = None,
    device: jax.Device | None = None,
    quantize: str | None = None,
    **config_overrides: Any,
) -> DreamModel:
    """A DreamModel from a HF folder (config.json + safetensors), each parameter loaded straight into its sharding.

    ``mesh``/``rules`` choose the sharding (default: all on ``device``, else this process's first
    device). ``param_dtype``
    defaults to the checkpoint's recorded dtype, ``dtype`` (compute) to ``param_dtype``.
    ``quantize`` (int8, int4) quantizes the projections, embedding and head while they are read
    (`pdjax.model.quantize`): the host holds one float slice at a time beside the quantized weight.
    Other keyword arguments override `DreamConfig` fields (e.g. attention_impl, remat).
    """
    path = os.fspath(path)
    check_model_folder(path)
    overrides = dict(config_overrides)
    if rules is not None:
        overrides["axis_rules"] = rules
    config = DreamConfig.from_hf(path, **overrides)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype, dtype=param_dtype if dtype is None else dtype)
    elif dtype is not None:
        config = config.replace(dtype=dtype)
    stored = read_headers(path)
    check_tensors(config, stored)
    if quantize is not None:
        quantizer.qtype_of(quantize)
        quantizer.check_float_checkpoint(path, {name: s.dtype for name, s in stored.items()})

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DreamModel(config, rngs=nnx.Rngs(0))))
    if mesh is not None:
        shardings = state_shardings(abstract, mesh, config.axis_rules)
    else:
        # this process's: on a multi-host launch jax.devices()[0] is host 0's
        device = device if device is not None else jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(device), abstract)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    flat = dict(nnx.to_flat_state(abstract))
    maps = {tm.path: tm for tm in tensor_maps(config)}
    if set(maps) != set(flat):
        raise AssertionError(f"tensor map out of date: {sorted(set(maps) ^ set(flat))}")
    for key, var in flat.items():
        tm = maps[key]
        value = var.get_value()
        sharding = flat_shardings[key].get_value()
        target = np.dtype(value.dtype)
        if quantize is not None and key in quantizer.CONTRACTED:
            read = lambda box, tm=tm: _read_block(path, stored, tm, box, np.dtype(np.float32))  # noqa: E731
            array = quantizer.load_weight(read, tuple(value.shape), sharding, key, quantize, _load_array)
        else:
            array = _load_array(lambda box, tm=tm: _read_block(path, stored, tm, box, target), tuple(value.shape),
                                sharding)
        var.set_value(array)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---- writing ---------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {size!r}; use bytes or e.g. '5GB', '500MB'")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(model: DreamModel, dtype: np.dtype | None) -> Iterator[tuple[str, Callable[[], np.ndarray], int]]:
    """(name, fetch, nbytes) of every HF tensor, fetched lazily one at a time."""
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for tm in tensor_maps(model.config):
        array = state[tm.path].get_value()
        out_dtype = np.dtype(array.dtype) if dtype is None else dtype
        nbytes = math.prod(tm.hf_shape) * out_dtype.itemsize
        for layer, name in enumerate(tm.hf_names):

            def fetch(array=array, layer=layer, tm=tm, out_dtype=out_dtype) -> np.ndarray:
                part = array[layer] if tm.stacked else array
                return _to_host(part).reshape(tm.hf_shape).astype(out_dtype, copy=False)

            yield name, fetch, nbytes


def save_pretrained(
    model: DreamModel,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    dtype: Any = None,
) -> list[str]:
    """Write a complete Hugging Face folder: config.json, safetensors shards (+ index when more than one),
    generation_config.json and the tokenizer files.

    Tensors keep the parameters' dtype unless ``dtype`` is given. A config read
    from a Dream-style config.json is written back in that style, with the
    remote-code files its ``auto_map`` names (and the source folder's other .py
    files) copied, so Dream's own loader reads the result. generation_config.json
    is the source folder's, else one written for the model family. Tokenizer
    files come from ``tokenizer`` if given, else from the source folder.
    In multi-host runs every process must call this; process 0 writes.
    Returns the written weight file names.
    """
    if quantizer.weight_format(model) in quantizer.QTYPES:  # pdjax quantizes at load time; it writes float folders
        raise quantizer.QuantizeError("a quantized model is not saved: save the float model, and load it with --quantize")
    path = os.fspath(path)
    limit = _parse_size(max_shard_size)
    out_dtype = None if dtype is None else np.dtype(dtype)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)

    tensors = list(_hf_tensors(model, out_dtype))
    shards: list[list[tuple[str, Callable[[], np.ndarray], int]]] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item[2] > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2]
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards):
        arrays = {name: fetch() for name, fetch, _ in shard}
        if writer:
            save_file(arrays, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in arrays})
        del arrays
    if not writer:
        return names
    for stale in os.listdir(path):  # weights of an earlier save into the same folder
        is_old_shard = stale.endswith(".safetensors") and stale not in names
        if is_old_shard or (stale == INDEX_FILE and len(names) == 1):
            os.remove(os.path.join(path, stale))
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(t[2] for t in tensors)}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    saved_dtype = out_dtype if out_dtype is not None else model.config.param_dtype
    hf_config = model.config.to_hf_dict(saved_dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    _copy_remote_code(model.config, path)
    _write_generation_config(model.config, hf_config, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    else:
        _copy_tokenizer_files(model.config, path)
    return names


# Files of a tokenizer (transformers' fast and slow layouts, the chat template); remote-code .py files travel
# with `_copy_remote_code`.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"
# Dream's `diffusion_generate` defaults, as in the released Dream-v0 generation_config.json (ids added from config.json).
DREAM_GENERATION_DEFAULTS = {"alg": "origin", "alg_temp": None, "eps": 0.001, "steps": 512, "max_length": 20,
                             "temperature": 0.0, "top_p": None, "top_k": None, "output_history": False,
                             "return_dict_in_generate": False}


def _source_dir(config: DreamConfig, path: str) -> str | None:
    """The folder the config was read from, unless it is `path` itself (nothing to copy then)."""
    source = config.hf_source_dir
    if not source or not os.path.isdir(source) or os.path.abspath(source) == os.path.abspath(path):
        return None
    return source


def auto_map_modules(config_json: Mapping[str, Any]) -> list[str]:
    """The .py files an ``auto_map`` names ("modeling_dream.DreamModel" -> modeling_dream.py; a
    "repo--module.Class" reference names module.py; a tokenizer entry may be a [slow, fast] pair)."""
    names: list[str] = []
    for ref in dict(config_json.get("auto_map") or {}).values():
        for item in ref if isinstance(ref, (list, tuple)) else [ref]:
            if isinstance(item, str) and "." in item:
                names.append(item.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(set(names))


def _copy_remote_code(config: DreamConfig, path: str) -> None:
    """Copy the source folder's Python files (Dream's remote code: those ``auto_map`` names and the modules they
    import, such as generation_utils.py) so that Dream's own loader keeps working on the saved folder."""
    source = _source_dir(config, path)
    if not config.is_dream_style or source is None:
        return
    for name in sorted(os.listdir(source)):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(source, name), os.path.join(path, name))
    missing = [m for m in auto_map_modules(config.hf_source or {}) if not os.path.exists(os.path.join(path, m))]
    if missing:
        import warnings

        warnings.warn(f"config.json's auto_map names {missing}, which {source} does not hold: Dream's own loader "
                      f"(trust_remote_code) will not load {path} until they are added", stacklevel=3)


def _copy_tokenizer_files(config: DreamConfig, path: str) -> None:
    """Copy the tokenizer files of the source folder (when no tokenizer object was given to save)."""
    source = _source_dir(config, path)
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(path, name))


def _write_generation_config(config: DreamConfig, hf_config: Mapping[str, Any], path: str) -> None:
    """generation_config.json: the source folder's, else one for the model family (Dream's sampler defaults
    for a Dream-style config; the token ids for Qwen2). Dream's `from_pretrained` requires the file."""
    source = _source_dir(config, path)
    if source is not None and os.path.isfile(os.path.join(source, GENERATION_CONFIG)):
        shutil.copy2(os.path.join(source, GENERATION_CONFIG), os.path.join(path, GENERATION_CONFIG))
        return
    if source is None and os.path.isfile(os.path.join(path, GENERATION_CONFIG)):
        return  # saved over its own folder: keep what is there
    ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")
           if hf_config.get(k) is not None}
    out: dict[str, Any] = {**DREAM_GENERATION_DEFAULTS, **ids} if config.is_dream_style else dict(ids)
    import transformers

    out["transformers_version"] = hf_config.get("transformers_version") or transformers.__version__
    with open(os.path.join(path, GENERATION_CONFIG), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
