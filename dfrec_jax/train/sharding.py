"""Device mesh ("data", "fsdp") and the shape rule that shards parameters over "fsdp".

The batch is split over both axes (every device sees a different slice); a parameter (and its
optimizer moments) is split along its largest dimension divisible by the "fsdp" size when it
has at least `min_size` elements, and replicated otherwise. XLA's SPMD partitioner inserts the
all-gathers / reduce-scatters, so the step's code is the same for every mesh shape.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dfrec_jax.batch import batch_sharding

__all__ = [
    "AXES",
    "batch_sharding",
    "fsdp_spec",
    "make_mesh",
    "placed",
    "replicated",
    "tree_shardings",
]

AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Mesh with axes ("data", "fsdp") of sizes mesh_config.data x mesh_config.fsdp.

    One of the two sizes may be -1: all devices left. ValueError (one line) when the sizes do
    not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": int(mesh_config.data), "fsdp": int(mesh_config.fsdp)}
    free = [k for k, v in sizes.items() if v == -1]
    bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(free) > 1:
        raise ValueError(
            f"mesh sizes must be positive, with at most one -1 (all devices left); got "
            f"data={sizes['data']}, fsdp={sizes['fsdp']}"
        )
    if free:
        fixed = math.prod(v for k, v in sizes.items() if k != free[0])
        if n % fixed:
            raise ValueError(
                f"mesh: {n} devices cannot be split into {free[0]}=-1 x {fixed} "
                f"(data={sizes['data']}, fsdp={sizes['fsdp']})"
            )
        sizes[free[0]] = n // fixed
    shape = (sizes["data"], sizes["fsdp"])
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh data={shape[0]} x fsdp={shape[1]} = {math.prod(shape)} devices, "
            f"but {n} devices are available"
        )
    try:  # topology-aware order on TPU/GPU; plain order elsewhere
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """PartitionSpec sharding the largest dimension divisible by fsdp_size over "fsdp" when
    prod(shape) >= min_size (ties: the last such dimension); P() (replicated) otherwise."""
    shape = tuple(int(d) for d in shape)
    if fsdp_size <= 1 or not shape or math.prod(shape) < min_size:
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*([None] * axis), "fsdp")


def _leaf_sharding(leaf, mesh: Mesh, min_size: int) -> NamedSharding:
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if not shape or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return replicated(mesh)  # scalars (counters), ints, keys
    return NamedSharding(mesh, fsdp_spec(shape, mesh.shape["fsdp"], min_size))


def tree_shardings(tree, mesh: Mesh, min_size: int):
    """NamedSharding per leaf of `tree` (arrays or jax.ShapeDtypeStruct) by `fsdp_spec`;
    scalars and non-float leaves replicated."""
    return jax.tree.map(lambda leaf: _leaf_sharding(leaf, mesh, min_size), tree)


def placed(abstract, shardings):
    """`abstract`'s leaves as jax.ShapeDtypeStructs carrying the matching leaf of `shardings`
    (restore targets, ahead-of-time lowering)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
