"""Robustness perturbations of the paper's evaluation, as tf.data-ready TensorFlow ops.

The paper reports recovery under Gaussian blur (kernel 3-7), JPEG compression (quality 50-99)
and additive Gaussian noise (variance 10-50, in 0..255 pixel units). `perturb(image, name,
seed, level)` applies one of them to a uint8 [H,W,3] image with a static shape and returns
uint8 of the same shape; it works in graph mode inside `tf.data.Dataset.map` and is
deterministic for a seed. `level=None` draws the level from the paper's range with `seed`;
a given level fixes it (evaluation tables). `parse("jpeg:75")` reads `--perturb` flags.

- gaussian_blur: level = odd kernel size k (random: one of 3, 5, 7). Matches
  `cv2.GaussianBlur(img, (k, k), 0)`: OpenCV's kernel for sigma 0 (its fixed table for
  k <= 7, else sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8), separable, BORDER_REFLECT_101
  padding (tf.pad "REFLECT"), halves rounded up: bit-exact with OpenCV 5.0 for k in {3, 5, 7}
  on real faces, within 1 grey level for larger k (OpenCV quantises those kernels).
- jpeg: level = quality, an int (random: uniform in [50, 99]); encode + decode with
  `tf.image.adjust_jpeg_quality` (accepts a tensor quality), decoded with the accurate
  integer DCT as PIL/libjpeg do by default (equal to a PIL save/load at that quality, 4:2:0).
- gaussian_noise: level = variance (random: uniform in [10, 50]); adds N(0, sqrt(variance))
  per pixel and channel, then rounds and clips to [0, 255].
"""

import math

from dfrec_jax.host_tf import tf

PERTURBATIONS = ("gaussian_blur", "jpeg", "gaussian_noise")

BLUR_KERNELS = (3, 5, 7)
JPEG_QUALITY_RANGE = (50, 99)  # inclusive
NOISE_VARIANCE_RANGE = (10.0, 50.0)

# cv2.getGaussianKernel(k, sigma <= 0) uses these fixed kernels for small k.
_CV2_SMALL_KERNELS = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def gaussian_kernel(k: int) -> tuple[float, ...]:
    """OpenCV's 1-D Gaussian kernel for odd size k and sigma 0 (derived from k)."""
    if k in _CV2_SMALL_KERNELS:
        return _CV2_SMALL_KERNELS[k]
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    taps = [math.exp(-((i - (k - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(k)]
    return tuple(t / sum(taps) for t in taps)


def _check_level(name: str, level):
    """Validates a fixed level; returns it as the type the perturbation uses."""
    if name == "gaussian_blur":
        if isinstance(level, float) and level.is_integer():
            level = int(level)
        if not isinstance(level, int) or isinstance(level, bool) or level < 1 or level % 2 == 0:
            raise ValueError(f"gaussian_blur level must be an odd kernel size >= 1, got {level!r}")
        return level
    if name == "jpeg":
        if isinstance(level, float) and level.is_integer():
            level = int(level)
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 100:
            raise ValueError(f"jpeg level must be an int quality in [1, 100], got {level!r}")
        return level
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise ValueError(f"gaussian_noise level must be a variance >= 0, got {level!r}")
    if not (math.isfinite(level) and level >= 0):
        raise ValueError(f"gaussian_noise level must be a variance >= 0, got {level!r}")
    return float(level)


def _check_name(name: str) -> None:
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; known: {', '.join(PERTURBATIONS)}")


def _blur(image: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Separable blur of uint8 [H,W,C] with a 1-D float kernel of static odd length."""
    radius = kernel.shape[0] // 2
    channels = image.shape[-1]
    x = tf.cast(image, tf.float32)[None]
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    column = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    row = tf.reshape(column, [1, -1, channels, 1])
    x = tf.nn.depthwise_conv2d(x, column, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, row, [1, 1, 1, 1], "VALID")
    return x[0]


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    # Halves round up, as OpenCV's saturate_cast does (tf.round would round them to even).
    return tf.cast(tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0), tf.uint8)


def perturb(
    image: tf.Tensor, name: str, seed: tf.Tensor, level: float | int | None = None
) -> tf.Tensor:
    """uint8 [H,W,3] -> uint8 [H,W,3] perturbed by `name` at `level` (None: random, seeded)."""
    _check_name(name)
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"perturb expects a uint8 image, got {image.dtype.name}")
    shape = image.shape
    seed = tf.cast(seed, tf.int64)
    if level is not None:
        level = _check_level(name, level)

    if name == "gaussian_blur":
        if level is None:
            # Every candidate zero-padded to the largest size: one static conv serves all.
            width = max(BLUR_KERNELS)
            table = [
                [0.0] * ((width - k) // 2) + list(gaussian_kernel(k)) + [0.0] * ((width - k) // 2)
                for k in BLUR_KERNELS
            ]
            index = tf.random.stateless_uniform([], seed, 0, len(BLUR_KERNELS), dtype=tf.int32)
            kernel = tf.gather(tf.constant(table, tf.float32), index)
            kernel = tf.ensure_shape(kernel, [width])
        else:
            kernel = tf.constant(gaussian_kernel(level), tf.float32)
        out = _to_uint8(_blur(image, kernel))
    elif name == "jpeg":
        if level is None:
            lo, hi = JPEG_QUALITY_RANGE
            quality = tf.random.stateless_uniform([], seed, lo, hi + 1, dtype=tf.int32)
        else:
            quality = tf.constant(level, tf.int32)
        out = tf.image.adjust_jpeg_quality(image, quality, dct_method="INTEGER_ACCURATE")
    else:
        seeds = tf.random.experimental.stateless_split(seed, 2)
        if level is None:
            lo, hi = NOISE_VARIANCE_RANGE
            variance = tf.random.stateless_uniform([], seeds[0], lo, hi)
        else:
            variance = tf.constant(level, tf.float32)
        noise = tf.random.stateless_normal(tf.shape(image), seeds[1]) * tf.sqrt(variance)
        out = _to_uint8(tf.cast(image, tf.float32) + noise)
    return tf.ensure_shape(tf.reshape(out, tf.shape(image)), shape)


def parse(spec: str) -> tuple[str, int | float | None]:
    """ "jpeg" -> ("jpeg", None); "jpeg:75" -> ("jpeg", 75); "gaussian_noise:30" -> (.., 30.0)."""
    name, sep, text = spec.strip().partition(":")
    name = name.strip()
    _check_name(name)
    if not sep:
        return name, None
    text = text.strip()
    try:
        level = float(text) if name == "gaussian_noise" else int(text)
    except ValueError:
        raise ValueError(f"bad level {text!r} in perturbation spec {spec!r}") from None
    return name, _check_level(name, level)
