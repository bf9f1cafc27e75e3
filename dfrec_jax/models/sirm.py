"""SIRM: source identity recovery, an attention UNet on `image * seg`.

The encoder halves the resolution len(channels) - 1 times. Its bottleneck [B,h,w,C] is split
on the channel axis: the first `source_channels` are decoded, through attention-gated skip
connections, into the recovered source face; the rest form the target-identity part, which a
conv block maps to `identity_tokens` channels and reshapes to [B, identity_tokens, h*w]
(channel-major, as the released code's `view(B, 98, -1)` on NCHW) for the TIRM.

The released model is channels (32, 64, 128, 256, 1024), split 512/512, identity 98 x 196 at
224 input, gate "official". Attention gates:
  "paper"     Oktay et al.: x * psi, psi = sigmoid(BN(conv(relu(W_g g + W_x x)))).
  "official"  the released code adds a gate computed from the skip alone:
              x * (psi + q), q = sigmoid(conv1x1(BN(conv1x1(x)))).
Module names follow the released code's roles (enc_i = ConvI, up_i = UpI, att_i = AttI,
dec_i = Up_convI, identity_head = tConv4, out_conv = Conv_1x1) for the checkpoint converter.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfrec_jax.models import layers
from dfrec_jax.models.layers import Conv, ConvBNReLU

# The released UNet's 3x3 convs carry a bias even though BatchNorm follows (kept for the
# checkpoint converter).
Conv3BNReLU = functools.partial(ConvBNReLU, kernel_size=3, use_bias=True)

Dtype = Any


class ConvBlock(nn.Module):
    """Two 3x3 conv + BN + ReLU layers (the UNet `conv_block`)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv3BNReLU(self.features, name="layer_0", **kw)(x, train)
        return Conv3BNReLU(self.features, name="layer_1", **kw)(x, train)


class UpConv(nn.Module):
    """Nearest-neighbour x2 upsampling, then 3x3 conv + BN + ReLU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        return Conv3BNReLU(
            self.features, name="layer_0", dtype=self.dtype, param_dtype=self.param_dtype
        )(x, train)


class AttentionGate(nn.Module):
    """Scales the skip features `x` by an attention map computed with the decoder gate `g`."""

    inter_features: int
    variant: str = "paper"  # "paper" | "official"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, g, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def conv_bn(y, features, name):
            y = Conv(features, (1, 1), name=f"{name}_conv", **kw)(y)
            return nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"{name}_bn", **kw
            )(y)

        psi = nn.relu(
            conv_bn(g, self.inter_features, "w_g") + conv_bn(x, self.inter_features, "w_x")
        )
        psi = nn.sigmoid(conv_bn(psi, 1, "psi"))
        if self.variant == "paper":
            return x * psi
        if self.variant == "official":
            q = conv_bn(x, self.inter_features, "w_self")
            q = nn.sigmoid(Conv(1, (1, 1), use_bias=False, name="self_conv", **kw)(q))
            return x * (psi + q)
        raise ValueError(f"unknown attention gate variant {self.variant!r} (paper|official)")


class SIRM(nn.Module):
    channels: Sequence[int] = (32, 64, 128, 256, 1024)
    source_channels: int = 512
    identity_tokens: int = 98
    gate: str = "official"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """x: [B,H,W,3] (the image times the ISM map). Returns dict(source [B,H,W,3] float32 in
        [0,1], target_identity [B, identity_tokens, h*w] float32)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.channels)
        factor = 2 ** (levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"SIRM input {x.shape[1]}x{x.shape[2]} must be divisible by {factor}")
        if not 0 < self.source_channels < self.channels[-1]:
            raise ValueError(
                f"source_channels {self.source_channels} must split the "
                f"{self.channels[-1]}-channel bottleneck"
            )

        skips = []
        y = x.astype(self.dtype)
        for i, features in enumerate(self.channels):
            if i:
                y = layers.max_pool(y, (2, 2), strides=(2, 2))
            y = ConvBlock(features, name=f"enc_{i}", **kw)(y, train)
            skips.append(y)
        source, identity = y[..., : self.source_channels], y[..., self.source_channels :]

        d = source
        for i in reversed(range(levels - 1)):
            features = self.channels[i]
            d = UpConv(features, name=f"up_{i}", **kw)(d, train)
            skip = AttentionGate(features // 2, self.gate, name=f"att_{i}", **kw)(
                d, skips[i], train
            )
            d = ConvBlock(features, name=f"dec_{i}", **kw)(jnp.concatenate([skip, d], -1), train)
        source_img = nn.sigmoid(Conv(3, (1, 1), name="out_conv", **kw)(d).astype(jnp.float32))

        identity = ConvBlock(self.identity_tokens, name="identity_head", **kw)(identity, train)
        b, h, w, t = identity.shape
        identity = identity.transpose(0, 3, 1, 2).reshape(b, t, h * w).astype(jnp.float32)
        return {"source": source_img, "target_identity": identity}
