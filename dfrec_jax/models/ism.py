"""ISM: identity segmentation module (DeepLabV3+ on EfficientNet-B0).

Mirrors segmentation_models_pytorch ``DeepLabV3Plus(encoder_name=
"efficientnet-b0", classes=1, activation="sigmoid")`` as used by the DFREC
release, plus the paper's pristine/forgery classification head on the
high-level features. Decoder names follow smp to ease a by-name converter:

    flax (under decoder/)                    smp key (under decoder.)
    ---------------------------------------  ---------------------------------
    aspp/convs_0/{conv,bn}                   aspp.0.convs.0.{0,1}
    aspp/convs_{1,2,3}/{conv_dw,conv_pw}     aspp.0.convs.{1,2,3}.0.{0,1}
    aspp/convs_{1,2,3}/bn                    aspp.0.convs.{1,2,3}.1
    aspp/convs_4/{conv,bn}  (image pooling)  aspp.0.convs.4.{1,2}
    aspp/project/{conv,bn}                   aspp.0.project.{0,1}
    aspp_conv/{conv_dw,conv_pw}, bn          aspp.1.{0,1}, aspp.2
    block1/{conv,bn}                         block1.{0,1}
    block2/{conv_dw,conv_pw}, bn             block2.0.{0,1}, block2.1
    segmentation_head (ISM: decoder/...)     segmentation_head.0 (top level)
    classifier (ISM top level)               classification_head.3 (aux_params)

Decoder BatchNorms keep smp's PyTorch defaults (momentum 0.1 -> flax 0.9,
epsilon 1e-5). Upsampling (x4 of the ASPP output, x4 of the logits) is bilinear with
half-pixel centres by default; ``align_corners=True`` samples like smp's
``UpsamplingBilinear2d`` (the DFREC release). The release's encoder behaviours are
``encoder_padding="tf_same"`` and ``encoder_dilation_start="smp"`` (efficientnet.py).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dfrec_jax.models.efficientnet import EfficientNetB0
from dfrec_jax.models.layers import Conv, ConvBNReLU, resize_bilinear, same_padding

OUTPUT_STRIDE = 16


class ASPP(nn.Module):
    """1x1 branch, one 3x3 atrous branch per rate, image pooling; 1x1 projection."""

    features: int = 256
    atrous_rates: Sequence[int] = (12, 24, 36)
    separable: bool = True
    dropout_rate: float = 0.5
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        cbr = functools.partial(
            ConvBNReLU,
            self.features,
            depthwise_impl=self.depthwise_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        branches = [cbr(name="convs_0")(x, train)]
        for i, rate in enumerate(self.atrous_rates, start=1):
            branches.append(
                cbr(kernel_size=3, dilation=rate, separable=self.separable, name=f"convs_{i}")(
                    x, train
                )
            )
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = cbr(name=f"convs_{len(self.atrous_rates) + 1}")(pooled, train)
        # Bilinear upsampling of a 1x1 map is a broadcast.
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        x = cbr(name="project")(jnp.concatenate(branches, axis=-1), train)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on stride-16 features, fused with stride-4 features; logits at stride 4."""

    channels: int = 256
    low_level_channels: int = 48
    atrous_rates: Sequence[int] = (12, 24, 36)
    separable: bool = True
    dropout_rate: float = 0.5
    head_kernel_size: int = 1
    num_classes: int = 1
    depthwise_impl: str = "auto"
    align_corners: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, low, high, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cbr = functools.partial(ConvBNReLU, depthwise_impl=self.depthwise_impl, **kw)
        x = ASPP(
            features=self.channels,
            atrous_rates=self.atrous_rates,
            separable=self.separable,
            dropout_rate=self.dropout_rate,
            depthwise_impl=self.depthwise_impl,
            name="aspp",
            **kw,
        )(high, train)
        x = cbr(self.channels, 3, separable=True, name="aspp_conv")(x, train)
        x = resize_bilinear(x, low.shape[1:3], self.align_corners)
        skip = cbr(self.low_level_channels, name="block1")(low, train)
        x = jnp.concatenate([x, skip], axis=-1)
        x = cbr(self.channels, 3, separable=True, name="block2")(x, train)
        k = self.head_kernel_size
        return Conv(
            self.num_classes, (k, k), padding=same_padding(k), name="segmentation_head", **kw
        )(x)


class ISM(nn.Module):
    """Identity segmentation: per-pixel source probability + forgery logit.

    Input: images [B, H, W, 3] in [0, 1], H and W divisible by 16 (no input
    normalisation is applied here). Returns float32 ``seg_logits`` and
    ``seg`` [B, H, W, 1] and ``forgery_logit`` [B].

    ``head_kernel_size`` defaults to 1 as in smp's DeepLabV3Plus.
    """

    atrous_rates: Sequence[int] = (12, 24, 36)
    decoder_channels: int = 256
    low_level_channels: int = 48
    separable: bool = True
    head_kernel_size: int = 1
    stochastic_depth_rate: float = 0.2
    width_coefficient: float = 1.0  # EfficientNet scaling of the encoder (1.0 = B0)
    depth_coefficient: float = 1.0
    dropout_rate: float = 0.5  # ASPP projection dropout
    classifier_dropout_rate: float = 0.2
    # Encoder BatchNorm running-average momentum (flax: running = m * running + (1-m) * batch).
    # EfficientNet's 0.99 needs thousands of steps to forget the init; short runs use 0.9.
    encoder_bn_momentum: float = 0.99
    # layers.depthwise_conv impl of every depthwise conv: "auto" (the fast one per platform),
    # "xla" (grouped conv: compiles faster, runs slower on CPU; the tiny test config), "shifted".
    depthwise_impl: str = "auto"
    # The DFREC release's behaviours (README "Using the authors' trained model"): TF-"SAME"
    # stride-2 padding, smp's dilation from block 9, align_corners=True upsampling.
    encoder_padding: str = "symmetric"  # | "tf_same"
    encoder_dilation_start: str = "stage"  # | "smp"
    align_corners: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool):
        b, h, w, _ = images.shape
        if h % OUTPUT_STRIDE or w % OUTPUT_STRIDE:
            raise ValueError(
                f"ISM input height and width must be divisible by {OUTPUT_STRIDE}, got {h}x{w}."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feats = EfficientNetB0(
            stochastic_depth_rate=self.stochastic_depth_rate,
            output_stride=OUTPUT_STRIDE,
            width_coefficient=self.width_coefficient,
            depth_coefficient=self.depth_coefficient,
            bn_momentum=self.encoder_bn_momentum,
            depthwise_impl=self.depthwise_impl,
            padding=self.encoder_padding,
            dilation_start=self.encoder_dilation_start,
            name="encoder",
            **kw,
        )(images, train)
        logits = DeepLabV3PlusDecoder(
            channels=self.decoder_channels,
            low_level_channels=self.low_level_channels,
            atrous_rates=self.atrous_rates,
            separable=self.separable,
            dropout_rate=self.dropout_rate,
            head_kernel_size=self.head_kernel_size,
            depthwise_impl=self.depthwise_impl,
            align_corners=self.align_corners,
            name="decoder",
            **kw,
        )(feats["low"], feats["high"], train)
        logits = resize_bilinear(logits.astype(jnp.float32), (h, w), self.align_corners)

        pooled = jnp.mean(feats["high"], axis=(1, 2))
        pooled = nn.Dropout(self.classifier_dropout_rate, deterministic=not train)(pooled)
        forgery_logit = nn.Dense(1, name="classifier", **kw)(pooled)[:, 0]
        return {
            "seg_logits": logits,
            "seg": nn.sigmoid(logits),
            "forgery_logit": forgery_logit.astype(jnp.float32),
        }
