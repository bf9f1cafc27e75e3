"""Convolutions and pooling: the CPU paths (shifted-slice depthwise, pointwise matmul,
padded-then-cropped unpadded convs, slice max-pool) equal lax's and flax's."""

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
    depthwise = lambda x, w: layers.depthwise_conv(x, w)  # noqa: E731
    assert "convolution" in _lowered(depthwise, "cuda", x, w)
    assert "convolution" not in _lowered(depthwise, "cpu", x, w)
    np.testing.assert_allclose(
        layers.depthwise_conv(x + 1, w + 1), layers.depthwise_conv(x + 1, w + 1, impl="xla")
    )


@pytest.mark.parametrize(
    "size,strides,padding,dtype",
    [
        (9, 1, "SAME", jnp.float32),
        (10, 2, "SAME", jnp.float32),  # strided 1x1 (EfficientNet's, FaceNet's reductions)
        (11, 2, "VALID", jnp.float32),  # odd size: SAME and VALID both read every 2nd pixel
        (8, 1, ((0, 0), (0, 0)), jnp.float32),  # ConvBNReLU's explicit zero padding
        (8, 1, "SAME", jnp.bfloat16),
    ],
)
def test_pointwise_matmul_equals_lax_conv_values_and_gradients(size, strides, padding, dtype):
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 6), dtype)
    w = jax.random.normal(jax.random.key(1), (1, 1, 6, 4), dtype)
    dims = ("NHWC", "HWIO", "NHWC")

    def bind(conv):
        return lambda x, w: conv(x, w, (strides,) * 2, padding, dimension_numbers=dims)

    _assert_equals_lax(bind, x, w, tol=1e-5 if dtype == jnp.float32 else 5e-2)


def _assert_equals_lax(bind, x, w, tol):
    """Ours (`bind(layers.conv_general_dilated)`) against lax's: shape, dtype, values, and
    both gradients of a non-linear loss."""

    def run(conv):
        f = bind(conv)
        grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
        return f(x, w), grads

    (y_ref, g_ref), (y, g) = run(jax.lax.conv_general_dilated), run(layers.conv_general_dilated)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)


def _lowered(fn, platform, *args):
    with layers.several_platforms(True):  # as `export` lowers
        return jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()


def test_one_platform_traces_one_implementation_several_trace_both():
    """Outside an export the CPU-only implementations are picked when tracing, for the default
    backend (here CPU): one branch traced, no platform switch; an export traces both, and the
    choice is part of jit's cache key (the same jitted function is traced again)."""
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 1, 4))
    pointwise = jnp.ones((1, 1, 4, 3))
    dims = ("NHWC", "HWIO", "NHWC")

    def both(x, w, pointwise):
        y = layers.depthwise_conv(x, w)
        return layers.conv_general_dilated(y, pointwise, (1, 1), "SAME", dimension_numbers=dims)

    loss = jax.jit(lambda x, w, p: jnp.sum(both(x, w, p) ** 2))
    grads = jax.jit(jax.grad(lambda x, w, p: jnp.sum(both(x, w, p) ** 2), argnums=(1, 2)))
    assert jax.default_backend() == "cpu"
    one = str(jax.make_jaxpr(grads)(x, w, pointwise))
    assert "platform_index" not in one and "cond" not in one
    assert "conv_general_dilated" not in one  # the slices and the matmul only
    with layers.several_platforms(True):
        several = str(jax.make_jaxpr(grads)(x, w, pointwise))
        value = loss(x, w, pointwise)
    assert "platform_index" in several and "conv_general_dilated" in several
    np.testing.assert_allclose(value, loss(x, w, pointwise), rtol=1e-6)


def test_pointwise_runs_as_a_matmul_on_cpu_and_as_a_conv_elsewhere():
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((1, 1, 4, 3))
    dims = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)  # noqa: E731
    assert "convolution" not in _lowered(conv, "cpu", x, w)
    assert "dot_general" in _lowered(conv, "cpu", x, w)
    assert "convolution" in _lowered(conv, "cuda", x, w)


@pytest.mark.parametrize(
    "size,kernel,strides,padding,dilation,dtype",
    [
        (9, 3, 1, "VALID", 1, jnp.float32),  # FaceNet's conv2d_2a / 4a
        (10, 3, 2, ((0, 0), (0, 0)), 1, jnp.float32),  # Inception's strided reductions
        (11, 3, 1, "valid", 2, jnp.float32),
        (16, 8, 8, "VALID", 1, jnp.float32),  # the ViT's patch embedding
        (11, (1, 7), 2, "VALID", 1, jnp.float32),
        (9, 3, 1, "VALID", 1, jnp.bfloat16),
    ],
)
def test_unpadded_conv_equals_lax_conv_values_and_gradients(
    size, kernel, strides, padding, dilation, dtype
):
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 3), dtype)
    w = jax.random.normal(jax.random.key(1), (kh, kw, 3, 4), dtype)
    dims = ("NHWC", "HWIO", "NHWC")

    def bind(conv):
        return lambda x, w: conv(
            x, w, (strides,) * 2, padding, rhs_dilation=(dilation,) * 2, dimension_numbers=dims
        )

    assert "pad = [[0, 1], [0, 1]]" in _lowered(bind(layers.conv_general_dilated), "cpu", x, w)
    # float32: measured equal bit for bit
    _assert_equals_lax(bind, x, w, tol=1e-6 if dtype == jnp.float32 else 1e-2)


def test_unpadded_conv_is_padded_and_cropped_on_cpu_and_left_alone_elsewhere():
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 3))
    dims = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dims)  # noqa: E731
    cpu, cuda = _lowered(conv, "cpu", x, w), _lowered(conv, "cuda", x, w)
    assert "pad = [[0, 1], [0, 1]]" in cpu and "stablehlo.slice" in cpu
    assert "pad = [[0, 1], [0, 1]]" not in cuda and "stablehlo.slice" not in cuda
    assert conv(x, w).shape == (1, 6, 6, 3)


@pytest.mark.parametrize(
    "kernel,kwargs",
    [
        ((3, 3, 4, 3), {}),  # not 1x1, padded
        ((3, 3, 1, 4), {"padding": "VALID", "feature_group_count": 4}),  # unpadded, grouped
        ((3, 3, 4, 3), {"padding": ((0, 0), (0, 0)), "lhs_dilation": (2, 2)}),  # input-dilated
        ((1, 1, 4, 3), {"padding": ((1, 1), (1, 1))}),  # padded 1x1 grows the output
        ((1, 1, 4, 3), {"rhs_dilation": (2, 2)}),
        ((1, 1, 2, 4), {"feature_group_count": 2}),  # grouped
        ((1, 1, 4, 3), {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}),
    ],
)
def test_other_convolutions_stay_lax_convolutions(kernel, kwargs):
    kwargs = {"padding": "SAME", "dimension_numbers": ("NHWC", "HWIO", "NHWC"), **kwargs}
    shape = (1, 8, 8, 4)
    if kwargs["dimension_numbers"][0] == "NCHW":
        kernel, shape = (kernel[3], kernel[2], 1, 1), (1, 4, 8, 8)
    x = jax.random.normal(jax.random.key(2), shape)
    w = jax.random.normal(jax.random.key(3), kernel)
    padding = kwargs.pop("padding")
    conv = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), padding, **kwargs)  # noqa: E731
    lowered = _lowered(conv, "cpu", x, w)
    assert "convolution" in lowered and "pad = [[0, 1], [0, 1]]" not in lowered
    reference = jax.lax.conv_general_dilated(x, w, (1, 1), padding, **kwargs)
    np.testing.assert_allclose(conv(x, w), reference, rtol=1e-5, atol=1e-5)


def test_flax_conv_with_the_matmul_keeps_parameters_and_auto_names():
    class Net(nn.Module):
        conv: object

        @nn.compact
        def __call__(self, x):
            return self.conv(5, (1, 1), strides=2)(self.conv(4, (3, 3))(x))

    x = jax.random.normal(jax.random.key(4), (2, 9, 9, 3))
    ours, reference = Net(layers.Conv), Net(nn.Conv)
    variables = ours.init(jax.random.key(5), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, reference.init(jax.random.key(5), x)
    )
    assert set(variables["params"]) == {"Conv_0", "Conv_1"}
    np.testing.assert_allclose(
        ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def _bits(a) -> np.ndarray:
    """The array's raw bits: equal bits, not merely equal values (-0.0 vs 0.0 count)."""
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize(
    "shape,window,strides,padding,dtype",
    [
        ((2, 12, 12, 3), (2, 2), (2, 2), "VALID", jnp.float32),  # SIRM, VGG16
        ((2, 13, 11, 3), (2, 2), (2, 2), "VALID", jnp.float32),  # odd sizes: last row dropped
        ((2, 15, 15, 4), (3, 3), (2, 2), "VALID", jnp.float32),  # FaceNet, Inception: overlap
        ((2, 14, 14, 4), (3, 3), (2, 2), "SAME", jnp.float32),  # face-api's reduction blocks
        ((2, 9, 9, 4), (3, 3), (1, 1), ((1, 1), (1, 1)), jnp.float32),  # Inception's mixed_10
        ((2, 15, 15, 4), (3, 3), (2, 2), "VALID", jnp.bfloat16),
    ],
)
def test_max_pool_equals_flax_bit_for_bit_values_gradients_and_jvps(
    shape, window, strides, padding, dtype
):
    """Inputs in steps of 0.5 (with -0.0 and 0.0) so most windows hold tied maxima: the
    gradient must reach the same one element of each window as XLA's select-and-scatter."""
    x = jnp.asarray(np.round(np.random.default_rng(0).normal(size=shape) * 2) / 2, dtype)
    assert np.mean(np.asarray(x, np.float32) == 0) > 0.1  # ties, and zeros of both signs
    reference = lambda x: nn.max_pool(x, window, strides, padding)  # noqa: E731
    ours = lambda x: layers.max_pool(x, window, strides, padding)  # noqa: E731
    cotangent = jax.random.normal(jax.random.key(1), reference(x).shape, dtype)
    tangent = jax.random.normal(jax.random.key(2), shape, dtype)
    for f in (jax.jit, lambda g: g):  # compiled and op by op
        y_ref, vjp_ref = jax.vjp(f(reference), x)
        y, vjp = jax.vjp(f(ours), x)
        assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
        np.testing.assert_array_equal(_bits(y), _bits(y_ref))
        np.testing.assert_array_equal(_bits(vjp(cotangent)[0]), _bits(vjp_ref(cotangent)[0]))
        jvp_ref = jax.jvp(f(reference), (x,), (tangent,))[1]
        np.testing.assert_array_equal(_bits(jax.jvp(f(ours), (x,), (tangent,))[1]), _bits(jvp_ref))
    # Each window's cotangent lands whole on one element: counts are integers (jnp.max's
    # gradient would split it among tied maxima: 1/2, 1/3, ...) and add up to the windows.
    counts = np.asarray(jax.vjp(ours, x)[1](jnp.ones_like(cotangent))[0], np.float32)
    np.testing.assert_array_equal(counts, np.round(counts))
    assert counts.sum() == cotangent.size


def test_max_pool_gradient_takes_the_first_maximum_of_a_window():
    x = jnp.array([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x, (2, 2), (2, 2))))(x)
    np.testing.assert_array_equal(grad.reshape(2, 2), [[0.0, 1.0], [0.0, 0.0]])


def test_max_pool_runs_as_slices_on_cpu_and_as_a_pool_elsewhere():
    x = jnp.ones((1, 8, 8, 2))

    def pool_grad(x):
        return jax.grad(lambda x: jnp.sum(layers.max_pool(x, (3, 3), (2, 2)) ** 2))(x)

    assert "select_and_scatter" in _lowered(pool_grad, "cuda", x)
    cpu = _lowered(pool_grad, "cpu", x)
    assert "select_and_scatter" not in cpu and "reduce_window" not in cpu
    unbatched = jax.random.normal(jax.random.key(0), (8, 8, 2))  # not NHWC: nn.max_pool's
    np.testing.assert_array_equal(
        layers.max_pool(unbatched, (2, 2), (2, 2)), nn.max_pool(unbatched, (2, 2), (2, 2))
    )
