"""Creating a model abstractly (shapes only) or directly sharded over a mesh, never whole on one device."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from pdjax.model.config import DreamConfig
from pdjax.model.sharding import Rules, state_shardings
from pdjax.model.transformer import DreamModel


def abstract_model(config: DreamConfig, mesh: Mesh | None = None, rules: Rules | None = None) -> DreamModel:
    """A DreamModel whose arrays are ShapeDtypeStructs (no memory), carrying shardings when `mesh` is given."""
    model = nnx.eval_shape(lambda: DreamModel(config, rngs=nnx.Rngs(0)))
    if mesh is None:
        return model
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules or config.axis_rules)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        state,
        shardings,
    )
    return nnx.merge(graphdef, state)


def init_model(config: DreamConfig, mesh: Mesh | None = None, *, seed: int = 0, rules: Rules | None = None) -> DreamModel:
    """A randomly initialised DreamModel; with `mesh`, every parameter is created already sharded.

    With a mesh the initialiser is jitted with the target shardings as outputs,
    so no device ever holds more than its shard.
    """
    if mesh is None:
        return DreamModel(config, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: DreamModel(config, rngs=nnx.Rngs(seed))))
    shardings = state_shardings(abstract_state, mesh, rules or config.axis_rules)

    def init() -> Any:
        return nnx.state(DreamModel(config, rngs=nnx.Rngs(seed)))

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
