"""The programs `pdjax.aot` compiles, built exactly as `pdjax.train`, `pdjax.decode` and `pdjax.serve` build them,
from abstract weights (shapes and shardings, no values) placed on a TPU topology's devices.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import yaml

from pdjax.cli_errors import UserError
from pdjax.memory import MemoryEstimate, serving_memory, training_memory
from pdjax.model.config import DreamConfig
from pdjax.structure import ControlIds

# The released planned-diffusion checkpoints' control ids (METHOD §1) and Qwen2's digits '0'..'9' (ids 15..24):
# what a Dream-7B preset decodes with when no tokenizer is at hand.
RELEASED_IDS = ControlIds(async_start=151667, async_end=151668, sync=151671, eos=151645, pad=151672,
                          promise_start=151669, promise_end=151670, mask=151666, digits=tuple(range(15, 25)))
PRESETS_WITH_IDS = {"dream_7b": RELEASED_IDS}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to compile for: its config (shape and dtypes), control ids, eos id and where it came from."""

    config: DreamConfig
    ids: ControlIds | None
    eos: int
    source: str


def presets() -> list[str]:
    """`DreamConfig` preset names (dream_7b, tiny, ...)."""
    from pdjax.train.trainer import presets as train_presets

    return train_presets()


def resolve_model(spec: str, dtype: str | None = None) -> ModelSpec:
    """A preset name or a Hugging Face folder (config.json, and a tokenizer for the control ids); no weights read.

    ``dtype`` sets both the stored and the compute dtype (default: the folder's, or the preset's).
    """
    numerics = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
    if os.path.isdir(spec):
        config_path = os.path.join(spec, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"--model {spec}: no config.json in this folder")
        try:
            config = DreamConfig.from_hf(spec, **numerics)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--model {spec}: cannot read its config.json ({type(e).__name__}: {e})") from None
        ids, eos = _folder_ids(spec)
        return ModelSpec(config, ids, eos, spec)
    if spec in presets():
        config = getattr(DreamConfig, spec)(**numerics)
        ids = PRESETS_WITH_IDS.get(spec)
        return ModelSpec(config, ids, ids.eos if ids is not None else 0, f"the {spec} preset")
    raise UserError(f"--model {spec!r}: neither a folder with config.json nor a preset ({', '.join(presets())})")


def _folder_ids(path: str) -> tuple[ControlIds | None, int]:
    """Control ids and eos of a folder's tokenizer, as `pdjax.decode` reads them (none: no tokenizer or no tags)."""
    from pdjax.decode.cli import eos_id
    from pdjax.model.tokenizer import control_ids, load_tokenizer
    from pdjax.structure import MissingControlTokens

    try:
        tokenizer = load_tokenizer(path)
    except Exception:  # a config-only folder: AR decoding still needs an eos id
        return None, 0
    try:
        return control_ids(tokenizer), eos_id(tokenizer)
    except MissingControlTokens:
        return None, eos_id(tokenizer)


def abstract_forward(config: DreamConfig, sharding: Any, quantize: str | None = None) -> Any:
    """The decoder's `Forward` of a model with abstract parameters placed by `sharding` (one chip); with
    ``quantize`` (int8, int4), the QArrays `pdjax.model.quantize` loads, traced from the float model."""
    from flax import nnx

    from pdjax.decode.forward import model_forward
    from pdjax.model import DreamModel, abstract_model
    from pdjax.model.quantize import quantize_model

    model = abstract_model(config) if quantize is None else nnx.eval_shape(
        lambda: quantize_model(DreamModel(config, rngs=nnx.Rngs(0)), quantize))
    forward = model_forward(model)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), forward.params)
    return forward._replace(params=params)


def _decode_config(model: ModelSpec, mode: str, batch_size: int, max_length: int | None, max_spans: int,
                   buckets: Sequence[int] | None) -> Any:
    from pdjax.decode.cli import default_max_length
    from pdjax.decode.decoder import DecodeConfig

    if mode != "ar" and model.ids is None:
        raise UserError(f"mode {mode!r} needs the control token ids: {model.source} has no tokenizer with the plan "
                        "tags (give a folder whose tokenizer has them, or --mode ar)")
    length = max_length or default_max_length(model.config)
    try:
        return DecodeConfig(mode=mode, max_length=length, batch_size=batch_size, max_spans=max_spans,
                            buckets=tuple(buckets or ()))
    except ValueError as e:
        raise UserError(str(e)) from None


def serving_estimate(model: ModelSpec, batch: int, max_length: int, buckets: Sequence[int] = (),
                     quantize: str | None = None) -> MemoryEstimate:
    """`pdjax.memory`'s estimate of a decoding program of `batch` rows of `max_length` on one chip."""
    c = model.config
    return serving_memory(c, batch=batch, max_length=max_length, weight_bytes=c.param_dtype.itemsize,
                          cache_bytes=c.dtype.itemsize, quantize=quantize)


def decode_program(model: ModelSpec, device: Any, *, mode: str, batch_size: int, max_length: int | None,
                   max_spans: int = 16, buckets: Sequence[int] | None = None, quantize: str | None = None
                   ) -> tuple[Any, MemoryEstimate]:
    """The `pdjax.decode` program (one batch, lowered for `device`) and its analytic estimate."""
    from pdjax.decode.api import Decoder

    sharding = jax.sharding.SingleDeviceSharding(device)
    config = _decode_config(model, mode, batch_size, max_length, max_spans, buckets)
    forward = abstract_forward(model.config, sharding, quantize)
    decoder = Decoder(forward, eos_id=model.eos, ids=model.ids, config=config)
    return decoder.lower(sharding), serving_estimate(model, config.batch_size, config.max_length, quantize=quantize)


def serve_program(model: ModelSpec, device: Any, *, mode: str, batch_size: int, max_length: int | None,
                  max_spans: int = 16, buckets: Sequence[int] | None = None, chunk: int = 16,
                  schedule: str = "auto", quantize: str | None = None) -> tuple[Any, MemoryEstimate]:
    """The `pdjax.serve` engine's program (refill + a chunk of iterations over `batch_size` slots, lowered for
    `device`; ``auto`` schedules as on a TPU) and its analytic estimate."""
    from pdjax.decode.api import vocab_size_of
    from pdjax.decode.slots import Slots

    sharding = jax.sharding.SingleDeviceSharding(device)
    config = _decode_config(model, mode, batch_size, max_length, max_spans, buckets)
    forward = abstract_forward(model.config, sharding, quantize)
    slots = Slots(forward, eos_id=model.eos, ids=model.ids, config=config, vocab_size=vocab_size_of(forward),
                  schedule=schedule)
    estimate = serving_estimate(model, config.batch_size, config.max_length, quantize=quantize)
    return slots.lower(sharding, iterations=chunk), estimate


# ---- training ---------------------------------------------------------------------------------------------


def explicit_preset(path: str | None, overrides: Sequence[str]) -> str | None:
    """The ``model.preset`` a config file or an override names itself (not the dataclass default)."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model.preset":
            return yaml.safe_load(value)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    model = raw.get("model") or {}
    return model.get("preset") if isinstance(model, dict) else None


def train_model_config(cfg: Any, path: str | None, overrides: Sequence[str], model: str | None) -> tuple[DreamConfig, str]:
    """The run's `DreamConfig` with its numerics, and where its shape came from: ``--model`` (a folder or preset),
    else the checkpoint's config.json, else (the checkpoint not on this machine) the preset the config names."""
    from pdjax.train.trainer import model_numerics

    numerics = model_numerics(cfg)
    m = cfg.model
    if model is not None:
        spec = resolve_model(model)
        shape = {f.name: getattr(spec.config, f.name) for f in dataclasses.fields(DreamConfig) if f.name not in numerics}
        return DreamConfig(**shape, **numerics), spec.source
    if m.checkpoint is not None:
        folder = os.path.expanduser(m.checkpoint)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return DreamConfig.from_hf(folder, **numerics), f"{m.checkpoint}/config.json"
        preset = explicit_preset(path, overrides)
        if preset is None:
            raise UserError(f"model.checkpoint {m.checkpoint} is not on this machine and the config names no "
                            "model.preset of its shape: pass --model PRESET or --model DIR (a folder with its config.json)")
        note = f"the {preset} preset (model.checkpoint {m.checkpoint} is not on this machine)"
        return getattr(DreamConfig, preset)(**m.preset_args, **numerics), note
    base = getattr(DreamConfig, m.preset)(**m.preset_args)
    vocab = m.vocab_size or base.vocab_size
    return getattr(DreamConfig, m.preset)(**{**m.preset_args, "vocab_size": vocab, **numerics}), f"the {m.preset} preset"


def training_estimate(cfg: Any, config: DreamConfig, mesh: Any) -> MemoryEstimate:
    """`pdjax.memory`'s estimate of the run's step on one chip of `mesh`."""
    shape = dict(mesh.shape)
    rows = shape.get("data", 1) * shape.get("fsdp", 1)
    return training_memory(
        config, batch_per_device=cfg.data.batch_size / rows, seq_len=cfg.data.row_length, fsdp=shape.get("fsdp", 1),
        tensor=shape.get("tensor", 1), remat=cfg.model.remat, param_bytes=config.param_dtype.itemsize,
        compute_bytes=config.dtype.itemsize, lora_rank=cfg.lora.rank if cfg.lora.enabled else 0,
        grad_accum=cfg.grad_accum,
    )


def train_program(cfg: Any, config: DreamConfig, devices: Sequence[Any], steps: int = 1000) -> tuple[Any, MemoryEstimate]:
    """The step `pdjax.train` runs for `cfg` on a mesh over `devices`, lowered (abstract state, frozen weights and
    batch), and its analytic estimate. ``steps`` only shapes the learning-rate schedule's constants."""
    from pdjax.model import make_mesh
    from pdjax.train.trainer import abstract_train_step

    try:
        mesh = make_mesh(cfg.mesh.sizes(), devices)
    except ValueError as e:
        raise UserError(f"mesh: {e}") from None
    rows = dict(mesh.shape)
    split = rows.get("data", 1) * rows.get("fsdp", 1)
    if cfg.data.batch_size % split:
        raise UserError(f"data.batch_size {cfg.data.batch_size} does not split over the {split} batch shards of "
                        f"mesh {dict(mesh.shape)}")
    mask_id = RELEASED_IDS.mask if config.vocab_size > RELEASED_IDS.mask else config.vocab_size - 1
    step, args = abstract_train_step(cfg, config, mesh, mask_id, cfg.steps or steps)
    with jax.set_mesh(mesh):
        lowered = step.lower(*args)
    return lowered, training_estimate(cfg, config, mesh)


def compiled_decode_bytes(config_folder: str, device: Any, *, batch_size: int, max_length: int,
                          dtype: str | None = None, buckets: Sequence[int] | None = None, mode: str = "pd",
                          quantize: str | None = None) -> int:
    """Per-chip bytes of the `pdjax.decode` program for a model folder, from the compiler of `device`'s platform
    (abstract weights: nothing is loaded). A folder holding only config.json decodes with the released
    checkpoints' control ids. The notebooks check a TPU runtime's memory with it before downloading weights."""
    spec = resolve_model(config_folder, dtype)
    if spec.ids is None and mode != "ar":
        spec = ModelSpec(spec.config, RELEASED_IDS, RELEASED_IDS.eos, spec.source)
    lowered, _ = decode_program(spec, device, mode=mode, batch_size=batch_size, max_length=max_length,
                                buckets=buckets, quantize=quantize)
    m = lowered.compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
               + m.generated_code_size_in_bytes)
