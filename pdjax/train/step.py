"""The train step: a pure function of (state, frozen weights, batch), jitted once with donated state.

The model is split once (`nnx.split`); the step merges the graph with the
trainable parameters (all weights, or LoRA pairs on top of frozen base weights),
runs the forward process and the model over ``grad_accum`` micro-batches
(`lax.scan`), sums gradients of the loss numerators, divides by the batch's
total denominator (so accumulation is exact) and applies the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdjax.model import logical_to_spec
from pdjax.structure import Role, Segments
from pdjax.train import lora as lora_lib
from pdjax.train.loss import Corruption, LossConfig, LossTerms, corrupt, loss_terms

Batch = Mapping[str, jax.Array]


class TrainState(NamedTuple):
    """Everything a step changes: the step count, trainable params, optimizer state, RNG key data."""

    step: jax.Array  # int32 scalar
    params: Any  # pure dict: all model parameters, or the LoRA pairs
    opt_state: Any
    rng: jax.Array  # uint32 key data of the masking RNG (jax.random.key_data)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step needs besides state and batch."""

    loss: LossConfig
    mask_id: int
    grad_accum: int = 1
    lora: lora_lib.LoraConfig | None = None  # enabled: params are LoRA pairs, frozen["base"] the weights


def model_state(params: Any, frozen: Mapping[str, Any], lora: lora_lib.LoraConfig | None) -> Any:
    """The pure parameter dict the model runs with."""
    if lora is not None and lora.enabled:
        return lora_lib.apply_lora(frozen["base"], params, lora)
    return params


def batch_segments(batch: Batch) -> Segments:
    return Segments(*(batch[f] for f in Segments._fields))


def micro_batch_terms(
    graphdef: nnx.GraphDef, params: Any, frozen: Mapping[str, Any], batch: Batch, options: StepOptions
) -> LossTerms:
    """Loss terms of one (micro-)batch already noised (``noisy``, ``masked``, ``t`` beside the clean batch)."""
    model = nnx.merge(graphdef, model_state(params, frozen, options.lora))
    seg = batch_segments(batch)
    noise = Corruption(batch["noisy"], batch["masked"], batch["t"])
    logits, _ = model(noise.tokens, seg)
    return loss_terms(logits, batch["tokens"], seg, noise, options.loss)


def _split_micro(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], micro-batch a holding rows a, a+n, ...: the batch-axis sharding stays on B/n."""

    def one(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return {k: one(v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule, options: StepOptions
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step ``(state, frozen, batch) -> (state, metrics)``; jit it with `jit_train_step`.

    The whole batch is noised once before it is split into micro-batches, so
    ``grad_accum`` changes memory use, not the masks or the update.
    """

    def numerator(params, frozen, batch):
        terms = micro_batch_terms(graphdef, params, frozen, batch, options)
        return terms.ar + terms.diffusion, terms

    grad_fn = jax.grad(numerator, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: Batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        noise = corrupt(key, batch["tokens"], batch_segments(batch), mask_id=options.mask_id, cfg=options.loss)
        inputs = {**batch, "noisy": noise.tokens, "masked": noise.masked, "t": noise.t}
        if options.grad_accum == 1:
            grads, terms = grad_fn(state.params, frozen, inputs)
        else:

            def body(carry, micro):
                acc, terms_acc = carry
                g, t = grad_fn(state.params, frozen, micro)
                return (jax.tree.map(jnp.add, acc, g), terms_acc + t), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_terms = LossTerms(*(jnp.zeros((), d) for d in (jnp.float32,) * 3 + (jnp.int32,) * 2))
            (grads, terms), _ = jax.lax.scan(body, (zeros, zero_terms), _split_micro(inputs, options.grad_accum))
        scale = 1.0 / jnp.maximum(terms.weight, 1e-9)
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": terms.loss,
            "ar_loss": terms.ar_loss,
            "diffusion_loss": terms.diffusion_loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            "tokens": jnp.sum(batch["role"] != Role.PADDING),
            "ar_targets": terms.ar_tokens,
            "masked_tokens": terms.diffusion_tokens,
        }
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def state_layout(
    base: Any, base_shardings: Any, tx: optax.GradientTransformation, mesh: Mesh, rules: Any, lora: Any = None
) -> tuple[TrainState, TrainState, Any]:
    """(abstract state with shardings, state shardings, frozen shardings) for model params `base` (pure dict).

    Full fine-tuning trains `base` itself; with an enabled `lora` config the
    trainable params are LoRA pairs and `base` is frozen. Optimizer moments get
    their parameters' shardings; counters are replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    if lora is not None and lora.enabled:
        params = lora_lib.abstract_lora(base, lora)
        param_shardings = lora_lib.lora_shardings(params, mesh, rules)
        frozen_shardings = {"base": base_shardings}
    else:
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
        param_shardings = base_shardings
        frozen_shardings = {}
    opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt, param_shardings, transform_non_params=lambda _: replicated)
    shardings = TrainState(replicated, param_shardings, opt_shardings, replicated)
    abstract = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        params,
        opt,
        jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),  # (2,) uint32 for threefry
    )
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return abstract, shardings, frozen_shardings


def batch_sharding(mesh: Mesh, rules: Any, shape: tuple[int, int]) -> NamedSharding:
    """Rows over the mesh's batch axes (data, fsdp), the length axis whole."""
    return NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"), shape, mesh, rules))


def jit_train_step(
    step_fn: Callable,
    state_shardings: TrainState,
    frozen_shardings: Any,
    batch_shardings: Mapping[str, NamedSharding],
    mesh: Mesh,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """jit with explicit shardings and the state donated (updated in place)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, frozen_shardings, dict(batch_shardings)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    def run(state: TrainState, frozen: Any, batch: Batch):
        with jax.set_mesh(mesh):
            return jitted(state, frozen, batch)

    run.jitted = jitted  # type: ignore[attr-defined]
    return run
