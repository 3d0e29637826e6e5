"""Dream (Qwen2-shaped) in Flax NNX: config and presets, the model, KV cache, logit shift, sharding, HF I/O."""

from pdjax.model.cache import KVCache, cache_bytes, init_cache
from pdjax.model.checkpoint import CheckpointError, load_pretrained, read_headers, save_pretrained, tensor_maps
from pdjax.model.config import REMAT_POLICIES, DreamConfig, UnsupportedConfig
from pdjax.model.create import abstract_model, init_model
from pdjax.model.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    constrain,
    logical_to_spec,
    make_mesh,
    spec_tree,
    state_shardings,
)
from pdjax.model.transformer import DreamModel, count_params, shift_logits

__all__ = [
    "CheckpointError",
    "DEFAULT_RULES",
    "MESH_AXES",
    "REMAT_POLICIES",
    "DreamConfig",
    "DreamModel",
    "KVCache",
    "Rules",
    "UnsupportedConfig",
    "abstract_model",
    "cache_bytes",
    "constrain",
    "count_params",
    "init_cache",
    "init_model",
    "load_pretrained",
    "logical_to_spec",
    "make_mesh",
    "read_headers",
    "save_pretrained",
    "shift_logits",
    "spec_tree",
    "state_shardings",
    "tensor_maps",
]
