"""Small conv building blocks shared by the ISM head, the SIRM UNet and the frozen nets."""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]]


def same_padding(kernel_size: int, dilation: int = 1):
    """Symmetric PyTorch-style padding that keeps size at stride 1."""
    p = (kernel_size // 2) * dilation
    return ((p, p), (p, p))


def resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool = False):
    """Bilinear resize of x [B,H,W,C] to `size` (h, w).

    align_corners=False: half-pixel centres (jax.image.resize; PyTorch's F.interpolate
    default). True: the corner pixels of input and output coincide, as PyTorch's
    UpsamplingBilinear2d / align_corners=True (what segmentation_models_pytorch's
    DeepLabV3+ uses): output pixel o samples input (o * (in - 1) / (out - 1)).
    """
    shape = (x.shape[0], *size, x.shape[-1])
    if not align_corners:
        return jax.image.resize(x, shape, method="bilinear")
    # jax.image samples input coordinate (o + 0.5 - t) / s - 0.5 (pixel centres); solve for
    # s = (out - 1) / (in - 1) and t = 0.5 - 0.5 * s per axis.
    scale = jnp.array([(o - 1) / max(i - 1, 1) for i, o in zip(x.shape[1:3], size)], jnp.float32)
    return jax.image.scale_and_translate(
        x, shape, (1, 2), scale, 0.5 - 0.5 * scale, method="linear", antialias=False
    )


# lax's layout names for NHWC inputs, HWIO kernels, NHWC outputs (what every conv here uses).
_NHWC_HWIO = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

# True while a program for several platforms is traced (`export`): the CPU-only implementations
# below are then chosen per platform at lowering (`lax.platform_dependent`, which traces both
# and, under a gradient, linearises both). Otherwise they are chosen at trace time for JAX's
# default backend, the platform a jitted function runs on unless told otherwise: tracing and
# lowering the demo train step took 16.2 / 16.7 -> 11.1 / 11.1 s on 2 Xeon cores (README,
# Training). A jit-cache-sensitive context, so a trace made one way is never reused the other.
several_platforms = jax.make_user_context(default_value=False)


def _per_platform(*args, cpu, default):
    """cpu(*args) on CPU, default(*args) elsewhere (see `several_platforms`)."""
    if several_platforms.value:
        return jax.lax.platform_dependent(*args, cpu=cpu, default=default)
    return (cpu if jax.default_backend() == "cpu" else default)(*args)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`jax.lax.conv_general_dilated` (same signature), with two CPU-only rewrites.

    - 1x1 convolutions run as a matmul. XLA's CPU convolution is slow for 1x1 kernels, above
      all their kernel gradient: on 2 Xeon cores, 16x28x28x192 -> 64 takes 5.7 ms forward and
      30 ms for the kernel gradient as a convolution, 2.0 and 4.2 ms as a matmul. 1x1 convs
      carry most of the arithmetic of EfficientNet's MBConvs, FaceNet's Inception-ResNet
      blocks and Inception v3, so a pointwise conv (1x1 kernel, no padding, no dilation, not
      grouped, NHWC/HWIO) is the strided input times the kernel matrix.
    - Unpadded (VALID) convolutions larger than 1x1 get one row and column of zero padding at
      their far end and the extra output cropped: XLA:CPU runs a stride-1 3x3 convolution
      without any padding 2.8-4.9x slower than the same one padded (16x79x79x32 -> 32: 64 vs
      13 ms forward; Inception v3's 16x149x149x32 -> 32: 257 vs 93 ms), stride-2 ones up to
      2.6x (one, FaceNet's 3-channel stem, 7% slower), the ViT's patch embedding (stride =
      kernel) the same; and the same values: padding at the far end only feeds outputs past
      the VALID size, which are cut off (bit for bit on those two; dlib's strided convs differ
      by float rounding, ~5e-8 in `eval`'s metrics). FaceNet's and the FID Inception's stems
      and reductions, dlib's strided convs and the ViT's patch embedding are such convolutions.
    Every other conv, and every conv on another platform, is lax's (`several_platforms`: an
    export for cpu and cuda carries each). Same parameters and values (tests/test_layers.py)."""
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    plain = _plain_nhwc(
        lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count * batch_group_count
    )
    pointwise = plain and rhs.shape[:2] == (1, 1)
    if plain and not pointwise and _adds_nothing(padding, "VALID"):

        def padded_then_cropped(x, kernel):
            valid = jax.eval_shape(conv, x, kernel).shape
            y = conv(x, kernel, padding=((0, 1), (0, 1)))
            return y[:, : valid[1], : valid[2], :]

        return _per_platform(lhs, rhs, cpu=padded_then_cropped, default=conv)
    undilated = all(d == 1 for d in rhs_dilation or ())
    if not (pointwise and undilated and _adds_nothing(padding, "SAME", "VALID")):
        return conv(lhs, rhs)
    sh, sw = window_strides

    def matmul(x, kernel):
        # SAME and VALID agree for a 1x1 kernel at any stride: output i reads input i * stride.
        return jnp.einsum(
            "bhwc,cd->bhwd",
            x[:, ::sh, ::sw, :],
            kernel[0, 0],
            precision=precision,
            preferred_element_type=preferred_element_type,
        )

    return _per_platform(lhs, rhs, cpu=matmul, default=conv)


def _plain_nhwc(lhs, rhs, lhs_dilation, dimension_numbers, groups) -> bool:
    """A 2-D, ungrouped NHWC/HWIO conv without input dilation: where the CPU rewrites apply."""
    if lhs.ndim != 4 or groups != 1 or any(d != 1 for d in lhs_dilation or ()):
        return False
    layout = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return layout == _NHWC_HWIO


def _adds_nothing(padding, *names: str) -> bool:
    """All-zero explicit padding, or a padding string among `names` (case-insensitive)."""
    if isinstance(padding, str):
        return padding.upper() in names
    return all(tuple(p) == (0, 0) for p in padding)


# flax's Conv computing with `conv_general_dilated`: the same module, parameter names and
# auto-names ("Conv_0"), so checkpoints and converters see no difference.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: int = 1,
    padding: Padding = "SAME",
    dilation: int = 1,
    impl: str = "auto",
) -> jax.Array:
    """Depthwise convolution: x [B,H,W,C], kernel [kh,kw,1,C] (flax's grouped-conv layout).

    padding: "SAME" / "VALID" (TF rules) or ((top, bottom), (left, right)).
    impl: "xla" is the grouped convolution (`feature_group_count=C`), what cuDNN and TPUs run
    well; "shifted" sums kh*kw strided slices of the padded input, each times one kernel tap.
    XLA's CPU grouped convolution is 4-40x slower than the shifted sum, forward and backward
    (measured on 2 cores: 16x56x56x32 forward 48 ms vs 1.1 ms, with its gradients 143 vs 31
    ms), so "auto" runs "shifted" on CPU and "xla" elsewhere (`several_platforms`: a model
    exported for cpu and cuda carries each). Both give the same values
    (tests/test_layers.py).
    """
    if impl == "auto":
        return _per_platform(
            x,
            kernel,
            cpu=lambda x, k: depthwise_conv(x, k, strides, padding, dilation, "shifted"),
            default=lambda x, k: depthwise_conv(x, k, strides, padding, dilation, "xla"),
        )
    kh, kw = kernel.shape[:2]
    if kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
        raise ValueError(f"depthwise kernel must be [kh,kw,1,{x.shape[-1]}], got {kernel.shape}")
    span = ((kh - 1) * dilation + 1, (kw - 1) * dilation + 1)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], span, (strides, strides), padding)
    padding = tuple(tuple(p) for p in padding)
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (strides, strides),
            padding,
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    if impl != "shifted":
        raise ValueError(f"unknown depthwise impl {impl!r} (auto|xla|shifted)")
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out = None
    for (i, j), window in _window_taps(x, (kh, kw), (strides, strides), dilation):
        term = window * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def _window_taps(x: jax.Array, window_shape, strides, dilation: int = 1):
    """((i, j), tap) for every position of a kh x kw window over an already padded x
    [B,H,W,C], row-major: tap [B,out_h,out_w,C] holds x[:, i*d + s_h*oh, j*d + s_w*ow, :] for
    every output position (oh, ow), one strided slice."""
    (kh, kw), (sh, sw) = window_shape, strides
    b, h, w, c = x.shape
    out_h = (h - (kh - 1) * dilation - 1) // sh + 1
    out_w = (w - (kw - 1) * dilation - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation, j * dilation
            tap = jax.lax.slice(
                x,
                (0, top, left, 0),
                (b, top + sh * (out_h - 1) + 1, left + sw * (out_w - 1) + 1, c),
                (1, sh, sw, 1),
            )
            yield (i, j), tap


def max_pool(x: jax.Array, window_shape, strides=None, padding: Padding = "VALID") -> jax.Array:
    """`flax.linen.max_pool` of x [B,H,W,C]: the same values and the same gradient, bit for bit.

    XLA:CPU lowers a max-pool's gradient (select-and-scatter) to index iotas, a variadic
    reduce-window and a scatter, 4-25x slower than the arithmetic needs (2 Xeon cores, pool
    and gradient: FaceNet's 16x77x77x64 3x3/2 79 vs 20 ms, VGG16's 16x56x56x64 2x2/2 39 vs
    1.6 ms). On CPU the pool is instead the max of the window's kh*kw strided slices, with a
    custom JVP that passes each window's tangent from its FIRST maximum in row-major order,
    which is the element XLA's select-and-scatter (select = ge) picks on ties; JAX transposes
    that JVP into pads whose sum runs in the order XLA's scatter adds, so values and gradients
    equal nn.max_pool's bit for bit (tests/test_layers.py, on inputs full of ties). JVPs take
    the same element as the gradient; nn.max_pool's own JVP does too under the tests' XLA flags,
    not always with XLA's default optimisation (3x3/2 SAME: another tied element). Floating
    inputs only; a window holding a NaN passes no gradient (XLA's gives it to one element).
    Elsewhere, and for non-4-D inputs, nn.max_pool itself (`several_platforms`).
    """
    window_shape = tuple(window_shape)
    strides = tuple(strides) if strides is not None else (1,) * len(window_shape)
    flax_pool = functools.partial(
        nn.max_pool, window_shape=window_shape, strides=strides, padding=padding
    )
    if x.ndim != 4 or len(window_shape) != 2:
        return flax_pool(x)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], window_shape, strides, padding)
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    return _per_platform(
        x,
        cpu=lambda x: _first_max_pool(x, window_shape, strides, pads),
        default=flax_pool,
    )


def _padded_taps(x: jax.Array, window_shape, strides, pads, value) -> list[jax.Array]:
    """The window's strided slices (`_window_taps`, row-major) of x padded with `value`."""
    config = ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0))
    padded = jax.lax.pad(x, jnp.asarray(value, x.dtype), config)
    return [tap for _, tap in _window_taps(padded, window_shape, strides)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _first_max_pool(x, window_shape, strides, pads):
    return functools.reduce(jnp.maximum, _padded_taps(x, window_shape, strides, pads, -jnp.inf))


@_first_max_pool.defjvp
def _first_max_pool_jvp(window_shape, strides, pads, primals, tangents):
    (x,), (t,) = primals, tangents
    taps = _padded_taps(x, window_shape, strides, pads, -jnp.inf)
    y = functools.reduce(jnp.maximum, taps)  # the primal, from the same slices
    taken = jnp.zeros(y.shape, bool)
    out = None
    for tap, tangent in zip(taps, _padded_taps(t, window_shape, strides, pads, 0)):
        first = (tap == y) & ~taken
        taken = taken | first
        term = jnp.where(first, tangent, jnp.zeros((), tangent.dtype))
        out = term if out is None else out + term
    return y, out


class DepthwiseConv(nn.Module):
    """`nn.Conv(C, feature_group_count=C)` with the same parameters (kernel [k,k,1,C], bias
    [C]) computed by `depthwise_conv`, so checkpoints and converters see no difference."""

    kernel_size: int
    strides: int = 1
    padding: Padding = "SAME"
    dilation: int = 1
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    impl: str = "auto"  # depthwise_conv's impl
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = depthwise_conv(x, kernel, self.strides, self.padding, self.dilation, self.impl)
        return y if bias is None else y + bias


class ConvBNReLU(nn.Module):
    """Conv (optionally depthwise-separable) + BatchNorm (PyTorch defaults) + ReLU."""

    features: int
    kernel_size: int = 1
    dilation: int = 1
    separable: bool = False
    use_bias: bool = False
    depthwise_impl: str = "auto"  # the separable branch's depthwise_conv impl
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(
            Conv, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype
        )
        k, d = self.kernel_size, self.dilation
        padding = same_padding(k, d)
        if self.separable:
            x = DepthwiseConv(
                k,
                padding=padding,
                dilation=d,
                use_bias=self.use_bias,
                impl=self.depthwise_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv_dw",
            )(x)
            x = conv(self.features, (1, 1), name="conv_pw")(x)
        else:
            x = conv(self.features, (k, k), padding=padding, kernel_dilation=d, name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)
        return nn.relu(x)
