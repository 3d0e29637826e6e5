"""Dream's configuration: shape, dtype policy and deployment knobs, with HF config.json I/O.

Dream-7B is a Qwen2-shaped decoder (METHOD §5). Its released config.json is
transformers-4 style (``model_type`` "Dream", ``rope_theta`` at the top level,
``auto_map`` to remote code); transformers 5 writes Qwen2 configs with
``rope_parameters``. `DreamConfig.from_hf` reads both and refuses settings pdjax
does not implement rather than silently computing a different model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from pdjax.model.sharding import DEFAULT_RULES, Rules

# jax.checkpoint policies selectable by name for the per-layer remat.
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "dots", "dots_no_batch")
DREAM_MODEL_TYPES = ("dream",)
QWEN2_MODEL_TYPES = ("qwen2",)

# Keys read from config.json (or deliberately ignored because they do not change the computed function).
_SHAPE_KEYS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
}


class UnsupportedConfig(ValueError):
    """A config.json setting pdjax does not implement (it would compute a different model)."""


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class DreamConfig:
    """Shape and numerics of a Dream/Qwen2 decoder; hashable, so it can be a static jit argument.

    ``dtype`` is the compute dtype (activations, matmul inputs), ``param_dtype`` the
    storage dtype of parameters; softmax and RMSNorm always run in float32.
    ``axis_rules`` maps the model's logical axis names to mesh axes (`pdjax.model.sharding`).
    ``remat`` is the jax.checkpoint policy of each decoder layer (one of `REMAT_POLICIES`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"
    # Options of the attention implementation as (name, value) pairs, e.g. (("block_q", 256), ("block_kv", 256)).
    attention_options: tuple[tuple[str, Any], ...] = ()
    remat: str = "none"
    axis_rules: Rules = DEFAULT_RULES
    # The config.json this config was read from (kept to write Dream-style files back); not part of equality.
    hf_source: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)
    hf_source_dir: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "axis_rules", tuple((k, v if not isinstance(v, list) else tuple(v)) for k, v in self.axis_rules))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {REMAT_POLICIES}")

    def replace(self, **changes: Any) -> "DreamConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def dream_7b(cls, **overrides: Any) -> "DreamConfig":
        """Dream-v0-7B (and the Planned Diffusion fine-tunes): the Qwen2.5-7B shape of METHOD §5."""
        base = dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "DreamConfig":
        """A ~200K-parameter model with the same structure (GQA, biases, untied head) for tests."""
        base = dict(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=8,
            num_kv_heads=4,
            head_dim=8,
            rope_theta=10_000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        return cls(**{**base, **overrides})

    @property
    def num_params(self) -> int:
        """Number of parameters of the model this config describes."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * self.num_heads * h * 2 + 2 * d * self.num_kv_heads * h + (self.num_heads + 2 * self.num_kv_heads) * h
        layer = attn + 3 * d * f + 2 * d
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_layers * layer + heads * self.vocab_size * d + d

    # ---- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "DreamConfig":
        """Read a config.json (a folder, a file path, or the parsed dict), Dream v4-style or transformers-5 Qwen2.

        Raises `UnsupportedConfig` naming any setting pdjax does not implement.
        ``overrides`` set pdjax-side fields (dtype, param_dtype, attention_impl, remat, axis_rules).
        """
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                raw = json.load(f)
        _check_supported(raw)
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = raw.get("head_dim") or hidden // heads
        fields = dict(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=float(_rope_theta(raw)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hf_source=raw,
            hf_source_dir=None if isinstance(source, Mapping) else os.path.dirname(os.path.abspath(path)),
        )
        stored = raw.get("dtype") or raw.get("torch_dtype")
        if stored is not None and "param_dtype" not in overrides:
            fields["param_dtype"] = jnp.dtype(stored)
            fields["dtype"] = jnp.dtype(stored)
        return cls(**{**fields, **overrides})

    @property
    def is_dream_style(self) -> bool:
        """True when this config came from a Dream v4-style config.json (written back in that style)."""
        return bool(self.hf_source) and str(self.hf_source.get("model_type", "")).lower() in DREAM_MODEL_TYPES

    def to_hf_dict(self, dtype: Any = None) -> dict[str, Any]:
        """The config.json to save: Qwen2 (loadable by transformers), or the Dream source's keys updated.

        ``dtype`` is the dtype of the saved tensors (default: ``param_dtype``).
        """
        dtype_name = _dtype_name(self.param_dtype if dtype is None else dtype)
        shape = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.is_dream_style:
            out = {k: v for k, v in dict(self.hf_source).items() if k not in ("rope_parameters", "dtype")}
            out.update(shape)
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = None
            out["torch_dtype"] = dtype_name
            return out
        out: dict[str, Any] = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        out.update(
            (k, v)
            for k, v in dict(self.hf_source or {}).items()
            if k not in _SHAPE_KEYS and k not in ("torch_dtype", "transformers_version", "layer_types")
        )
        out.update(
            {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                **shape,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "use_sliding_window": False,
                "sliding_window": None,
                "max_window_layers": self.num_layers,
                "attention_dropout": 0.0,
                "dtype": dtype_name,
            }
        )
        return out


def _rope_theta(raw: Mapping[str, Any]) -> float:
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        return params["rope_theta"]
    return raw.get("rope_theta", 10000.0)


def _check_supported(raw: Mapping[str, Any]) -> None:
    """Raise UnsupportedConfig for any setting that changes the function pdjax computes."""
    model_type = str(raw.get("model_type", "")).lower()
    if model_type not in DREAM_MODEL_TYPES + QWEN2_MODEL_TYPES:
        raise UnsupportedConfig(f"model_type {raw.get('model_type')!r} is not a Dream/Qwen2 model")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
    if missing:
        raise UnsupportedConfig(f"config.json lacks {missing}")
    problems = []
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key)
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                problems.append(f"{key}.rope_type={kind!r} (only default RoPE is implemented)")
            extra = set(rope) - {"rope_type", "type", "rope_theta"}
            if kind == "default" and extra:
                problems.append(f"{key} has unsupported fields {sorted(extra)}")
    if raw.get("use_sliding_window"):
        problems.append("use_sliding_window=true (sliding-window attention is not implemented)")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types {sorted(set(layer_types))} (only full_attention is implemented)")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={raw['hidden_act']!r} (Qwen2 uses silu)")
    if raw.get("attention_bias") is False:
        problems.append("attention_bias=false (Qwen2/Dream q/k/v projections have biases)")
    if float(raw.get("attention_dropout", 0.0) or 0.0) != 0.0:
        problems.append(f"attention_dropout={raw['attention_dropout']} (attention dropout is not implemented)")
    if raw.get("use_mrope"):
        problems.append("use_mrope=true (multimodal RoPE is not implemented)")
    heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
    if raw.get("head_dim") is None and heads and hidden and hidden % heads:
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim is given")
    if problems:
        raise UnsupportedConfig("unsupported config.json settings: " + "; ".join(problems))

