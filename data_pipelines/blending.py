"""Blended-image (BI) forgeries made on the fly inside tf.data (Face X-ray style).

`blend_pair(target, partner, seed, morph_fraction, morph_alpha)` pastes the face region of one
pristine example (the partner, whose identity becomes the forgery's source) into another (the
target) and returns an example with the same feature dict as the builders (see `features.py`),
label 1, method "blended" (a splice, alpha 1) or, with probability `morph_fraction`,
"morph_blended" (a texture morph, alpha ~ U[morph_alpha]). Pure TensorFlow with stateless
random ops: it runs in graph mode inside `tf.data.Dataset.map`, is deterministic for a seed,
and keeps every shape static.

Algorithm, for an aligned dataset of size S (all our datasets are aligned crops, so the
partner's face sits roughly where the target's does and one region serves both faces):
1. Region: the target's `face_mask` (convex hull of its 68 landmarks), binarised at 128. If
   it is empty, a fixed central ellipse (the aligned-face template, `template_face_mask`) is
   used instead; callers should filter such examples with `is_blendable` anyway.
2. Random deformation of the region (as float in [0, 1]):
   - affine about the region's centroid: scale in SCALE_RANGE, shift up to SHIFT_MAX * S per
     axis, rotation up to ROTATION_MAX_DEG (bilinear, ImageProjectiveTransformV3);
   - identity, erosion or dilation with a square kernel drawn from a small static set of odd
     sizes ~2-8 % of S (max-pool, and -max-pool(-x) for erosion; tf.switch_case);
   - with probability ELASTIC_PROB an elastic warp: a random ELASTIC_GRID^2 displacement
     field (each component up to a random amplitude <= ELASTIC_MAX * S) upsampled bilinearly to
     S x S, then bilinear resampling written with tf.gather_nd (zero outside the image);
   then binarised at 0.5. An empty result falls back to the undeformed region, so the
   forgery mask is never empty.
3. Soft edge: Gaussian blur of the binary region with sigma uniform in
   [SIGMA_RANGE[0] * S, SIGMA_RANGE[1] * S] (separable convolution, kernel built in-graph with
   a static radius of 3 * max sigma, zero padding), quantised to uint8 FIRST: that uint8 is
   the returned `mask` (255 = pixel fully from the partner). A blurred single pixel still
   rounds to >= 1, and the binary region is the last-resort fallback, so it is never empty.
4. Colour transfer (Reinhard-style, in RGB): the partner's per-channel mean and std inside
   the binary region are matched to the target's inside the same region, clipped to [0, 255].
5. Kind and texture: with probability `morph_fraction` (a uniform draw keyed by
   fold_in(seed, MORPH_SALT), so the other draws above are the same for either kind) the
   forgery is a morph: alpha ~ U[morph_alpha] (a second uniform of the same key) and the
   texture is alpha * partner_ct + (1 - alpha) * target, which keeps part of the target's
   identity inside the face; otherwise alpha = 1 and the texture is partner_ct (a splice). The
   partner is not re-warped (aligned crops), and the mask stays the region, whatever alpha.
6. image = round(target * (1 - a) + texture * a) with a = mask / 255: where mask == 0 the
   image equals the target bit for bit; where mask == 255 it is the texture. The returned
   `alpha` (float32) is the drawn alpha (1.0 for a splice).

Assumption: the partner is pristine (the caller pairs pristine examples, checked with
`is_blendable` or its own filter); its `image` is the face pasted in and its `target_id` is
the identity of the returned `source`.
"""

import math

from data_pipelines.swap import MORPH_ALPHA, check_alpha_range
from dfrec_jax.host_tf import tf

METHOD = "blended"  # a splice: pure partner texture inside the region
MORPH_METHOD = "morph_blended"  # a texture morph: alpha * partner + (1 - alpha) * target
MORPH_SALT = 0x6D6F7270  # fold_in key of the morph draws ("morp")

SCALE_RANGE = (0.9, 1.1)
SHIFT_MAX = 0.04  # fraction of S, per axis
ROTATION_MAX_DEG = 8.0
MORPH_FRACTIONS = (0.02, 0.04, 0.06, 0.08)  # erosion/dilation kernel sizes as fractions of S
ELASTIC_PROB = 0.5
ELASTIC_GRID = 4
ELASTIC_MAX = 0.03  # fraction of S
SIGMA_RANGE = (0.01, 0.04)  # blur sigma as fractions of S
MIN_FACE_PIXELS = 64


def is_blendable(example: dict, min_pixels: int = MIN_FACE_PIXELS) -> tf.Tensor:
    """tf.bool: the example is pristine and its face_mask has at least `min_pixels` pixels."""
    pixels = tf.reduce_sum(tf.cast(example["face_mask"] >= 128, tf.int32))
    pristine = tf.equal(tf.cast(example["label"], tf.int64), 0)
    return tf.logical_and(pristine, pixels >= min_pixels)


def template_face_mask(size: int) -> tf.Tensor:
    """float32 [S,S,1] in {0,1}: a central ellipse where aligned crops hold the face."""
    coords = tf.range(size, dtype=tf.float32) + 0.5
    y, x = tf.meshgrid(coords / size, coords / size, indexing="ij")
    inside = ((x - 0.5) / 0.32) ** 2 + ((y - 0.6) / 0.36) ** 2 <= 1.0
    return tf.cast(inside, tf.float32)[..., None]


def _morph_kernels(size: int) -> tuple[int, ...]:
    return tuple(sorted({2 * max(1, round(size * f / 2)) + 1 for f in MORPH_FRACTIONS}))


def _affine(region: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random scale/shift/rotation of a float [S,S,1] region about its centroid."""
    size = region.shape[0]
    u = tf.random.stateless_uniform([4], seed, -1.0, 1.0)
    scale = (SCALE_RANGE[0] + SCALE_RANGE[1]) / 2 + u[0] * (SCALE_RANGE[1] - SCALE_RANGE[0]) / 2
    shift_x, shift_y = u[1] * SHIFT_MAX * size, u[2] * SHIFT_MAX * size
    theta = u[3] * math.radians(ROTATION_MAX_DEG)
    idx = tf.range(size, dtype=tf.float32)
    total = tf.reduce_sum(region)
    safe = tf.maximum(total, 1e-6)
    cx = tf.where(total > 0, tf.reduce_sum(region[..., 0] * idx[None, :]) / safe, (size - 1) / 2)
    cy = tf.where(total > 0, tf.reduce_sum(region[..., 0] * idx[:, None]) / safe, (size - 1) / 2)
    # The op maps OUTPUT pixels to INPUT pixels: the inverse of out = c + s R (in - c) + t.
    cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
    a0, a1, b0, b1 = cos, sin, -sin, cos
    px, py = cx + shift_x, cy + shift_y
    transform = tf.stack(
        [a0, a1, cx - (a0 * px + a1 * py), b0, b1, cy - (b0 * px + b1 * py), 0.0, 0.0]
    )
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=region[None],
        transforms=transform[None],
        output_shape=tf.constant([size, size], tf.int32),
        fill_value=tf.constant(0.0),
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.ensure_shape(out[0], region.shape)


def _morphology(region: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Identity, erosion or dilation with a random square kernel from a static set."""
    kernels = _morph_kernels(region.shape[0])
    x = region[None]

    def dilate(k):
        return lambda: tf.nn.max_pool2d(x, k, 1, "SAME")[0]

    def erode(k):
        return lambda: -tf.nn.max_pool2d(-x, k, 1, "SAME")[0]

    branches = [lambda: region] + [erode(k) for k in kernels] + [dilate(k) for k in kernels]
    index = tf.random.stateless_uniform([], seed, 0, len(branches), dtype=tf.int32)
    return tf.ensure_shape(tf.switch_case(index, branches), region.shape)


def _bilinear_sample(image: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """image [S,S,C] sampled at float pixel coords x, y [S,S]; zero outside the image."""
    size = image.shape[0]
    padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]])  # zero border = "outside"
    x = tf.clip_by_value(x, -1.0, float(size)) + 1.0
    y = tf.clip_by_value(y, -1.0, float(size)) + 1.0
    x0, y0 = tf.floor(x), tf.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    x0 = tf.cast(x0, tf.int32)
    y0 = tf.cast(y0, tf.int32)
    x1 = tf.minimum(x0 + 1, size + 1)
    y1 = tf.minimum(y0 + 1, size + 1)

    def at(yy, xx):
        return tf.gather_nd(padded, tf.stack([yy, xx], axis=-1))

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def _elastic(region: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """With probability ELASTIC_PROB, warp by a smooth random displacement field."""
    size = region.shape[0]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    use = tf.random.stateless_uniform([], seeds[0]) < ELASTIC_PROB
    amplitude = tf.random.stateless_uniform([], seeds[1], 0.0, ELASTIC_MAX * size)
    amplitude = tf.where(use, amplitude, 0.0)
    coarse = tf.random.stateless_uniform([ELASTIC_GRID, ELASTIC_GRID, 2], seeds[2], -1.0, 1.0)
    flow = tf.image.resize(coarse, [size, size], method="bilinear") * amplitude
    idx = tf.range(size, dtype=tf.float32)
    y, x = tf.meshgrid(idx, idx, indexing="ij")
    return _bilinear_sample(region, x + flow[..., 0], y + flow[..., 1])


def _gaussian_blur(region: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Separable Gaussian blur of a float [S,S,1] map with a random sigma (zero padding)."""
    size = region.shape[0]
    lo, hi = SIGMA_RANGE[0] * size, SIGMA_RANGE[1] * size
    radius = max(1, math.ceil(3 * hi))
    sigma = tf.random.stateless_uniform([], seed, lo, hi)
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / sigma))
    kernel /= tf.reduce_sum(kernel)
    x = tf.nn.conv2d(region[None], tf.reshape(kernel, [-1, 1, 1, 1]), 1, "SAME")
    x = tf.nn.conv2d(x, tf.reshape(kernel, [1, -1, 1, 1]), 1, "SAME")
    return x[0]


def _masked_stats(image: tf.Tensor, region: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-channel mean and std of float image [S,S,3] over the binary region [S,S,1]."""
    count = tf.maximum(tf.reduce_sum(region), 1.0)
    mean = tf.reduce_sum(image * region, axis=[0, 1]) / count
    var = tf.reduce_sum(tf.square(image - mean) * region, axis=[0, 1]) / count
    return mean, tf.sqrt(var)


def colour_transfer(partner: tf.Tensor, target: tf.Tensor, region: tf.Tensor) -> tf.Tensor:
    """float partner [S,S,3] with its mean/std inside `region` matched to target's (RGB)."""
    mean_p, std_p = _masked_stats(partner, region)
    mean_t, std_t = _masked_stats(target, region)
    out = (partner - mean_p) * (std_t / tf.maximum(std_p, 1.0)) + mean_t
    return tf.clip_by_value(out, 0.0, 255.0)


def blend_mask(face_mask: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(uint8 soft blend mask [S,S,1], float binary region [S,S,1]) from a uint8 face mask."""
    size = face_mask.shape[0]
    seeds = tf.random.experimental.stateless_split(seed, 4)
    face = tf.cast(face_mask >= 128, tf.float32)
    face = tf.where(tf.reduce_any(face > 0), face, template_face_mask(size))
    region = _affine(face, seeds[0])
    region = _morphology(region, seeds[1])
    region = _elastic(region, seeds[2])
    region = tf.cast(region >= 0.5, tf.float32)
    region = tf.where(tf.reduce_any(region > 0), region, face)
    alpha = _gaussian_blur(region, seeds[3])
    mask = tf.cast(tf.round(tf.clip_by_value(alpha, 0.0, 1.0) * 255.0), tf.uint8)
    mask = tf.where(tf.reduce_any(mask > 0), mask, tf.cast(region * 255.0, tf.uint8))
    return tf.ensure_shape(mask, face_mask.shape), region


def morph_draw(seed: tf.Tensor, morph_fraction: float, morph_alpha=MORPH_ALPHA):
    """(tf.bool is_morph, float32 alpha: U[morph_alpha] for a morph, else 1.0) for `seed`."""
    lo, hi = check_alpha_range(morph_alpha)
    if not 0.0 <= morph_fraction <= 1.0:
        raise ValueError(f"morph_fraction must be in [0, 1], got {morph_fraction}")
    key = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), MORPH_SALT)
    u = tf.random.stateless_uniform([2], key)
    is_morph = u[0] < morph_fraction
    alpha = tf.where(is_morph, lo + u[1] * (hi - lo), 1.0)
    return is_morph, alpha


def blend_pair(
    target: dict,
    partner: dict,
    seed: tf.Tensor,
    morph_fraction: float = 0.0,
    morph_alpha: tuple[float, float] = MORPH_ALPHA,
) -> dict:
    """A BI forgery: partner's face pasted into target (both pristine), same feature dict.

    `seed`: int32/int64 [2] for the stateless random ops. `morph_fraction`: probability of a
    texture morph (alpha ~ U[morph_alpha]) instead of a splice (alpha 1). See the module
    docstring for the algorithm. Keys not listed below are copied from `target`.
    """
    size = target["image"].shape[0]
    if size is None:
        raise ValueError("blend_pair needs static image shapes [S,S,3]")
    seed = tf.cast(seed, tf.int64)
    mask, region = blend_mask(target["face_mask"], seed)
    is_morph, alpha = morph_draw(seed, morph_fraction, morph_alpha)
    target_f = tf.cast(target["image"], tf.float32)
    partner_f = colour_transfer(tf.cast(partner["image"], tf.float32), target_f, region)
    texture = alpha * partner_f + (1.0 - alpha) * target_f  # alpha 1: exactly partner_f
    # Quantised alpha first: mask == 0 gives a == 0 exactly, so image == target bit for bit.
    a = tf.cast(mask, tf.float32) / 255.0
    blended = tf.round(target_f * (1.0 - a) + texture * a)
    image = tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)
    out = dict(target)
    out.update(
        image=tf.ensure_shape(image, target["image"].shape),
        source=partner["image"],
        target=target["image"],
        mask=mask,
        face_mask=target["face_mask"],
        landmarks=target["landmarks"],
        alpha=tf.cast(alpha, tf.float32),
        label=tf.ones_like(target["label"]),
        method=tf.where(is_morph, tf.constant(MORPH_METHOD), tf.constant(METHOD)),
        source_id=partner["target_id"],
        target_id=target["target_id"],
    )
    return out
