"""The two identity networks evaluation, recovery evidence and tracing use.

FaceNet (Inception-ResNet v1, the paper's IDSim) and dlib's ResNet face descriptor, an
independently trained network: a recovery that only fools FaceNet (the net the identity loss
trains against) shows up as a gap between the two. Both embed float [B,S,S,3] images in [0,1]
of any square size; similarities are cosines of the embeddings (dlib's own same-person rule is
a Euclidean distance < 0.6 between descriptors, reported by `trace` too).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax import losses
from dfrec_jax.pretrained import dlib_resnet, facenet

Embed = Callable[[jax.Array], jax.Array]
NAMES = ("facenet", "dlib")


def cosine(a, b) -> jax.Array:
    """Cosine similarity of embeddings a, b [..., D] along the last axis (symmetric; 1.0 for
    equal non-zero vectors)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    na = jnp.sqrt(jnp.sum(a * a, axis=-1))
    nb = jnp.sqrt(jnp.sum(b * b, axis=-1))
    return jnp.sum(a * b, axis=-1) / jnp.maximum(na * nb, 1e-12)


@dataclasses.dataclass(frozen=True)
class IdentityNets:
    """Embedding functions by name ("facenet", "dlib"): images [B,S,S,3] in [0,1] -> [B,D]."""

    facenet: Embed
    dlib: Embed

    def embed(self, images) -> dict[str, jax.Array]:
        return {name: getattr(self, name)(images) for name in NAMES}


def load(eval_config) -> IdentityNets:
    """The real networks (weights from registry packages or the config's paths), jitted."""
    net = facenet.load_named(eval_config.identity_net, eval_config.identity_weights, "eval")
    descriptor = dlib_resnet.DlibDescriptor.load(eval_config.dlib_weights or None)
    # Partial pytrees: jitted callers can take the weights as arguments (not constants).
    return IdentityNets(
        facenet=jax.tree_util.Partial(_facenet_embedding, net),
        dlib=jax.tree_util.Partial(_dlib_descriptor, descriptor),
    )


def _facenet_embedding(net, images) -> jax.Array:
    return net(images)["embedding"]


def _dlib_descriptor(descriptor, images) -> jax.Array:
    return descriptor(images)


@functools.lru_cache(maxsize=4)
def _jitted_embed(nets: IdentityNets):
    """One jitted embedding per nets, so every call with these nets shares its compiles. The
    networks' weights (placed once) are an argument of the program, not constants in it
    (losses.split_frozen): closed over, FaceNet's and dlib's ~110 MB went into every compile
    (2.0 s instead of 0.6 s at batch 16 under the tests' XLA flags) and into every persistent
    compilation cache entry (zlib-compressing it took 4.4 s per program)."""
    arrays, rebuild = split(nets)
    jitted = jax.jit(lambda x, arrays: rebuild(arrays).embed(x.astype(jnp.float32) / 255.0))
    return losses.BoundToFrozen(jitted, jax.device_put(arrays))


def split(nets: IdentityNets):
    """(arrays, rebuild): the networks' weight arrays and `rebuild(arrays) -> IdentityNets`
    (`losses.split_frozen`), for jitted functions that take the weights as an argument."""
    arrays, layout = losses.split_frozen({name: getattr(nets, name) for name in NAMES})
    return arrays, lambda arrays: IdentityNets(**layout(arrays))


def embed_all(nets: IdentityNets, images: list[np.ndarray], batch_size: int):
    """{net name: float64 [N,D]} embeddings of uint8 images; grouped by size, each group in
    padded batches of `batch_size` (one compile per size)."""
    embed = _jitted_embed(nets)
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    result: dict[str, np.ndarray] = {}
    for shape, indices in sorted(by_size.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = np.zeros((batch_size, *shape), np.uint8)
            batch[: len(chunk)] = [images[i] for i in chunk]
            out = jax.device_get(embed(batch))
            for name, values in out.items():
                if name not in result:
                    result[name] = np.zeros((len(images), values.shape[-1]), np.float64)
                result[name][chunk] = values[: len(chunk)]
    return result
