"""Differentiable face attributes for DFREC's attribute loss, from face-api's small nets.

The weights are the TF.js models of the npm package `@vladmandic/face-api@1.7.15` (MIT), read
with `tfjs.load` and ported to Flax following the package's TypeScript source:
- landmarks: FaceLandmark68Net, four depthwise-separable dense blocks on 112x112 -> 68 (x, y)
  points, as fractions of the image width/height;
- expression: FaceExpressionNet, the same backbone -> softmax over 7 expressions;
- age_gender: AgeGenderNet, a TinyXception backbone -> age in years and P(male).

All three take RGB in [0, 255] minus the mean (122.782, 117.001, 104.298), divided by 255.
`AttributeNet` does the resize and that normalisation itself, in jnp, so it is jittable and
differentiable w.r.t. the images; the weights are constants (no gradient flows into them).

Plug-in point: `load_attribute_net(kind=...)` also accepts any callable images [B,H,W,3] in
[0,1] -> [B,A] (e.g. a user's CelebA attribute classifier), or a name registered with
`register_attribute_net(name, factory)`.
"""

import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax.models import layers
from dfrec_jax.pretrained import checkpoint, tfjs, weights

FACE_API_VERSION = "1.7.15"
ENV_DIR = "DFREC_FACE_API_DIR"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DIR = os.path.join(_REPO, ".venv", "share", f"face-api-{FACE_API_VERSION}", "model")
SETUP_HINT = (
    f"run `./run.sh` once (it extracts npm @vladmandic/face-api@{FACE_API_VERSION} into "
    f"{os.path.relpath(DEFAULT_DIR, _REPO)}) or set {ENV_DIR} to a folder with its model/ files"
)

# Head -> TF.js model name in face-api's model/ folder.
_MODELS = {
    "landmarks": "face_landmark_68_model",
    "expression": "face_expression_model",
    "age_gender": "age_gender_model",
}
# The files used, pinned (from the npm tarball with sha256 0d77fffeef36...b031). Same format as
# `sha256sum` output, so run.sh can check the extracted files with `sha256sum -c`.
SHA256SUMS = """\
ca4886639f86e99b39fed0c155f81b63317225773bd9616716e887b0153389c9  face_landmark_68_model-weights_manifest.json
4611ef65c87d836d03d684b30eec4d195d8b219fa1dd58fc58945831c6b9299b  face_landmark_68_model.bin
5b349c17c7836da506e03422cd6461c74085d8bb2713ad4114647dc5d28174c8  face_expression_model-weights_manifest.json
9a9840f2cf1f4c7eab95f197512569345c00d2426754d4608b92af30e0300f3d  face_expression_model.bin
74b60bf3ebf981bf4e661e9cca3a185614e10b25d797118b62e2a68d3ff2569f  age_gender_model-weights_manifest.json
49f92bbc0afef2342c4385e4a2b0acb6d7a727c6f0aa539499719a81acf9abaa  age_gender_model.bin
"""  # noqa: E501
SHA256 = {name: sha for sha, name in (line.split() for line in SHA256SUMS.splitlines())}

INPUT_SIZE = 112
MEAN_RGB = (122.782, 117.001, 104.298)
HEADS = ("landmarks", "expression", "age_gender")
EXPRESSIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")
AGE_SCALE = 100.0  # age enters the attribute vector in units of 100 years, next to [0,1] values

# Index of each landmark's mirror image (iBUG 68-point scheme) under a horizontal flip.
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # eyebrows
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]
)  # inner lips


# ----------------------------------------------------------------------------- layers


class Conv(nn.Module):
    """Plain 'same' convolution with bias (tf.conv2d + bias)."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = layers.conv_general_dilated(
            x, kernel, (self.strides,) * 2, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + bias


class SeparableConv(nn.Module):
    """tf.separableConv2d (3x3 depthwise with the stride, then 1x1 pointwise) + bias."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        depthwise = self.param(
            "depthwise_kernel", nn.initializers.lecun_normal(), (3, 3, 1, c), self.param_dtype
        )
        pointwise = self.param(
            "pointwise_kernel",
            nn.initializers.lecun_normal(),
            (1, 1, c, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, depthwise, pointwise, bias = nn.dtypes.promote_dtype(
            x, depthwise, pointwise, bias, dtype=self.dtype
        )
        y = layers.depthwise_conv(x, depthwise, self.strides, "SAME")
        return jnp.einsum("bhwc,cd->bhwd", y, pointwise[0, 0]) + bias


# ----------------------------------------------------------------------------- backbones


class DenseBlock4(nn.Module):
    """face-api denseBlock4: four convs, each fed the relu of the sum of the previous outputs."""

    features: int
    first: bool = False  # the first block starts with a plain conv instead of a separable one
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.first:
            out = Conv(self.features, 3, 2, dtype=self.dtype, name="conv0")(x)
        else:
            out = SeparableConv(self.features, 2, dtype=self.dtype, name="conv0")(x)
        outs = [nn.relu(out)]
        for i in (1, 2, 3):
            x_in = outs[0] if i == 1 else nn.relu(sum(outs))
            outs.append(SeparableConv(self.features, 1, dtype=self.dtype, name=f"conv{i}")(x_in))
        return nn.relu(sum(outs))


def _dense_backbone(x, dtype):
    """FaceFeatureExtractor: 112 -> 7x7x256 -> 7x7 average pool -> [B, 256]."""
    for i, features in enumerate((32, 64, 128, 256)):
        x = DenseBlock4(features, first=i == 0, dtype=dtype, name=f"dense{i}")(x)
    x = nn.avg_pool(x, (7, 7), (2, 2), "VALID")
    return x.reshape(x.shape[0], -1)


class FaceLandmark68Net(nn.Module):
    """Normalised 112x112 input -> [B, 68, 2] (x, y) as fractions of the input size."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = _dense_backbone(x, self.dtype)
        out = nn.Dense(136, dtype=self.dtype, name="fc")(features)
        return out.reshape(out.shape[0], 68, 2)


def _softmax(logits):
    # In float32 whatever the compute dtype: its exp and sum are where bfloat16 loses most.
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class FaceExpressionNet(nn.Module):
    """Normalised 112x112 input -> [B, 7] expression probabilities (order: EXPRESSIONS)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = _dense_backbone(x, self.dtype)
        return _softmax(nn.Dense(7, dtype=self.dtype, name="fc")(features))


class ReductionBlock(nn.Module):
    features: int
    activate_input: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = nn.relu(x) if self.activate_input else x
        out = SeparableConv(self.features, dtype=self.dtype, name="separable_conv0")(out)
        out = SeparableConv(self.features, dtype=self.dtype, name="separable_conv1")(nn.relu(out))
        out = layers.max_pool(out, (3, 3), (2, 2), "SAME")
        return out + Conv(self.features, 1, 2, dtype=self.dtype, name="expansion_conv")(x)


class MainBlock(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = x
        for i in range(3):
            out = SeparableConv(self.features, dtype=self.dtype, name=f"separable_conv{i}")(
                nn.relu(out)
            )
        return out + x


class EntryFlow(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Conv(32, 3, 2, dtype=self.dtype, name="conv_in")(x))
        x = ReductionBlock(64, False, dtype=self.dtype, name="reduction_block_0")(x)
        return ReductionBlock(128, dtype=self.dtype, name="reduction_block_1")(x)


class MiddleFlow(nn.Module):
    num_blocks: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_blocks):
            x = MainBlock(128, dtype=self.dtype, name=f"main_block_{i}")(x)
        return x


class ExitFlow(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ReductionBlock(256, dtype=self.dtype, name="reduction_block")(x)
        return nn.relu(SeparableConv(512, dtype=self.dtype, name="separable_conv")(x))


class AgeGenderHead(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        age = nn.Dense(1, dtype=self.dtype, name="age")(x)[:, 0].astype(jnp.float32)
        gender = _softmax(nn.Dense(2, dtype=self.dtype, name="gender")(x))
        return age, gender[:, 0]  # face-api's class 0 is male


class AgeGenderNet(nn.Module):
    """TinyXception(2) -> 7x7 average pool -> (age in years [B], P(male) [B])."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = EntryFlow(dtype=self.dtype, name="entry_flow")(x)
        x = MiddleFlow(2, dtype=self.dtype, name="middle_flow")(x)
        x = ExitFlow(dtype=self.dtype, name="exit_flow")(x)
        x = nn.avg_pool(x, (7, 7), (2, 2), "VALID")
        return AgeGenderHead(dtype=self.dtype, name="fc")(x.reshape(x.shape[0], -1))


class FaceApiAttributes(nn.Module):
    """The selected heads on one normalised 112x112 batch; returns a dict of outputs."""

    heads: Sequence[str] = HEADS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = {}
        if "landmarks" in self.heads:
            out["landmarks"] = FaceLandmark68Net(self.dtype, name="landmarks")(x)
        if "expression" in self.heads:
            out["expression"] = FaceExpressionNet(self.dtype, name="expression")(x)
        if "age_gender" in self.heads:
            out["age"], out["gender_male"] = AgeGenderNet(self.dtype, name="age_gender")(x)
        return out


def preprocess(images: jax.Array) -> jax.Array:
    """[B,S,S,3] in [0,1] -> [B,112,112,3] with face-api's normalisation, differentiably.

    Resizing is antialiased bilinear with half-pixel centres (face-api resizes with TF's legacy
    bilinear, which shifts the image by up to half a source pixel; we do not copy that).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"attribute net: expected square [B,S,S,3] images, got {images.shape}")
    images = images.astype(jnp.float32)
    if images.shape[1] != INPUT_SIZE:
        shape = (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3)
        images = jax.image.resize(images, shape, "linear", antialias=True)
    return images - jnp.asarray(MEAN_RGB, jnp.float32) / 255.0


# ----------------------------------------------------------------------------- weights


def _tfjs_rules(head: str, names: Sequence[str]) -> list[checkpoint.Rule]:
    """Flax leaf for each TF.js tensor: same path, leaf renamed, depthwise HWC1 -> HW1C."""
    rename = {
        "filters": "kernel",
        "weights": "kernel",
        "bias": "bias",
        "pointwise_filter": "pointwise_kernel",
        "depthwise_filter": "depthwise_kernel",
    }
    rules = []
    for name in names:
        *path, leaf = name.split("/")
        transform = checkpoint.identity
        if leaf == "depthwise_filter":
            transform = functools.partial(np.transpose, axes=(0, 1, 3, 2))
        target = "/".join(["params", head, *path, rename[leaf]])
        rules.append(checkpoint.Rule(target, name, transform))
    return rules


def face_api_dir(directory: str | None = None) -> str:
    """Where the face-api model files are read: `directory`, else $DFREC_FACE_API_DIR, else
    .venv/share/face-api-1.7.15/model inside the repository."""
    return directory or os.environ.get(ENV_DIR) or DEFAULT_DIR


def _verified(directory: str, filename: str) -> str:
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        raise weights.MissingWeightsError(
            f"face-api {filename}: weight file not found at {path}; {SETUP_HINT}"
        )
    return weights.verify(path, SHA256[filename], f"face-api {filename}")


def load_face_api_variables(directory: str | None = None, heads: Sequence[str] = HEADS) -> dict:
    """Flax variables for `FaceApiAttributes(heads)` from the pinned face-api model files."""
    directory = face_api_dir(directory)
    unknown = set(heads) - set(HEADS)
    if unknown or not heads:
        raise ValueError(f"attribute heads must be a non-empty subset of {HEADS}, got {heads}")
    module = FaceApiAttributes(tuple(heads))
    shapes = jax.eval_shape(
        module.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state, rules = {}, []
    for head in heads:
        model = _MODELS[head]
        manifest = _verified(directory, f"{model}-weights_manifest.json")
        for shard in tfjs.shard_paths(manifest):
            _verified(directory, os.path.basename(shard))
        tensors = tfjs.load(manifest)
        state.update({f"{head}:{k}": v for k, v in tensors.items()})
        rules += [
            checkpoint.Rule(r.target, f"{head}:{r.source}", r.transform)
            for r in _tfjs_rules(head, list(tensors))
        ]
    variables, report = checkpoint.fill(template, state, rules)
    if report.missing or report.unexpected:
        raise checkpoint.ConversionError(
            f"face-api conversion incomplete: {report.summary()} "
            f"({(report.missing + report.unexpected)[:3]})"
        )
    return variables


# ----------------------------------------------------------------------------- public API


def _to_vector(out: dict[str, jax.Array]) -> jax.Array:
    """The named outputs as one [B, A] vector, in the order of `attribute_names()`."""
    parts = []
    if "landmarks" in out:
        parts.append(out["landmarks"].reshape(out["landmarks"].shape[0], -1))
    if "expression" in out:
        parts.append(out["expression"])
    if "age" in out:
        parts += [out["age"][:, None] / AGE_SCALE, out["gender_male"][:, None]]
    return jnp.concatenate(parts, axis=-1).astype(jnp.float32)


@jax.tree_util.register_pytree_node_class
class AttributeNet:
    """Face attribute vector [B, A] from images [B,S,S,3] in [0,1] (any square size S).

    Layout (see `attribute_names()`): 68 landmarks as x0, y0, x1, y1, ... in fractions of the
    image size; 7 expression probabilities; age / 100; P(male). Heads left out are absent.
    Jittable and differentiable w.r.t. the images; the weights are constants. A pytree (the
    weights are its leaves, heads and dtype static), so a jitted step can take it as an
    argument instead of baking 4 MB of weights into its program.
    """

    def __init__(self, variables: dict, heads: Sequence[str] = HEADS, dtype: Any = jnp.float32):
        self.heads = tuple(h for h in HEADS if h in heads)  # fixed order, whatever was given
        self.dtype = dtype
        self.module = FaceApiAttributes(self.heads, dtype=dtype)
        self.variables = jax.tree.map(jnp.asarray, variables)

    def tree_flatten(self):
        return (self.variables,), (self.heads, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        net = object.__new__(cls)  # leaves may be tracers: no jnp.asarray of them
        net.heads, net.dtype = aux
        net.module = FaceApiAttributes(net.heads, dtype=net.dtype)
        (net.variables,) = children
        return net

    @classmethod
    def load(
        cls, directory: str | None = None, heads: Sequence[str] = HEADS, dtype: Any = jnp.float32
    ) -> "AttributeNet":
        """The face-api nets from `directory` (default: $DFREC_FACE_API_DIR or the venv copy).

        Raises MissingWeightsError (one line, with the setup command) if a file is absent.
        """
        return cls(load_face_api_variables(directory, heads), heads, dtype)

    def astype(self, dtype) -> "AttributeNet":
        """These nets computing in `dtype` (e.g. bfloat16), their weights stored in `dtype`;
        preprocessing, the softmaxes and the returned vector stay float32."""
        return AttributeNet(checkpoint.cast_floating(self.variables, dtype), self.heads, dtype)

    def apply(self, images):
        variables = jax.lax.stop_gradient(self.variables)  # frozen: gradients reach the images only
        return self.module.apply(variables, preprocess(images))

    def predict(self, images: jax.Array) -> dict[str, jax.Array]:
        """Named outputs: landmarks [B,68,2] (x, y in [0,1]), expression [B,7], age [B] in
        years, gender_male [B], for the loaded heads."""
        return _predict(self, images)

    def __call__(self, images: jax.Array) -> jax.Array:
        return _vector(self, images)

    def attribute_names(self) -> list[str]:
        names = []
        if "landmarks" in self.heads:
            names += [f"landmark{i}_{axis}" for i in range(68) for axis in "xy"]
        if "expression" in self.heads:
            names += [f"expression_{e}" for e in EXPRESSIONS]
        if "age_gender" in self.heads:
            names += ["age_years_div100", "gender_male_prob"]
        return names


@jax.jit
def _predict(net: AttributeNet, images):
    return net.apply(images)


@jax.jit
def _vector(net: AttributeNet, images):
    return _to_vector(net.apply(images))


AttributeFn = Callable[[jax.Array], jax.Array]  # images [B,H,W,3] in [0,1] -> [B,A]

_FACTORIES: dict[str, Callable[[str | None], AttributeFn]] = {
    "face-api": lambda path: AttributeNet.load(path),
    "face-api-landmarks": lambda path: AttributeNet.load(path, heads=("landmarks",)),
}


def register_attribute_net(name: str, factory: Callable[[str | None], AttributeFn]) -> None:
    """Makes `load_attribute_net(kind=name, path=p)` return `factory(p)`.

    The factory's result must be a jittable callable images [B,H,W,3] in [0,1] -> [B,A] (e.g.
    a CelebA attribute classifier returning 40 sigmoid probabilities); DFREC's attribute loss
    compares its outputs for the recovered and the true target face with smooth L1.
    """
    _FACTORIES[name] = factory


def load_attribute_net(
    kind: str | AttributeFn = "face-api", path: str | None = None
) -> AttributeFn:
    """The attribute extractor for the attribute loss.

    `kind`: "face-api" (landmarks + expression + age/gender, 145 values), "face-api-landmarks"
    (136 values), a name given to `register_attribute_net`, or any callable images -> [B,A],
    which is returned as is (the plug-in point for a user's own classifier). `path`: the
    weight folder or file handed to the factory (face-api: the model/ folder).
    """
    if callable(kind):
        return kind
    if kind not in _FACTORIES:
        raise ValueError(
            f"unknown attribute net {kind!r}; known: {sorted(_FACTORIES)} "
            "(or pass a callable images -> [B,A])"
        )
    return _FACTORIES[kind](path)
