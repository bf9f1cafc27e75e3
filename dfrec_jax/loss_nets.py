"""Builds the frozen networks of the training loss (`losses.LossNets`) from `config.loss`.

Every network is a real pretrained one, read offline (dfrec_jax/pretrained); its weights are
behind stop_gradient, so only the recovered images receive gradients. Each is a pytree whose
leaves are its weights, so the train and validation steps take them as arguments
(`losses.split_frozen`) rather than compiling them into their programs as constants.
"""

from typing import Any

import jax
from flax import struct

from dfrec_jax import losses
from dfrec_jax.pretrained import attributes, facenet, vgg


class IdentityNet(struct.PyTreeNode):
    """FaceNet as the identity loss calls it: images -> (4 feature maps, embedding)."""

    net: facenet.FaceNet

    def __call__(self, images):
        out = self.net(images)
        return out["features"], out["embedding"]


class Resized(struct.PyTreeNode):
    """`net` applied to images resized to size x size (antialiased, differentiable)."""

    net: Any
    size: int = struct.field(pytree_node=False)

    def __call__(self, images):
        b, _, _, c = images.shape
        return self.net(jax.image.resize(images, (b, self.size, self.size, c), "bilinear",
                                         antialias=True))  # fmt: skip


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
    perceptual = _perceptual_net(loss_config.perceptual_net, loss_config.perceptual_weights)
    if loss_config.perceptual_size:
        # VGG is most of a step's FLOPs; the CPU demo runs it at half resolution.
        perceptual = Resized(perceptual, int(loss_config.perceptual_size))
    attribute = None
    if loss_config.attribute_net != "none":
        attribute = attributes.load_attribute_net(loss_config.attribute_net)
    return losses.LossNets(
        identity=IdentityNet(
            facenet.load_named(loss_config.identity_net, loss_config.identity_weights, "loss")
        ),
        perceptual=perceptual,
        attribute=attribute,
    )


def loss_weights(loss_config) -> losses.LossWeights:
    return losses.LossWeights(**loss_config.weights.to_dict())
