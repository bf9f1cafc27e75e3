"""Small conv building blocks shared by the ISM head and the SIRM UNet."""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def same_padding(kernel_size: int, dilation: int = 1):
    """Symmetric PyTorch-style padding that keeps size at stride 1."""
    p = (kernel_size // 2) * dilation
    return ((p, p), (p, p))


class ConvBNReLU(nn.Module):
    """Conv (optionally depthwise-separable) + BatchNorm (PyTorch defaults) + ReLU."""

    features: int
    kernel_size: int = 1
    dilation: int = 1
    separable: bool = False
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(
            nn.Conv, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype
        )
        k, d = self.kernel_size, self.dilation
        spatial = dict(kernel_size=(k, k), padding=same_padding(k, d), kernel_dilation=d)
        if self.separable:
            x = conv(x.shape[-1], feature_group_count=x.shape[-1], name="conv_dw", **spatial)(x)
            x = conv(self.features, (1, 1), name="conv_pw")(x)
        else:
            x = conv(self.features, name="conv", **spatial)(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)
        return nn.relu(x)
