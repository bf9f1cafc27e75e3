"""The training batch as the jitted step sees it (no TensorFlow here: GPU hosts lack it)."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

IMAGE_KEYS = ("image", "source", "target", "mask")
FLOAT_KEYS = ("label", "has_mask", "valid")


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Batch axis split over the mesh's "data" and "fsdp" axes (those that exist)."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))


def normalize_batch(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """uint8 pipeline batch -> the float32 [0, 1] batch losses.total_loss reads (jittable).

    Images travel as uint8 (4x less host->device traffic) and are scaled on the device:
    image/source/target/mask / 255; label, has_mask and valid as float32; other keys unchanged.
    """
    out = dict(batch)
    for k in IMAGE_KEYS:
        if k in out:
            out[k] = jnp.asarray(out[k], jnp.float32) / 255.0
    for k in FLOAT_KEYS:
        if k in out:
            out[k] = jnp.asarray(out[k], jnp.float32)
    return out
