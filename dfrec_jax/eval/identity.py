"""The two identity networks evaluation, recovery evidence and tracing use.

FaceNet (Inception-ResNet v1, the paper's IDSim) and dlib's ResNet face descriptor, an
independently trained network: a recovery that only fools FaceNet (the net the identity loss
trains against) shows up as a gap between the two. Both embed float [B,S,S,3] images in [0,1]
of any square size; similarities are cosines of the embeddings (dlib's own same-person rule is
a Euclidean distance < 0.6 between descriptors, reported by `trace` too).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

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
