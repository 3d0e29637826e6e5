"""Cloud TPU accelerator types: which exist, how many chips and hosts, HBM per chip, and abstract TPU devices.

Standard library only at import time (`launch/tpu.py` validates accelerator names with it before
any JAX is installed); `devices` imports JAX and needs libtpu, which compiles for any TPU topology
on a machine without a TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any

from pdjax.cli_errors import UserError

GB = 10**9
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: accelerator-type prefix, default runtime, host shape, and the slice sizes Cloud TPU offers."""

    prefix: str
    runtime: str
    chips_per_host: int
    cores_per_chip: int  # v4 and v5p count TensorCores in the accelerator type (2 per chip)
    single_host_chips: int  # the largest slice that is one VM
    sizes: tuple[int, ...]  # the N of <prefix>-N that exist
    topology: str  # libtpu's name of the generation (the part before ':' of a topology string)
    hbm_bytes: int  # HBM per chip, as Cloud TPU states it
    dims: int  # 3 for the 3D tori of v4 / v5p, 2 for v5e / v6e


# Cloud TPU's accelerator types (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}): v4 and v5p slices are 2x2x1, 2x2x2,
# 2x2x4 and 2x4x4 chips, then whole 4x4x4 cubes (64 chips = 128 TensorCores) up to the largest slice (v4: 4,096
# chips; v5p: 16x16x24 = 6,144 chips); v5e and v6e slices are 1, 4, 8, ... 256 chips. HBM per chip: v4 32 GiB,
# v5e 16 GB, v5p 95 GB, v6e 32 GB (the same pages).
_CUBES = (8, 16, 32, 64)
GENERATIONS = {
    "v4": Generation("v4", "tpu-ubuntu2204-base", 4, 2, 4, _CUBES + tuple(range(128, 8192 + 1, 128)), "v4",
                     32 * GiB, 3),
    "v5e": Generation("v5litepod", "v2-alpha-tpuv5-lite", 4, 1, 8, (1, 4, 8, 16, 32, 64, 128, 256), "v5e",
                      16 * GB, 2),
    "v5p": Generation("v5p", "v2-alpha-tpuv5", 4, 2, 4, _CUBES + tuple(range(128, 12288 + 1, 128)), "v5p",
                      95 * GB, 3),
    "v6e": Generation("v6e", "v2-alpha-tpuv6e", 4, 1, 8, (1, 4, 8, 16, 32, 64, 128, 256), "v6e", 32 * GB, 2),
}
ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}  # names people type for gcloud's v5litepod
LIBTPU_INSTALL = 'pip install "jax[tpu]"  (or: pip install -e ".[test]", which pins libtpu as CI does)'


class AcceleratorError(UserError, ValueError):
    """An accelerator type Cloud TPU does not offer."""


def _sizes_hint(gen: Generation) -> str:
    small = [s for s in gen.sizes if s <= 256]
    more = f", ... {gen.sizes[-1]} (whole cubes: multiples of 128)" if gen.sizes[-1] > 256 else ""
    return ", ".join(str(s) for s in small) + more


def parse_accelerator(accelerator: str) -> tuple[Generation, int]:
    """('v5p-32') -> (v5p generation, number of hosts); an `AcceleratorError` for a type that does not exist."""
    gen, chips = slice_chips(accelerator)
    hosts = 1 if chips <= gen.single_host_chips else chips // gen.chips_per_host
    return gen, hosts


def slice_chips(accelerator: str) -> tuple[Generation, int]:
    """('v5p-32') -> (v5p generation, 16 chips); an `AcceleratorError` for a type that does not exist."""
    prefix, _, size = accelerator.rpartition("-")
    if not prefix or not size.isdigit():
        raise AcceleratorError(f"accelerator type {accelerator!r} is not of the form <type>-<size>, e.g. v5p-32")
    count = int(size)
    if prefix in ALIASES:
        raise AcceleratorError(f"unknown accelerator type {accelerator!r}; gcloud calls it {ALIASES[prefix]}-{size}")
    for gen in GENERATIONS.values():
        if gen.prefix == prefix:
            if count not in gen.sizes:
                unit = "TensorCores" if gen.cores_per_chip > 1 else "chips"
                raise AcceleratorError(f"{accelerator!r} is not a Cloud TPU slice: {prefix}-N counts {unit}, "
                                       f"N one of {_sizes_hint(gen)}")
            return gen, count // gen.cores_per_chip
    known = ", ".join(f"{g.prefix}-N" for g in GENERATIONS.values())
    raise AcceleratorError(f"unknown accelerator type {accelerator!r}; pdjax knows {known}")


def accelerator_type(text: str) -> str:
    """argparse type of an accelerator flag: the type itself, validated."""
    try:
        parse_accelerator(text)
    except AcceleratorError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _balanced(n: int, dims: int) -> tuple[int, ...]:
    """n as a product of `dims` factors as equal as possible, ascending (8 -> (2, 2, 2); 12 -> (2, 2, 3))."""
    out = []
    for left in range(dims, 0, -1):
        f = max(d for d in range(1, n + 1) if n % d == 0 and d <= round(n ** (1 / left)) + 1e-9) if left > 1 else n
        out.append(f)
        n //= f
    return tuple(sorted(out))


def chip_grid(gen: Generation, chips: int) -> tuple[int, ...]:
    """The chips of a slice as Cloud TPU lays them out: v4 / v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, then 4x4x4 cubes;
    v5e / v6e 1x1, 2x2, 2x4, then 4x4 and up (each side at most twice the other)."""
    if gen.dims == 3:
        small = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
        if chips in small:
            return small[chips]
        return tuple(4 * f for f in _balanced(chips // 64, 3))
    small = {1: (1, 1), 4: (2, 2), 8: (2, 4)}
    if chips in small:
        return small[chips]
    side = 2 ** (int(math.log2(chips)) // 2)
    return (side, chips // side)


def topology_name(accelerator: str) -> str:
    """libtpu's topology string of a Cloud TPU slice ('v5p-32' -> 'v5p:2x2x4', 'v6e-1' -> 'v6e:1x1')."""
    gen, chips = slice_chips(accelerator)
    return f"{gen.topology}:" + "x".join(str(d) for d in chip_grid(gen, chips))


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice to compile for: its name, generation, chip count and HBM per chip."""

    accelerator: str
    generation: Generation
    chips: int

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes

    @property
    def topology(self) -> str:
        return topology_name(self.accelerator)


def target(accelerator: str) -> Target:
    """The `Target` of an accelerator type; an `AcceleratorError` for one Cloud TPU does not offer."""
    gen, chips = slice_chips(accelerator)
    return Target(accelerator, gen, chips)


def libtpu_available() -> bool:
    """Whether libtpu (which compiles for TPU topologies without a TPU) is importable here."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def devices(accelerator: str) -> list[Any]:
    """Abstract TPU devices of the whole slice, to shard `jax.ShapeDtypeStruct`s over and compile for.

    Needs libtpu and a process in which JAX has not yet started another backend with XLA flags (run
    through `pdjax.aot`, which prepares its environment); a `UserError` says how to install libtpu.
    """
    if not libtpu_available():
        raise UserError(f"compiling for a TPU needs libtpu, which is not installed: {LIBTPU_INSTALL}")
    from jax.experimental import topologies

    t = target(accelerator)
    grid = chip_grid(t.generation, t.chips)
    per_host = grid if t.chips <= t.generation.single_host_chips else (2, 2, 1)[: len(grid)]
    bounds = tuple(per_host) + (1,) * (3 - len(per_host))
    config = "megacore" if t.generation.cores_per_chip > 1 else "default"
    desc = topologies.get_topology_desc(topology_name=t.topology, platform="tpu", chip_config_name=config,
                                        chips_per_host_bounds=bounds)
    found = list(desc.devices)
    if len(found) != t.chips:
        raise RuntimeError(f"libtpu made {len(found)} devices for {accelerator} ({t.topology}), expected {t.chips}")
    return found


def compile_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a compile-only TPU process needs: no metadata-server query, several libtpu processes allowed
    on one machine, and none of the CPU settings (fake devices, a forced platform) that would hide libtpu."""
    out = dict(os.environ if env is None else env)
    for key in ("JAX_PLATFORMS", "XLA_FLAGS"):
        out.pop(key, None)
    out.update(TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost")
    return out
