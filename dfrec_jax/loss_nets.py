"""Builds the frozen networks of the training loss (`losses.LossNets`) from `config.loss`.

Every network is a real pretrained one, read offline (dfrec_jax/pretrained); its weights are
constants behind stop_gradient, so only the recovered images receive gradients.
"""

import jax

from dfrec_jax import losses
from dfrec_jax.pretrained import attributes, facenet, vgg


def _identity_net(name: str, path: str):
    net = facenet.load_named(name, path, "loss")

    def identity(images):
        out = net(images)
        return out["features"], out["embedding"]

    return identity


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


def _resized(net, size: int):
    """`net` applied to images resized to size x size (antialiased, differentiable)."""

    def fn(images):
        b, _, _, c = images.shape
        return net(jax.image.resize(images, (b, size, size, c), "bilinear", antialias=True))

    return fn


def build_loss_nets(loss_config) -> losses.LossNets:
    perceptual = _perceptual_net(loss_config.perceptual_net, loss_config.perceptual_weights)
    if loss_config.perceptual_size:
        # VGG is most of a step's FLOPs; the CPU demo runs it at half resolution.
        perceptual = _resized(perceptual, loss_config.perceptual_size)
    attribute = None
    if loss_config.attribute_net != "none":
        attribute = attributes.load_attribute_net(loss_config.attribute_net)
    return losses.LossNets(
        identity=_identity_net(loss_config.identity_net, loss_config.identity_weights),
        perceptual=perceptual,
        attribute=attribute,
    )


def loss_weights(loss_config) -> losses.LossWeights:
    return losses.LossWeights(**loss_config.weights.to_dict())
