"""LoRA on the attention and MLP projections, as a reparametrisation of the stacked weights.

The model stores each projection of all layers as one stacked array in Hugging
Face's [out, in] memory order (``q_proj`` [L, Nq, H, D]: out = Nq*H, in = D). A
LoRA pair per projection is ``a`` [L, r, *in] and ``b`` [L, *out, r]; the
weight the model sees is ``W + (alpha / r) * b @ a``. Only the pairs are
trained and kept in optimizer state; the base weights stay frozen (and may be
bfloat16). `merge` folds the pairs into the base weights for export.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from pdjax.model import logical_to_spec
from pdjax.model.transformer import LAYER_AXES

# Number of leading (after ``layers``) axes of each projection that form its output features.
OUTPUT_AXES: dict[str, int] = {
    "q_proj": 2,
    "k_proj": 2,
    "v_proj": 2,
    "o_proj": 1,
    "gate_proj": 1,
    "up_proj": 1,
    "down_proj": 1,
}
ALL_TARGETS: tuple[str, ...] = tuple(OUTPUT_AXES)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank 0 disables LoRA (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
        unknown = [t for t in self.targets if t not in OUTPUT_AXES]
        if unknown:
            raise ValueError(f"unknown lora.targets {unknown}; choose from {list(ALL_TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / max(self.rank, 1)


def _split(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n_out = OUTPUT_AXES[name]
    return shape[1 : 1 + n_out], shape[1 + n_out :]


def init_lora(base: Mapping[str, Any], cfg: LoraConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict[str, Any]:
    """LoRA pairs for the targeted projections of `base` (a pure param dict): a ~ N(0, 1/in), b = 0.

    b = 0 makes the reparametrised model start exactly at the base model.
    """
    out: dict[str, Any] = {}
    for i, name in enumerate(cfg.targets):
        w = base["layers"][name]
        out_shape, in_shape = _split(name, tuple(w.shape))
        layers = w.shape[0]
        fan_in = math.prod(in_shape)
        a = jax.random.normal(jax.random.fold_in(key, i), (layers, cfg.rank, *in_shape), dtype) / math.sqrt(fan_in)
        b = jnp.zeros((layers, *out_shape, cfg.rank), dtype)
        out[name] = {"a": a, "b": b}
    return {"layers": out}


def abstract_lora(base: Mapping[str, Any], cfg: LoraConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """ShapeDtypeStructs of `init_lora`'s result (for restoring and sharding)."""
    return jax.eval_shape(lambda b: init_lora(b, cfg, jax.random.key(0), dtype), base)


def _delta(name: str, pair: Mapping[str, jax.Array], scale: float) -> jax.Array:
    b, a = pair["b"], pair["a"]
    n_out, n_in = b.ndim - 2, a.ndim - 2
    letters = iter(string.ascii_lowercase.replace("l", "").replace("r", ""))
    outs = "".join(next(letters) for _ in range(n_out))
    ins = "".join(next(letters) for _ in range(n_in))
    return scale * jnp.einsum(f"l{outs}r,lr{ins}->l{outs}{ins}", b, a)


def apply_lora(base: Mapping[str, Any], lora: Mapping[str, Any], cfg: LoraConfig) -> dict[str, Any]:
    """The param dict the model runs with: targeted weights W + scale * b @ a in float32."""
    layers = dict(base["layers"])
    for name, pair in lora["layers"].items():
        layers[name] = base["layers"][name].astype(jnp.float32) + _delta(name, pair, cfg.scale).astype(jnp.float32)
    return {**base, "layers": layers}


def merge(base: Mapping[str, Any], lora: Mapping[str, Any], cfg: LoraConfig) -> dict[str, Any]:
    """Base weights with the LoRA pairs folded in, in the base weights' own dtypes (for export)."""
    merged = apply_lora(base, lora, cfg)
    layers = {k: v.astype(base["layers"][k].dtype) for k, v in merged["layers"].items()}
    return {**merged, "layers": layers}


def lora_shardings(lora: Mapping[str, Any], mesh: Mesh, rules: Any) -> dict[str, Any]:
    """NamedShardings of the LoRA pairs, from the projections' logical axis names (rank unsharded)."""
    out = {}
    for name, pair in lora["layers"].items():
        axes = LAYER_AXES[name]
        n_out = OUTPUT_AXES[name]
        out_names, in_names = axes[1 : 1 + n_out], axes[1 + n_out :]
        a_names = (axes[0], None, *in_names)
        b_names = (axes[0], *out_names, None)
        out[name] = {
            "a": NamedSharding(mesh, logical_to_spec(a_names, pair["a"].shape, mesh, rules)),
            "b": NamedSharding(mesh, logical_to_spec(b_names, pair["b"].shape, mesh, rules)),
        }
    return {"layers": out}
