"""EfficientNet-B0 feature extractor (no conv_head, no classifier).

Module and parameter names mirror timm's ``efficientnet_b0`` so a converter can
map a PyTorch state dict by name (``/`` <-> ``.``, ``_{i}`` <-> ``.{i}``):

    flax (params / batch_stats)              timm state-dict key
    ---------------------------------------  ---------------------------------
    conv_stem/kernel                         conv_stem.weight
    bn1/{scale,bias}                         bn1.{weight,bias}
    bn1/{mean,var} (batch_stats)             bn1.running_{mean,var}
    blocks_0_0/conv_dw/kernel                blocks.0.0.conv_dw.weight
    blocks_0_0/bn1, bn2                      blocks.0.0.bn1, bn2
    blocks_0_0/se/conv_reduce/{kernel,bias}  blocks.0.0.se.conv_reduce.{weight,bias}
    blocks_0_0/se/conv_expand/{kernel,bias}  blocks.0.0.se.conv_expand.{weight,bias}
    blocks_0_0/conv_pw/kernel                blocks.0.0.conv_pw.weight
    blocks_3_1/conv_pw/kernel                blocks.3.1.conv_pw.weight
    blocks_3_1/conv_dw/kernel                blocks.3.1.conv_dw.weight
    blocks_3_1/conv_pwl/kernel               blocks.3.1.conv_pwl.weight
    blocks_3_1/bn{1,2,3}                     blocks.3.1.bn{1,2,3}
    blocks_3_1/se/...                        blocks.3.1.se....

Kernels are HWIO here and OIHW in PyTorch (transpose (2, 3, 1, 0)); depthwise
kernels are (k, k, 1, C) here and (C, 1, k, k) there. timm's ``conv_head``,
``bn2`` and ``classifier`` have no counterpart.

Padding is symmetric ``(k // 2) * dilation`` on each side, as in timm's
``efficientnet_b0`` (PyTorch-style). ``padding="tf_same"`` pads the stride-2 convs TF
"SAME" instead (the extra pixel at the bottom/right: 0/1 for 3x3, 1/2 for 5x5 on even sizes),
as efficientnet_pytorch's static-same convs do for the DFREC release (and TF-ported weights
need); stride-1 convs pad the same either way.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dfrec_jax.models.layers import Conv, DepthwiseConv, same_padding

# (expand_ratio, kernel_size, stride, out_channels, repeats) for each stage.
B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
SE_RATIO = 0.25  # of the block *input* channels, as in the original EfficientNet

# The original EfficientNet / timm init: normal with std sqrt(2 / fan_out), where fan_out of
# a depthwise conv counts one input channel per group (= k*k, which flax calls fan_in).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class SqueezeExcite(nn.Module):
    """Channel gate: global mean -> 1x1 reduce -> swish -> 1x1 expand -> sigmoid."""

    reduced_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(
            Conv,
            kernel_size=(1, 1),
            kernel_init=CONV_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.swish(conv(self.reduced_channels, name="conv_reduce")(s))
        s = conv(x.shape[-1], name="conv_expand")(s)
        return x * nn.sigmoid(s)


class MBConv(nn.Module):
    """One EfficientNet block, named like timm.

    ``expand_ratio == 1`` is timm's DepthwiseSeparableConv (conv_dw, bn1, se,
    conv_pw, bn2); otherwise InvertedResidual (conv_pw, bn1, conv_dw, bn2, se,
    conv_pwl, bn3). The residual (with drop-path) exists only when the block
    keeps both resolution and width.
    """

    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    drop_path_rate: float = 0.0
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    depthwise_impl: str = "auto"  # layers.depthwise_conv impl
    padding: str = "symmetric"  # | "tf_same" (stride 2 only; module docstring)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        in_ch = x.shape[-1]
        conv = functools.partial(
            Conv,
            use_bias=False,
            kernel_init=CONV_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        bn = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        k, d = self.kernel_size, self.dilation
        tf_same = self.padding == "tf_same" and self.stride > 1

        def depthwise(h):
            return DepthwiseConv(
                k,
                strides=self.stride,
                padding="SAME" if tf_same else same_padding(k, d),
                dilation=d,
                use_bias=False,
                kernel_init=DEPTHWISE_INIT,
                impl=self.depthwise_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv_dw",
            )(h)

        se = SqueezeExcite(
            max(1, int(in_ch * SE_RATIO)), dtype=self.dtype, param_dtype=self.param_dtype, name="se"
        )
        if self.expand_ratio == 1:
            h = nn.swish(bn(name="bn1")(depthwise(x)))
            h = se(h)
            h = bn(name="bn2")(conv(self.out_channels, (1, 1), name="conv_pw")(h))
        else:
            h = conv(in_ch * self.expand_ratio, (1, 1), name="conv_pw")(x)
            h = nn.swish(bn(name="bn1")(h))
            h = nn.swish(bn(name="bn2")(depthwise(h)))
            h = se(h)
            h = bn(name="bn3")(conv(self.out_channels, (1, 1), name="conv_pwl")(h))

        if self.stride == 1 and in_ch == self.out_channels:
            # Drop-path: one Bernoulli draw per sample, broadcast over H, W, C.
            h = nn.Dropout(
                self.drop_path_rate,
                broadcast_dims=(1, 2, 3),
                deterministic=not train,
                name="drop_path",
            )(h)
            h = h + x
        return h


def scaled_channels(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's width scaling: channels * width rounded to a multiple of `divisor`
    (never below divisor, never more than 10% below the exact product)."""
    if width == 1.0:
        return channels
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * target else rounded


def scaled_repeats(repeats: int, depth: float) -> int:
    """EfficientNet's depth scaling: ceil(repeats * depth)."""
    return int(math.ceil(repeats * depth))


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 trunk returning multi-scale features.

    ``width_coefficient`` / ``depth_coefficient`` (1.0 = B0, the paper's backbone) scale the
    channels and block repeats by EfficientNet's own rules; values below 1 give the tiny
    trunks the training tests use to compile in seconds.

    ``output_stride`` 16 (8) turns the stride of the last (last two) stride-2
    stage(s) into dilation, as DeepLabV3+ encoders do; like
    segmentation_models_pytorch's ``make_dilated``, every depthwise conv of a
    dilated stage and of the stages after it uses the accumulated dilation.
    ``dilation_start="smp"`` (output stride 16 only) dilates from where smp's
    EfficientNet encoder does: its last stage is ``_blocks[9:]`` (stage_idxs 3, 5, 9, 16
    for B0), so the two 112-ch blocks before the stride-2 stage are dilated too, as in the
    DFREC release; "stage" (default) dilates from the stride-2 stage only (block 11).
    ``padding``: "symmetric" | "tf_same" (module docstring).

    Returns a dict:
      ``low``: stride-4 features (24 ch);
      ``high``: final 320-ch features at stride ``output_stride``;
      ``features``: the last output at each nominal reduction level 2, 4, 8,
        16, 32 (16, 24, 40, 112, 320 ch, like timm ``features_only``); levels
        past ``output_stride`` keep the ``output_stride`` resolution.

    Drop-path rate of block i (of 16) is ``stochastic_depth_rate * i / 16``, as
    in timm and the reference TF code (first block 0, last 0.94 x the rate).
    """

    stochastic_depth_rate: float = 0.2
    output_stride: int = 32
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    bn_momentum: float = 0.99  # flax convention: running = m * running + (1 - m) * batch
    bn_epsilon: float = 1e-3
    depthwise_impl: str = "auto"  # layers.depthwise_conv impl
    padding: str = "symmetric"  # | "tf_same"
    dilation_start: str = "stage"  # | "smp"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.output_stride not in (8, 16, 32):
            raise ValueError(
                f"EfficientNetB0 output_stride must be 8, 16 or 32, got {self.output_stride}."
            )
        if self.padding not in ("symmetric", "tf_same"):
            raise ValueError(f"padding must be 'symmetric' or 'tf_same', got {self.padding!r}")
        if self.dilation_start not in ("stage", "smp"):
            raise ValueError(
                f"dilation_start must be 'stage' or 'smp', got {self.dilation_start!r}"
            )
        if self.dilation_start == "smp" and self.output_stride != 16:
            raise ValueError("dilation_start='smp' is defined for output_stride 16 only")
        width, depth = self.width_coefficient, self.depth_coefficient
        stages = [
            (e, k, st, scaled_channels(c, width), scaled_repeats(r, depth))
            for e, k, st, c, r in B0_STAGES
        ]
        x = Conv(
            scaled_channels(STEM_CHANNELS, width),
            (3, 3),
            strides=2,
            padding="SAME" if self.padding == "tf_same" else same_padding(3),
            use_bias=False,
            kernel_init=CONV_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv_stem",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn1",
        )(x)
        x = nn.swish(x)

        num_blocks = sum(stage[-1] for stage in stages)
        # smp's last encoder stage starts one block into the 112-ch stage (block 9 of B0).
        smp_start = sum(stage[-1] for stage in stages[:4]) + 1
        features, stride, dilation, block_idx = [], 2, 1, 0
        for s, (expand, kernel, stage_stride, out_ch, repeats) in enumerate(stages):
            if stage_stride > 1:
                features.append(x)  # end of the previous reduction level
                if stride >= self.output_stride:
                    dilation *= stage_stride
                    stage_stride = 1
                else:
                    stride *= stage_stride
            for i in range(repeats):
                x = MBConv(
                    out_ch,
                    expand,
                    kernel,
                    stride=stage_stride if i == 0 else 1,
                    dilation=max(dilation, 2)
                    if self.dilation_start == "smp" and block_idx >= smp_start
                    else dilation,
                    drop_path_rate=self.stochastic_depth_rate * block_idx / num_blocks,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    depthwise_impl=self.depthwise_impl,
                    padding=self.padding,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"blocks_{s}_{i}",
                )(x, train)
                block_idx += 1
        features.append(x)
        return {"low": features[1], "high": x, "features": tuple(features)}
