"""DFREC training losses: identity, perceptual, attribute, patch recovery (+ optional mask).

Every loss is written against plain callables, so any frozen network (the real FaceNet / VGG /
attribute ports, or tiny random nets in tests) can be plugged in:

    identity_fn(images)   -> (features: tuple of 4 maps [B, ...], embedding [B, D], L2-normalised)
    perceptual_fn(images) -> tuple of 5 maps [B, ...]
    attribute_fn(images)  -> [B, A]

Images are float32 NHWC in [0, 1]; each network does its own preprocessing. Networks may
compute in bfloat16 (config loss.dtype, loss_nets.py); their outputs are cast to float32
before every reduction below, so the losses and their metrics are float32. Notation: r is a
recovered image, t the true image, B the batch, and every per-sample term is averaged over the
batch last (the `*_per_sample` functions return it before that mean, so callers can mask it).

  identity  (per sample)  = 1/4 * sum_{l=1..4} (1 - cos(vec f_l(r), vec f_l(t)))
                            + (1 - cos(e(r), e(t)))
            where vec flattens one sample's feature map and cos(a, b) = <a, b> / (n(a) n(b)),
            n(x) = sqrt(|x|^2 + 1e-12) (finite gradients for all-zero ReLU maps). The layer term
            and the embedding term are summed, so the loss lies in [0, 4].
  perceptual (per sample) = 1/5 * sum_{l=1..5} 1/(H_l W_l) * sum_{h,w} |u_l(r)_hw - u_l(t)_hw|_2^2,
            u_l(x)_hw = phi_l(x)_hw / n(phi_l(x)_hw): each position's feature vector scaled to
            unit length over the channels (LPIPS' normalisation, without its learned channel
            weights). Each layer term lies in [0, 4], whatever the layer's activation scale, so
            no layer and no other term is negligible or dominant by construction (raw VGG
            feature MSEs are ~10 and made 80% of the total).
  attribute (per sample)  = sum_a smoothL1_{beta=1}(a(r)_a - a(t)_a)  (summed over the A outputs:
            a mean over A = 145 face-api outputs made the term ~0.01, i.e. nothing),
            smoothL1(x) = 0.5 x^2 if |x| <= 1 else |x| - 0.5 (= optax.huber_loss, delta=1).
  patch     (per sample)  = 1/K * sum_{k=1..K} sqrt(|pred_k - patchify(t)[mask_idx_k]|_2^2 + 1e-8)
            Eq. 9: the L2 distance of each masked patch (over its p*p*3 values) averaged over
            the K masked patches. Not squared and not divided by p*p*3: the per-value MSE
            (the MAE convention) is ~0.06 and made the term ~1% of the total.
  mask                    = sum_b has_b * m_b / max(sum_b has_b, 1),
            m_b = mean over pixels of sigmoid_binary_cross_entropy(seg_logits_b, mask_b);
            exactly 0 when no sample has a mask.
  classification          = mean_b sigmoid_binary_cross_entropy(forgery_logit_b, label_b).

  L_id   = id_src + lambda_id * id_tgt                      (Eq. 4)
  L_perc = perc_src + lambda_perc * perc_tgt                (Eq. 7)
  total  = w_id L_id + w_perc L_perc + w_attr attr_tgt + w_patch patch_tgt        (Eq. 10)
           + w_mask mask + w_cls classification             (extensions, off by default)

Loss weights (`LossWeights`), our reading of the paper: "To improve the target face recovery
quality, the parameters [two symbols] are set as 2. The loss weights [three symbols] are set as
0.5". Eq. 4 and Eq. 7 are the only equations that combine a source and a target term, so the
two parameters that improve the TARGET are the factors on the target terms there:
lambda_id = lambda_perc = 2 (`identity_target`, `perceptual_target`). Eq. 10 sums four totals
with three weights, so the first (identity) carries 1 and the other three 0.5:
w_id = 1, w_perc = w_attr = w_patch = 0.5. (An earlier version of this project read "2" as the
attribute and patch weights; with its scales the target terms were ~9% of the total.) The mask
and classification terms are extensions (the paper constrains neither), off by default.

Each weighted term's share of the total is reported as `share/<term>` (source and target
identity/perceptual terms separately) so a run shows which term drives the gradient.

Frozen-network contract: the networks are constants. Their parameters must not be traced
arguments of the function being differentiated; close over them through
`jax.lax.stop_gradient` (see `frozen`), so gradients reach the recovered images only. The true
images' network outputs are also wrapped in stop_gradient: they are fixed references.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfrec_jax import masking

_EPS = 1e-12
_PATCH_EPS = 1e-8  # inside the patch L2's sqrt: a finite gradient at a perfect patch
NUM_IDENTITY_LAYERS = 4
NUM_PERCEPTUAL_LAYERS = 5


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["identity", "perceptual", "attribute"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class LossNets:
    """The frozen networks the losses use (callables on [B, H, W, 3] images in [0, 1]).

    A pytree: a network that is itself a pytree (loss_nets.py's are) contributes its weights as
    leaves; a plain function is one leaf that `split_frozen` keeps out of the arguments.
    """

    identity: Callable
    perceptual: Callable
    attribute: Callable | None


class FrozenLayout:
    """Puts a list of arrays back into the places `split_frozen` took them from. Hashable and
    comparable (by tree structure and non-array leaves), so jit can take it as a static
    argument and two equal layouts share one compiled program."""

    def __init__(self, treedef, static_leaves: tuple):
        self.treedef, self.static_leaves = treedef, static_leaves  # None marks an array slot
        self.count = sum(leaf is None for leaf in static_leaves)

    def __call__(self, arrays):
        if len(arrays) != self.count:
            raise ValueError(f"split_frozen: expected {self.count} arrays, got {len(arrays)}")
        it = iter(arrays)
        leaves = [next(it) if leaf is None else leaf for leaf in self.static_leaves]
        return jax.tree.unflatten(self.treedef, leaves)

    def __hash__(self):
        return hash((self.treedef, self.static_leaves))

    def __eq__(self, other):
        return isinstance(other, FrozenLayout) and (self.treedef, self.static_leaves) == (
            other.treedef,
            other.static_leaves,
        )


def split_frozen(nets: Any) -> tuple[list, FrozenLayout]:
    """(arrays, rebuild): the array leaves of `nets` (a LossNets, eval's scorers) and the
    layout that puts such a list (or its tracers) back, every other leaf as it was.

    A jitted step that takes `arrays` as an argument and calls `rebuild` inside compiles the
    frozen networks' weights as parameters, not constants: 155 MB of FaceNet, VGG16 and
    face-api weights otherwise go into every compiled program (and its compile time).
    """
    leaves, treedef = jax.tree.flatten(nets)
    is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array) if a]
    static = tuple(None if a else x for x, a in zip(leaves, is_array))
    return arrays, FrozenLayout(treedef, static)


class BoundToFrozen:
    """A jitted function whose last argument is `split_frozen`'s arrays, bound to them (placed
    once): `fn(*args)`; `lower(*args)` and `call(compiled, *args)` give the ahead-of-time path
    (bench) the same signature."""

    def __init__(self, jitted, frozen_arrays):
        self.jitted = jitted
        self.frozen_arrays = frozen_arrays

    def __call__(self, *args):
        return self.jitted(*args, self.frozen_arrays)

    def lower(self, *args):
        return self.jitted.lower(*args, self.frozen_arrays)

    def call(self, compiled, *args):
        return compiled(*args, self.frozen_arrays)


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the total loss; see the module docstring for the paper reading."""

    identity: float = 1.0
    perceptual: float = 0.5
    attribute: float = 0.5
    patch: float = 0.5
    mask: float = 0.0
    classification: float = 0.0
    identity_target: float = 2.0  # lambda on the target term inside L_id (Eq. 4)
    perceptual_target: float = 2.0  # lambda on the target term inside L_perc (Eq. 7)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["variables"], meta_fields=["apply_fn"]
)
@dataclasses.dataclass(frozen=True)
class Frozen:
    """images -> apply_fn(stop_gradient(variables), images); a pytree whose leaves are the
    variables (so `split_frozen` can make them arguments of a jitted step)."""

    apply_fn: Callable
    variables: Any

    def __call__(self, images):
        return self.apply_fn(jax.lax.stop_gradient(self.variables), images)


def frozen(apply_fn: Callable, variables: Any) -> Frozen:
    """A network whose parameters are constants even when `variables` are traced (jit
    arguments, or inside a grad): images -> apply_fn(stop_gradient(variables), images)."""
    return Frozen(apply_fn, variables)


def _check_pair(name: str, recovered: jax.Array, true: jax.Array) -> None:
    if recovered.shape != true.shape or recovered.ndim != 4 or recovered.shape[-1] != 3:
        raise ValueError(
            f"{name}: recovered and true images must both be [B, H, W, 3], "
            f"got {recovered.shape} and {true.shape}"
        )


def _outputs(fn: Callable, recovered: jax.Array, true: jax.Array):
    """fn on the recovered images (differentiable) and on the true ones (constant)."""
    rec = fn(jnp.asarray(recovered, jnp.float32))
    ref = jax.lax.stop_gradient(fn(jnp.asarray(true, jnp.float32)))
    return rec, ref


def _flat(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape[0], -1)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-sample cosine of flattened a, b [B, ...] -> [B], with n(x) = sqrt(|x|^2 + 1e-12)."""
    a, b = _flat(a), _flat(b)
    na = jnp.sqrt(jnp.sum(a * a, axis=-1) + _EPS)
    nb = jnp.sqrt(jnp.sum(b * b, axis=-1) + _EPS)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def identity_per_sample(
    identity_fn: Callable, recovered: jax.Array, true: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-sample identity loss [B] and its two parts (features, embedding), each [B]."""
    _check_pair("identity_loss", recovered, true)
    (feats_r, emb_r), (feats_t, emb_t) = _outputs(identity_fn, recovered, true)
    if len(feats_r) != NUM_IDENTITY_LAYERS:
        raise ValueError(
            f"identity_fn must return {NUM_IDENTITY_LAYERS} feature maps, got {len(feats_r)}"
        )
    layer = jnp.mean(
        jnp.stack([1.0 - cosine_similarity(fr, ft) for fr, ft in zip(feats_r, feats_t)]), axis=0
    )
    embedding = 1.0 - cosine_similarity(emb_r, emb_t)
    return layer + embedding, {"features": layer, "embedding": embedding}


def identity_loss(
    identity_fn: Callable, recovered: jax.Array, true: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch mean of `identity_per_sample`; metrics: the means of its two parts."""
    per, parts = identity_per_sample(identity_fn, recovered, true)
    return jnp.mean(per), {k: jnp.mean(v) for k, v in parts.items()}


def perceptual_per_sample(
    perceptual_fn: Callable, recovered: jax.Array, true: jax.Array
) -> jax.Array:
    """Per-sample perceptual loss [B]: mean over layers of the squared distance between
    channel-normalised feature vectors, averaged over positions (module docstring)."""
    _check_pair("perceptual_loss", recovered, true)
    feats_r, feats_t = _outputs(perceptual_fn, recovered, true)
    if len(feats_r) != NUM_PERCEPTUAL_LAYERS:
        raise ValueError(
            f"perceptual_fn must return {NUM_PERCEPTUAL_LAYERS} feature maps, got {len(feats_r)}"
        )
    per_layer = [
        jnp.mean(
            jnp.sum(jnp.square(unit_channels(fr) - unit_channels(ft)), axis=-1).reshape(
                fr.shape[0], -1
            ),
            axis=-1,
        )
        for fr, ft in zip(feats_r, feats_t)
    ]
    return jnp.mean(jnp.stack(per_layer), axis=0)


def unit_channels(features: jax.Array) -> jax.Array:
    """[B, ..., C] float32 with every position's C-vector scaled to unit length
    (n(x) = sqrt(|x|^2 + 1e-12), so all-zero ReLU vectors stay 0 with finite gradients)."""
    x = jnp.asarray(features, jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _EPS)


def perceptual_loss(perceptual_fn: Callable, recovered: jax.Array, true: jax.Array) -> jax.Array:
    """Batch mean of `perceptual_per_sample`."""
    return jnp.mean(perceptual_per_sample(perceptual_fn, recovered, true))


def attribute_per_sample(
    attribute_fn: Callable, recovered: jax.Array, true: jax.Array
) -> jax.Array:
    """Per-sample attribute loss [B]: smooth L1 (beta = 1) summed over the A outputs."""
    _check_pair("attribute_loss", recovered, true)
    out_r, out_t = _outputs(attribute_fn, recovered, true)
    return jnp.sum(optax.huber_loss(_flat(out_r), _flat(out_t), delta=1.0), axis=-1)


def attribute_loss(attribute_fn: Callable, recovered: jax.Array, true: jax.Array) -> jax.Array:
    """Batch mean of `attribute_per_sample`."""
    return jnp.mean(attribute_per_sample(attribute_fn, recovered, true))


def patch_recovery_per_sample(
    pred_patches: jax.Array, true_target: jax.Array, mask_idx: jax.Array, patch_size: int
) -> jax.Array:
    """Per-sample patch loss [B] (Eq. 9): the L2 distance of each masked patch's p*p*3
    values to the true patch, averaged over the K masked patches."""
    pred = jnp.asarray(pred_patches, jnp.float32)
    true_patches = masking.take_tokens(
        masking.patchify(jnp.asarray(true_target, jnp.float32), patch_size), mask_idx
    )
    if pred.shape != true_patches.shape:
        raise ValueError(
            f"patch_recovery_loss: pred_patches {pred.shape} do not match the true target's "
            f"masked patches {true_patches.shape} (patch_size={patch_size})"
        )
    sq = jnp.sum(jnp.square(pred - jax.lax.stop_gradient(true_patches)), axis=-1)  # [B, K]
    return jnp.mean(jnp.sqrt(sq + _PATCH_EPS), axis=-1)


def patch_recovery_loss(
    pred_patches: jax.Array, true_target: jax.Array, mask_idx: jax.Array, patch_size: int
) -> jax.Array:
    """Batch mean of `patch_recovery_per_sample`."""
    return jnp.mean(patch_recovery_per_sample(pred_patches, true_target, mask_idx, patch_size))


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(w * v) / max(sum(w), 1): 0 when every weight is 0."""
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1.0)


def mask_loss(seg_logits: jax.Array, true_mask: jax.Array, has_mask: jax.Array) -> jax.Array:
    """Pixel-mean BCE-with-logits per sample, averaged over samples with has_mask = 1."""
    logits = jnp.asarray(seg_logits, jnp.float32)
    labels = jnp.asarray(true_mask, jnp.float32)
    if logits.shape != labels.shape:
        raise ValueError(f"mask_loss: seg_logits {logits.shape} vs true mask {labels.shape}")
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    per = jnp.mean(bce.reshape(bce.shape[0], -1), axis=-1)
    return _masked_mean(per, has_mask)


def classification_loss(forgery_logit: jax.Array, label: jax.Array) -> jax.Array:
    """Mean BCE-with-logits of the ISM forgery head against label (1 = forgery)."""
    logit = jnp.asarray(forgery_logit, jnp.float32)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logit, jnp.asarray(label, jnp.float32)))


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, ...] and [B, ...] -> [2B, ...] as a0, b0, a1, b1, ...: each example's two faces stay
    on the device that holds the example. Concatenating on the batch axis instead moves half
    of every device's rows to another device when the batch is sharded (the compiled
    data-parallel step had 28 collective-permutes and 6 all-to-alls for it)."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def total_loss(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    nets: LossNets,
    weights: LossWeights,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted DFREC loss (formula in the module docstring) and float32 scalar metrics.

    outputs: the DFREC model dict (source, target, pred_patches, mask_idx, seg_logits,
    forgery_logit). batch: image, source, target [B, H, W, 3], and, for the optional terms,
    mask [B, H, W, 1], has_mask [B], label [B]. Source and target recoveries go through each
    network in one call (batch 2B, interleaved per example), the true faces in another.
    Without an attribute network the attribute term is 0. A term whose weight is 0 is still
    reported when its inputs exist.
    """
    source, target = outputs["source"], outputs["target"]
    b = source.shape[0]
    recovered = _interleave(source, target)
    true = _interleave(batch["source"], batch["target"])
    patch_dim = outputs["pred_patches"].shape[-1]
    patch_size = int(round((patch_dim / 3) ** 0.5))
    if 3 * patch_size * patch_size != patch_dim:
        raise ValueError(f"pred_patches last axis {patch_dim} is not p*p*3 for an integer p")

    zero = jnp.zeros((), jnp.float32)
    id_per, id_parts = identity_per_sample(nets.identity, recovered, true)
    perc_per = perceptual_per_sample(nets.perceptual, recovered, true)
    attr = (
        jnp.mean(attribute_per_sample(nets.attribute, target, batch["target"]))
        if nets.attribute is not None
        else zero
    )
    patch = patch_recovery_loss(
        outputs["pred_patches"], batch["target"], outputs["mask_idx"], patch_size
    )

    def has(*keys):
        return all(k in batch for k in keys)

    if weights.mask and not has("mask", "has_mask"):
        raise ValueError("LossWeights.mask > 0 needs batch['mask'] and batch['has_mask']")
    if weights.classification and "label" not in batch:
        raise ValueError("LossWeights.classification > 0 needs batch['label']")
    mask = (
        mask_loss(outputs["seg_logits"], batch["mask"], batch["has_mask"])
        if has("mask", "has_mask") and "seg_logits" in outputs
        else zero
    )
    cls = (
        classification_loss(outputs["forgery_logit"], batch["label"])
        if "label" in batch and "forgery_logit" in outputs
        else zero
    )

    metrics = {}
    for name, per in (
        ("identity", id_per),
        ("identity_features", id_parts["features"]),
        ("identity_embedding", id_parts["embedding"]),
        ("perceptual", perc_per),
    ):
        per = per.reshape(b, 2)  # rows interleaved: (source, target) of each example
        metrics[f"{name}/source"] = jnp.mean(per[:, 0])
        metrics[f"{name}/target"] = jnp.mean(per[:, 1])
    metrics["attribute/target"] = attr
    metrics["patch/target"] = patch
    metrics["mask"] = mask
    metrics["classification"] = cls

    weighted = {
        "identity/source": weights.identity * metrics["identity/source"],
        "identity/target": weights.identity * weights.identity_target * metrics["identity/target"],
        "perceptual/source": weights.perceptual * metrics["perceptual/source"],
        "perceptual/target": (
            weights.perceptual * weights.perceptual_target * metrics["perceptual/target"]
        ),
        "attribute/target": weights.attribute * attr,
        "patch/target": weights.patch * patch,
        "mask": weights.mask * mask,
        "classification": weights.classification * cls,
    }
    total = sum(weighted.values())
    safe = jnp.where(total > 0, total, 1.0)
    for name, value in weighted.items():
        metrics[f"share/{name}"] = value / safe
    metrics["total"] = total
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return metrics["total"], metrics
