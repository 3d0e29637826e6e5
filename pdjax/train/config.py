"""`TrainConfig`: every knob of a training run, as nested dataclasses read from YAML.

The sections are passed explicitly to the pieces that use them (library code
never reads a global config). ``data`` is `pdjax.data.DataConfig` itself, so
the data pipeline's own validation applies, and its ``mode`` is the one
training mode (segments layout and loss alike).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

from pdjax.data import DataConfig
from pdjax.model import REMAT_POLICIES
from pdjax.train import overrides
from pdjax.train.lora import LoraConfig
from pdjax.train.loss import NORMALIZATIONS, RECIPES, LossConfig, Normalize, Recipe
from pdjax.train.optimizer import OptimizerConfig

DTYPES: tuple[str, ...] = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to train and its numerics.

    ``checkpoint`` (a Hugging Face folder: config.json + safetensors) wins over
    ``preset`` (a `DreamConfig` preset name: ``tiny``, ``dream_7b``, trained from
    scratch). ``tokenizer`` defaults to the checkpoint folder.
    """

    preset: str | None = "tiny"
    preset_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # DreamConfig fields changed on the preset
    checkpoint: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None  # preset only; None: the tokenizer's size rounded up to a multiple of 128
    dtype: str = "float32"  # compute dtype; bfloat16 on TPU
    param_dtype: str = "float32"  # storage dtype of the parameters (master weights when trained)
    remat: str = "none"  # per-layer rematerialisation: none | full | dots | dots_no_batch
    attention_impl: str = "xla"  # xla (any device) | pallas_tpu (block-sparse TPU kernel) | splash_dense
    attention_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {block_q: 256, block_kv: 256}

    def __post_init__(self) -> None:
        if self.preset is None and self.checkpoint is None:
            raise ValueError("set model.preset or model.checkpoint")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh axis sizes; one may be -1 (all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class LossSection:
    """The loss recipe (METHOD §3); the mode comes from ``data.mode``."""

    recipe: Recipe = "pdjax"
    eps: float = 1e-3
    normalize: Normalize = "document"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"loss.recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"loss.normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")

    def for_mode(self, mode: str) -> LossConfig:
        return LossConfig(recipe=self.recipe, mode=mode, eps=self.eps, normalize=self.normalize)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Where and how often to checkpoint (orbax); ``dir`` may be a gs:// path."""

    dir: str | None = None
    every_steps: int = 500
    max_to_keep: int | None = 3
    async_save: bool = True
    export_dir: str | None = None  # write the final weights as a Hugging Face checkpoint here

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")


@dataclasses.dataclass(frozen=True)
class LogSection:
    """Metrics: every ``every_steps`` steps to JSONL (+ TensorBoard) under ``dir``, and a live progress bar."""

    dir: str | None = None  # default: <checkpoint.dir>/logs when checkpointing locally
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: float | None = None  # per device, for MFU; None: known TPU generations, else no MFU

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"log.every_steps must be >= 1, got {self.every_steps}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    data: DataConfig
    steps: int | None = None  # optimizer steps; None: as many as the data pipeline yields
    grad_accum: int = 1  # micro-batches per step (data.batch_size rows split evenly)
    seed: int = 0  # model init (presets) and the masking RNG
    distributed: Literal["auto", "on", "off"] = "auto"  # jax.distributed.initialize(): auto-detected multi-host
    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    loss: LossSection = LossSection()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraConfig = LoraConfig()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or null, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.data.batch_size % self.grad_accum:
            raise ValueError(f"data.batch_size {self.data.batch_size} is not divisible by grad_accum {self.grad_accum}")

    @property
    def loss_config(self) -> LossConfig:
        return self.loss.for_mode(self.data.mode)


def load_config(path: str | None, items: Sequence[str] = ()) -> TrainConfig:
    """A `TrainConfig` from a YAML file and dotted ``key=value`` overrides (validated)."""
    return overrides.load(TrainConfig, path, items)


def config_dict(cfg: TrainConfig) -> dict:
    """The config as plain data (saved with checkpoints and logs)."""
    return overrides.to_dict(cfg)
