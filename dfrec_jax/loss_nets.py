"""Builds the frozen networks of the training loss (`losses.LossNets`) from `config.loss`.

Every network is a real pretrained one, read offline (dfrec_jax/pretrained); its weights are
behind stop_gradient, so only the recovered images receive gradients. Each is a pytree whose
leaves are its weights, so the train and validation steps take them as arguments
(`losses.split_frozen`) rather than compiling them into their programs as constants.

`loss.dtype` is the precision the networks compute in: "float32" (the default), or "bfloat16":
weights stored in bfloat16 once, here (half the bytes every device holds and every step reads;
no per-step conversion), activations in bfloat16, the faces rounded to bfloat16 inside each
network after its float32 preprocessing. What stays float32: preprocessing, BatchNorm
statistics, softmaxes, the FaceNet embedding's L2 normalisation and every reduction of the
losses (cosines, channel normalisation, means; losses.py casts the outputs first), so the
loss values are float32 either way. Measured against float32 on real LFW faces in
tests/test_loss_nets_bf16.py.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dfrec_jax import losses
from dfrec_jax.pretrained import attributes, facenet, vgg


class IdentityNet(struct.PyTreeNode):
    """FaceNet as the identity loss calls it: images -> (4 feature maps, embedding)."""

    net: facenet.FaceNet

    def __call__(self, images):
        out = self.net(images)
        return out["features"], out["embedding"]

    def astype(self, dtype) -> "IdentityNet":
        return self.replace(net=self.net.astype(dtype))


class Resized(struct.PyTreeNode):
    """`net` applied to images resized to size x size (antialiased, differentiable)."""

    net: Any
    size: int = struct.field(pytree_node=False)

    def __call__(self, images):
        b, _, _, c = images.shape
        return self.net(jax.image.resize(images, (b, self.size, self.size, c), "bilinear",
                                         antialias=True))  # fmt: skip

    def astype(self, dtype) -> "Resized":
        return self.replace(net=astype(self.net, dtype))  # the resize stays in float32


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown loss.dtype {name!r} ({'|'.join(COMPUTE_DTYPES)})")
    return COMPUTE_DTYPES[name]


def astype(net, dtype):
    """`net` computing in `dtype` if it knows how (the networks here do); a plug-in callable
    (e.g. a registered attribute net) is returned as it is, in its own precision."""
    return net.astype(dtype) if hasattr(net, "astype") else net


def _perceptual_net(name: str, path: str):
    if name == "vgg16_lpips":
        return vgg.Perceptual.load(path or None)
    if name == "vgg19_torchvision":
        if not path:
            raise ValueError(
                "loss.perceptual_net=vgg19_torchvision needs loss.perceptual_weights=PATH"
            )
        return vgg.Perceptual.from_torchvision_vgg19(path)
    raise ValueError(f"unknown loss.perceptual_net {name!r} (vgg16_lpips|vgg19_torchvision)")


def build_loss_nets(loss_config) -> losses.LossNets:
    dtype = compute_dtype(loss_config.get("dtype", "float32"))  # older saved configs lack it
    identity_size = int(loss_config.get("identity_size", 0))  # older saved configs lack it
    if identity_size and identity_size < facenet.MIN_INPUT_SIZE:
        raise ValueError(f"loss.identity_size must be 0 (FaceNet's {facenet.INPUT_SIZE}) "
                         f"or >= {facenet.MIN_INPUT_SIZE}, got {identity_size}")  # fmt: skip
    perceptual = _perceptual_net(loss_config.perceptual_net, loss_config.perceptual_weights)
    if loss_config.perceptual_size:
        # VGG is most of a step's FLOPs; the CPU demo runs it at half resolution.
        perceptual = Resized(perceptual, int(loss_config.perceptual_size))
    identity = facenet.load_named(loss_config.identity_net, loss_config.identity_weights, "loss")
    if identity_size:
        # FaceNet's time grows with its input's area, but a smaller input slowed identity
        # learning in the learning check (configs/demo.py keeps 160).
        identity = identity.replace(input_size=identity_size)
    attribute = None
    if loss_config.attribute_net != "none":
        attribute = attributes.load_attribute_net(loss_config.attribute_net)
    nets = losses.LossNets(
        identity=IdentityNet(identity),
        perceptual=perceptual,
        attribute=attribute,
    )
    return nets if dtype == jnp.float32 else cast_loss_nets(nets, dtype)


def cast_loss_nets(nets: losses.LossNets, dtype) -> losses.LossNets:
    """Every network of `nets` computing in `dtype`, its weights stored in `dtype` (`astype`)."""
    return losses.LossNets(
        identity=astype(nets.identity, dtype),
        perceptual=astype(nets.perceptual, dtype),
        attribute=None if nets.attribute is None else astype(nets.attribute, dtype),
    )


def loss_weights(loss_config) -> losses.LossWeights:
    return losses.LossWeights(**loss_config.weights.to_dict())
