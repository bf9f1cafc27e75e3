"""dlib's ResNet face descriptor (dlib_face_recognition_resnet_model_v1) in Flax.

An identity judge independent of FaceNet: 128-D descriptors compared with Euclidean distance
(dlib's threshold 0.6 for "same person"). The weights come from the PyPI package
face-recognition-models and are read by `dlib_format` without dlib.

Architecture (dlib's dnn_face_recognition_ex): conv 7x7/2 (32) + affine + relu, max-pool 3x3/2,
then residual stages of 32, 64, 128, 256, 256 channels with 3, 4, 3, 3, 1 blocks. A block is
conv 3x3 + affine + relu + conv 3x3 + affine, added to its input, then relu. The first block of
every stage but the first downsamples: its first conv has stride 2 and no padding, and the
shortcut is a 2x2/2 average pool; dlib's add_prev zero-pads the smaller operand (channels,
and rows/columns at the bottom/right) to the larger shape. Global average pool, fc 256->128
without bias. "affine" is dlib's frozen batch norm: x * gamma + beta per channel.
"""

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from dfrec_jax.models import layers
from dfrec_jax.pretrained import dlib_format, weights

CHIP_SIZE = 150
MEAN_RGB = (122.782, 117.001, 104.298)  # dlib's input_rgb_image_sized averages, 0..255 scale
# (features, blocks, whether the first block downsamples): dlib's alevel4 .. alevel0.
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
STEM_FEATURES = 32
EMBED_DIM = 128
NUM_PARAMS = 5_614_592
THRESHOLD = 0.6  # dlib: descriptors closer than this are the same person


class Affine(nn.Module):
    """dlib's affine_ layer (a batch norm frozen into a per-channel scale and shift)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _add_zero_padded(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib's add_prev: the sum over the larger shape, missing entries (at the end) being zero."""
    shape = tuple(max(m, n) for m, n in zip(a.shape, b.shape))

    def pad(x):
        return jnp.pad(x, [(0, s - n) for s, n in zip(shape, x.shape)])

    return pad(a) + pad(b)


class DlibResNet(nn.Module):
    """[B,150,150,3] RGB in [0,1] -> [B,128] descriptors (not normalised), dlib's network.

    Parameters are flat: conv_i and affine_i (i = 0..28, in forward order) and fc.
    """

    mean_rgb: tuple[float, float, float] = MEAN_RGB
    stages: tuple[tuple[int, int, bool], ...] = STAGES
    stem_features: int = STEM_FEATURES
    embed_dim: int = EMBED_DIM
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        index = itertools.count()

        def conv_affine(x, features, kernel, stride):
            i = next(index)
            # dlib's default padding: kernel//2 for stride 1, none for strided convolutions.
            pad = kernel // 2 if stride == 1 else 0
            x = layers.Conv(
                features,
                (kernel, kernel),
                (stride, stride),
                ((pad, pad), (pad, pad)),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv_{i}",
            )(x)
            return Affine(self.dtype, self.param_dtype, name=f"affine_{i}")(x)

        mean = jnp.asarray(self.mean_rgb, jnp.float32)
        x = ((images.astype(jnp.float32) * 255.0 - mean) / 256.0).astype(self.dtype)
        x = nn.relu(conv_affine(x, self.stem_features, 7, 2))
        x = layers.max_pool(x, (3, 3), (2, 2))
        for features, blocks, downsample in self.stages:
            for b in range(blocks):
                stride = 2 if downsample and b == 0 else 1
                y = nn.relu(conv_affine(x, features, 3, stride))
                y = conv_affine(y, features, 3, 1)
                shortcut = nn.avg_pool(x, (2, 2), (2, 2)) if stride == 2 else x
                x = nn.relu(_add_zero_padded(y, shortcut))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(
            self.embed_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc",
        )(x)
        return x.astype(jnp.float32)


def _forward_layers() -> list[tuple]:
    """dlib's layer sequence for DlibResNet, in forward order, as the file stores it."""
    seq = [("con", STEM_FEATURES, 7, 2, 0), ("affine",), ("relu",), ("max_pool", 3, 2, 0)]
    for features, blocks, downsample in STAGES:
        for b in range(blocks):
            stride = 2 if downsample and b == 0 else 1
            seq += [("tag",), ("con", features, 3, stride, 1 if stride == 1 else 0), ("affine",)]
            seq += [("relu",), ("con", features, 3, 1, 1), ("affine",)]
            if stride == 2:  # add_prev2<avg_pool<skip1<tag2<block>>>>
                seq += [("tag",), ("skip",), ("avg_pool", 2, 2, 0)]
            seq += [("add_prev",), ("relu",)]
    return seq + [("avg_pool", 0, 1, 0), ("fc", EMBED_DIM)]


def wrapper_kinds() -> list[str]:
    """The file's wrappers, outermost first, for `dlib_format.read_network`."""
    return [e[0] if e[0] in ("tag", "skip") else "layer" for e in reversed(_forward_layers())]


def _check(layer: dlib_format.Layer, expected: tuple, where: str) -> None:
    """Refuses a file layer that differs from what DlibResNet computes."""
    kind = expected[0]
    f = layer.fields
    if layer.type != kind:
        raise ValueError(f"{where}: found a {layer.type!r} layer, expected {kind!r}")
    if kind == "con":
        got = (f["num_filters"], f["nr"], f["nc"], f["stride"], f["padding"], f["use_bias"])
        _, n, k, s, p = expected
        if got != (n, k, k, (s, s), (p, p), True):
            raise ValueError(f"{where}: con {got} differs from the expected ({n}, {k}x{k}/{s})")
    elif kind in ("max_pool", "avg_pool"):
        _, k, s, p = expected
        if (f["nr"], f["nc"], f["stride"], f["padding"]) != (k, k, (s, s), (p, p)):
            raise ValueError(f"{where}: {kind} {f} differs from {k}x{k}/{s}")
    elif kind == "affine" and (f["disabled"] or f["mode"] != 0):
        raise ValueError(f"{where}: affine layer is disabled or not in conv mode")
    elif kind == "relu" and f.get("disabled", False):
        raise ValueError(f"{where}: relu layer is disabled")
    elif kind == "fc":
        got = (f["num_inputs"], f["num_outputs"], f["use_bias"])
        if got != (STAGES[-1][0], expected[1], False):
            raise ValueError(f"{where}: fc (inputs, outputs, bias) {got} differs")


def load_variables(path: str | None = None) -> dict:
    """{"params": numpy tree} for DlibResNet from dlib_face_recognition_resnet_model_v1.dat."""
    path = weights.locate(weights.DLIB_RESNET, path)
    expected = _forward_layers()
    net = dlib_format.read_network(path, wrapper_kinds())
    size = (net.input.fields["nr"], net.input.fields["nc"])
    mean = np.float32(net.input.fields["mean"])
    if size != (CHIP_SIZE, CHIP_SIZE) or not np.array_equal(mean, np.float32(MEAN_RGB)):
        raise ValueError(f"{path}: input {size} mean {tuple(mean)} differ from DlibResNet's")
    params, i = {}, 0
    for n, (layer, exp) in enumerate(zip(net.layers, expected)):
        _check(layer, exp, f"{path}: layer {n}")
        f = layer.fields
        if layer.type == "con":
            params[f"conv_{i}"] = {
                "kernel": np.ascontiguousarray(f["filters"].transpose(2, 3, 1, 0)),  # OIHW->HWIO
                "bias": f["biases"],
            }
        elif layer.type == "affine":
            params[f"affine_{i}"] = {"scale": f["gamma"].reshape(-1), "bias": f["beta"].reshape(-1)}
            i += 1
        elif layer.type == "fc":
            # dlib's fc computes x @ W with W stored as (num_inputs, num_outputs).
            params["fc"] = {"kernel": f["weights"].reshape(f["num_inputs"], f["num_outputs"])}
    return {"params": params}


def _resize(images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    if h != w or c != 3:
        raise ValueError(f"dlib descriptor: expected square RGB images, got shape {images.shape}")
    if h == CHIP_SIZE:
        return images
    return jax.image.resize(images, (b, CHIP_SIZE, CHIP_SIZE, c), "bilinear", antialias=True)


class DlibDescriptor(struct.PyTreeNode):
    """Frozen dlib face descriptor: `descriptor(images [B,S,S,3] in [0,1]) -> [B,128]`.

    A pytree (params are leaves), so it can be passed into or closed over by jitted code;
    gradients flow to the images only. Images are resized to 150x150 (bilinear) inside.
    Descriptors are not normalised: compare them with `distance` (same person below 0.6).
    """

    params: Any
    module: DlibResNet = struct.field(pytree_node=False, default_factory=DlibResNet)

    @classmethod
    def load(cls, path: str | None = None) -> "DlibDescriptor":
        return cls(params=jax.tree.map(jnp.asarray, load_variables(path)["params"]))

    def __call__(self, images: jax.Array) -> jax.Array:
        params = jax.lax.stop_gradient(self.params)
        return self.module.apply({"params": params}, _resize(jnp.asarray(images, jnp.float32)))


@jax.custom_jvp
def _safe_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


@_safe_norm.defjvp
def _safe_norm_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    norm = _safe_norm(x)
    # Zero gradient at zero distance instead of NaN.
    unit = x / jnp.where(norm > 0, norm, 1.0)[..., None]
    return norm, jnp.sum(unit * dx, axis=-1)


def distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Euclidean distance between descriptors along the last axis (dlib: same person < 0.6)."""
    return _safe_norm(jnp.asarray(a) - jnp.asarray(b))
