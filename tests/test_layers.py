"""Depthwise convolution: the CPU shifted-slice path equals XLA's grouped convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax.models import layers


@pytest.mark.parametrize(
    "size,kernel,strides,padding,dilation",
    [
        (9, 3, 1, "SAME", 1),
        (10, 3, 2, "SAME", 1),  # TF SAME pads (0, 1) at stride 2 on an even size
        (11, 5, 2, ((2, 2), (2, 2)), 1),  # EfficientNet's symmetric padding
        (12, 3, 1, ((2, 2), (2, 2)), 2),  # the ASPP's dilated separable conv
        (8, 3, 1, "VALID", 1),
    ],
)
def test_shifted_equals_grouped_conv_values_and_gradients(size, kernel, strides, padding, dilation):
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 5))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 5))

    def run(impl):
        f = lambda x, w: layers.depthwise_conv(x, w, strides, padding, dilation, impl)  # noqa: E731
        y = f(x, w)
        grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
        return y, grads

    (y_xla, g_xla), (y_shift, g_shift) = run("xla"), run("shifted")
    assert y_shift.shape == y_xla.shape
    np.testing.assert_allclose(y_shift, y_xla, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_shift, g_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_module_matches_flax_grouped_conv_with_the_same_parameters():
    x = jax.random.normal(jax.random.key(2), (2, 14, 14, 6))
    ours = layers.DepthwiseConv(3, strides=2, padding=((1, 1), (1, 1)))
    variables = ours.init(jax.random.key(3), x)
    reference = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=6)
    ref_vars = reference.init(jax.random.key(3), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref_vars)
    np.testing.assert_allclose(
        ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_depthwise_rejects_a_wrong_kernel_and_impl():
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="depthwise kernel"):
        layers.depthwise_conv(x, jnp.zeros((3, 3, 4, 4)))
    with pytest.raises(ValueError, match="unknown depthwise impl"):
        layers.depthwise_conv(x, jnp.zeros((3, 3, 1, 4)), impl="fft")


def test_auto_lowers_the_grouped_conv_for_gpu_and_the_slices_for_cpu():
    x = jnp.zeros((1, 8, 8, 4))
    w = jnp.zeros((3, 3, 1, 4))

    def hlo(platform):
        f = jax.jit(lambda x, w: layers.depthwise_conv(x, w))
        return jax.export.export(f, platforms=(platform,))(x, w).mlir_module()

    assert "convolution" in hlo("cuda")
    assert "convolution" not in hlo("cpu")
    np.testing.assert_allclose(
        layers.depthwise_conv(x + 1, w + 1), layers.depthwise_conv(x + 1, w + 1, impl="xla")
    )
