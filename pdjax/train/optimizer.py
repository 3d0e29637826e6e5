"""AdamW with linear warmup + cosine decay and global-norm clipping (optax).

Norm scales and biases are not decayed; they are recognised by name, because
stacked layer parameters make ``ndim`` useless for telling them apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters and the learning-rate schedule."""

    learning_rate: float = 1e-5  # peak, reached after warmup
    warmup_steps: int = 0
    decay_steps: int | None = None  # cosine length after warmup; None: until the last step
    end_learning_rate_ratio: float = 0.0  # final lr = ratio * peak
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global gradient-norm clip; None to disable

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.end_learning_rate_ratio <= 1.0:
            raise ValueError(f"end_learning_rate_ratio must be in [0, 1], got {self.end_learning_rate_ratio}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or null, got {self.clip_norm}")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak over `warmup_steps`, then cosine decay to ratio * peak."""
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(total_steps - cfg.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.warmup_steps + max(decay, 1),
        end_value=cfg.learning_rate * cfg.end_learning_rate_ratio,
    )


_NO_DECAY = ("norm", "bias")


def decay_mask(params: Any) -> Any:
    """True for every parameter that gets weight decay: all but norm scales and biases."""

    def one(path, _leaf) -> bool:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return not any(tag in name for tag in _NO_DECAY)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule), decaying only `decay_mask` parameters."""
    chain = []
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*chain)
