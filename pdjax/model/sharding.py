"""Logical axis names -> mesh axes: one model, run replicated, FSDP or tensor-parallel by configuration.

Every parameter carries logical axis names (flax's ``out_sharding`` metadata,
e.g. ``("layers", "mlp", "embed")``) and the main activations are constrained by
logical names too. `Rules` map each name to mesh axes (``data``, ``fsdp``,
``tensor``). The parallelism is then chosen by the mesh's shape alone:
``{"data": 8}`` is data parallel with replicated weights, ``{"fsdp": 8}`` shards
weights and batch, ``{"fsdp": 2, "tensor": 4}`` adds tensor parallelism.

A mesh axis is dropped from a dimension it does not divide (e.g. 4 kv heads on
8-way tensor parallelism, or batch 1 while decoding): that dimension is then
replicated over that axis instead of failing.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)


def make_mesh(axis_sizes: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over (data, fsdp, tensor) (or the named axes given), one size may be -1 (the rest).

    ``make_mesh({"fsdp": -1})`` is pure FSDP over all devices; ``make_mesh((1, 2, 4))``
    is data 1 x fsdp 2 x tensor 4. Axes are Auto so that XLA propagates shardings.
    """
    if isinstance(axis_sizes, Mapping):
        sizes = {name: int(axis_sizes.get(name, 1)) for name in MESH_AXES}
        sizes.update({k: int(v) for k, v in axis_sizes.items() if k not in sizes})
    else:
        if len(axis_sizes) != len(MESH_AXES):
            raise ValueError(f"give sizes for {MESH_AXES}, got {tuple(axis_sizes)}")
        sizes = dict(zip(MESH_AXES, (int(s) for s in axis_sizes)))
    devices = list(jax.devices() if devices is None else devices)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one axis size may be -1, got {sizes}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into axes {sizes}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
    names = tuple(sizes)
    return jax.make_mesh(
        tuple(sizes.values()),
        names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(names),
        devices=devices,
    )


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh | Any, rules: Rules
) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axis names on `mesh`.

    Mesh axes absent from the mesh, of size 1, already used by an earlier
    dimension, or not dividing the dimension (when ``shape`` is given) are dropped.
    """
    table = dict(rules)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else dict(mesh.shape)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        extent = 1
        for axis in axes:
            size = sizes.get(axis, 1)
            if axis in used or size == 1:
                continue
            if shape is not None and shape[dim] % (extent * size):
                continue
            kept.append(axis)
            extent *= size
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, x.shape, mesh, rules)
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


def variable_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on a variable (None when it has none)."""
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def state_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every array of an nnx State / graph (abstract or concrete), from logical names.

    Works for model states and for optimizer states whose variables copied the
    parameters' metadata (nnx.Optimizer does). Arrays without names are replicated.
    """

    def one(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            names = variable_names(leaf)
            shape = getattr(value, "shape", ())
            spec = logical_to_spec(names, shape, mesh, rules) if names else PartitionSpec()
            return leaf.replace(NamedSharding(mesh, spec))
        if hasattr(leaf, "shape"):
            return NamedSharding(mesh, PartitionSpec())
        return leaf

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def spec_tree(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Like `state_shardings` but PartitionSpecs (e.g. for shard_map or jit under `jax.set_mesh`)."""
    return jax.tree.map(
        lambda s: s.spec if isinstance(s, NamedSharding) else s,
        state_shardings(tree, mesh, rules),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )

