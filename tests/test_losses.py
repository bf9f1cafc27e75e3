"""Tests for dfrec_jax.losses, with tiny random Flax conv nets standing in for the frozen
FaceNet / VGG / attribute networks (the losses only see callables)."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax import configlib, images, masking
from dfrec_jax.losses import (
    LossNets,
    LossWeights,
    attribute_loss,
    classification_loss,
    cosine_similarity,
    frozen,
    identity_loss,
    identity_per_sample,
    mask_loss,
    patch_recovery_loss,
    perceptual_loss,
    total_loss,
)

SIZE, PATCH, BATCH = 32, 8, 2
NOISE_LEVELS = (0.05, 0.1, 0.2)


# ----------------------------------------------------------------------------
# Tiny frozen networks.
# ----------------------------------------------------------------------------
class TinyIdentity(nn.Module):
    """4 conv feature maps + an L2-normalised embedding, like the FaceNet port's interface."""

    @nn.compact
    def __call__(self, x):
        x = x - 0.5
        feats = []
        for i, ch in enumerate((8, 8, 16, 16)):
            x = nn.relu(nn.Conv(ch, (3, 3), strides=2, name=f"conv{i}")(x))
            feats.append(x)
        emb = nn.Dense(16, name="embed")(jnp.mean(x, axis=(1, 2)))
        return tuple(feats), emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)


class TinyPerceptual(nn.Module):
    """5 conv feature maps (VGG-like relu outputs)."""

    @nn.compact
    def __call__(self, x):
        feats = []
        for i, ch in enumerate((4, 8, 8, 16, 16)):
            x = nn.relu(nn.Conv(ch, (3, 3), strides=1 if i == 0 else 2, name=f"conv{i}")(x))
            feats.append(x)
        return tuple(feats)


class TinyAttribute(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(5)(jnp.mean(x, axis=(1, 2))) * 30.0  # some outputs exceed the L1 knee


def _init(module, seed):
    return module.init(jax.random.PRNGKey(seed), jnp.zeros((1, SIZE, SIZE, 3)))


@pytest.fixture(scope="module")
def net_vars():
    return {
        "identity": _init(TinyIdentity(), 1),
        "perceptual": _init(TinyPerceptual(), 2),
        "attribute": _init(TinyAttribute(), 3),
    }


def _nets(variables, attribute=True):
    return LossNets(
        identity=frozen(TinyIdentity().apply, variables["identity"]),
        perceptual=frozen(TinyPerceptual().apply, variables["perceptual"]),
        attribute=frozen(TinyAttribute().apply, variables["attribute"]) if attribute else None,
    )


@pytest.fixture(scope="module")
def nets(net_vars):
    return _nets(net_vars)


@pytest.fixture(scope="module")
def faces():
    """Four real LFW faces (different people) at 32x32."""
    root = configlib.lfw_dir()
    people = sorted(os.listdir(root))[:4]
    paths = [os.path.join(root, p, sorted(os.listdir(os.path.join(root, p)))[0]) for p in people]
    return jnp.asarray(np.stack([images.load_rgb(p, SIZE) for p in paths]))


def _noise(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _image_terms(nets):
    return {
        "identity": lambda r, t: identity_loss(nets.identity, r, t)[0],
        "perceptual": lambda r, t: perceptual_loss(nets.perceptual, r, t),
        "attribute": lambda r, t: attribute_loss(nets.attribute, r, t),
    }


# ----------------------------------------------------------------------------
# Image terms: zero for identical inputs, monotone in corruption, finite gradients.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("term", ["identity", "perceptual", "attribute"])
def test_image_term_zero_then_monotone(nets, faces, term):
    fn = jax.jit(_image_terms(nets)[term])
    n = _noise(faces.shape)
    values = [float(fn(faces, faces))]
    values += [float(fn(jnp.clip(faces + s * n, 0.0, 1.0), faces)) for s in NOISE_LEVELS]
    assert abs(values[0]) < 1e-5, values
    assert values[1] > 1e-5, values
    assert all(a < b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("term", ["identity", "perceptual", "attribute"])
def test_image_term_gradients_finite(nets, faces, term):
    fn = _image_terms(nets)[term]
    rec = jnp.clip(faces + 0.1 * _noise(faces.shape, 1), 0.0, 1.0)
    g = jax.jit(jax.grad(fn))(rec, faces)
    assert g.shape == faces.shape
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(g))) > 0.0


def test_identity_formula_matches_manual(nets, faces):
    """identity = mean_l (1 - cos(vec f_l)) + (1 - cos(emb)), per sample, then batch mean."""
    rec = jnp.clip(faces + 0.1 * _noise(faces.shape, 2), 0.0, 1.0)
    (fr, er), (ft, et) = nets.identity(rec), nets.identity(faces)

    def cos(a, b):
        a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
        b = np.asarray(b, np.float64).reshape(b.shape[0], -1)
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    layer = np.mean([1 - cos(a, b) for a, b in zip(fr, ft)], axis=0)
    emb = 1 - cos(er, et)
    per, parts = identity_per_sample(nets.identity, rec, faces)
    np.testing.assert_allclose(per, layer + emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts["embedding"], emb, rtol=1e-5, atol=1e-6)
    loss, metrics = identity_loss(nets.identity, rec, faces)
    np.testing.assert_allclose(loss, np.mean(layer + emb), rtol=1e-5)
    np.testing.assert_allclose(metrics["features"], layer.mean(), rtol=1e-5)


def test_cosine_all_zero_features_have_finite_gradient():
    z = jnp.zeros((2, 3, 3, 4))
    g = jax.grad(lambda a: jnp.sum(cosine_similarity(a, jnp.ones_like(a))))(z)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_perceptual_and_attribute_formulas_match_numpy(nets, faces):
    rec = jnp.clip(faces + 0.2 * _noise(faces.shape, 3), 0.0, 1.0)
    fr, ft = nets.perceptual(rec), nets.perceptual(faces)

    def unit(x):  # each position's channel vector scaled to unit length
        x = np.asarray(x, np.float64)
        return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-12)

    ref = np.mean(
        [np.mean(np.sum((unit(a) - unit(b)) ** 2, axis=-1)) for a, b in zip(fr, ft)]
    )  # every sample has the same layer sizes, so the batch mean commutes
    np.testing.assert_allclose(perceptual_loss(nets.perceptual, rec, faces), ref, rtol=1e-5)
    # Scale-free per layer: multiplying a network's features by 100 changes nothing.
    scaled = lambda x: tuple(100.0 * f for f in nets.perceptual(x))  # noqa: E731
    np.testing.assert_allclose(perceptual_loss(scaled, rec, faces), ref, rtol=1e-4)

    ar, at = np.asarray(nets.attribute(rec), np.float64), np.asarray(nets.attribute(faces))
    d = np.abs(ar - at)
    assert d.max() > 1.0 and d.min() < 1.0  # both branches of the smooth L1 are exercised
    smooth_l1 = np.where(d < 1.0, 0.5 * d**2, d - 0.5)
    np.testing.assert_allclose(  # summed over the A outputs, averaged over the batch
        attribute_loss(nets.attribute, rec, faces), smooth_l1.sum(-1).mean(), rtol=1e-5
    )


def test_wrong_layer_count_raises(faces):
    with pytest.raises(ValueError, match="4 feature maps"):
        identity_loss(lambda x: ((x, x, x), x[:, 0, 0]), faces, faces)
    with pytest.raises(ValueError, match="5 feature maps"):
        perceptual_loss(lambda x: (x,), faces, faces)
    with pytest.raises(ValueError, match="recovered and true"):
        perceptual_loss(lambda x: (x,) * 5, faces, faces[:1])


# ----------------------------------------------------------------------------
# Patch recovery loss.
# ----------------------------------------------------------------------------
def test_patch_loss_explicit_numbers():
    # 4x4 target of 0.5, p = 2 -> N = 4 patches of 12 values; mask patches 1 and 2.
    target = np.full((1, 4, 4, 3), 0.5, np.float32)
    pred = np.stack([np.full(12, 0.5), np.zeros(12)])[None].astype(np.float32)  # [1, 2, 12]
    mask_idx = np.array([[1, 2]], np.int32)
    # patch 1: distance 0 (sqrt(1e-8) = 1e-4); patch 2: sqrt(12 values * 0.25) = sqrt(3);
    # mean over K = 2.
    want = (1e-4 + np.sqrt(3.0 + 1e-8)) / 2
    np.testing.assert_allclose(patch_recovery_loss(pred, target, mask_idx, 2), want, rtol=1e-6)


def _ref_patch_loss(pred, target, mask_idx, p):
    """Loop reference (Eq. 9): L2 distance per masked patch, mean over K, then batch mean."""
    b, h, w, c = target.shape
    out = []
    for bi in range(b):
        total = 0.0
        for k, idx in enumerate(mask_idx[bi]):
            r, col = divmod(int(idx), w // p)
            patch = target[bi, r * p : (r + 1) * p, col * p : (col + 1) * p, :].reshape(-1)
            total += np.sqrt(float(np.sum((pred[bi, k].astype(np.float64) - patch) ** 2)) + 1e-8)
        out.append(total / len(mask_idx[bi]))
    return float(np.mean(out))


def test_patch_loss_matches_numpy_reference():
    rng = np.random.default_rng(7)
    target = rng.uniform(size=(2, 8, 12, 3)).astype(np.float32)  # 2 x 3 grid of 4x4 patches
    mask_idx = np.array([[5, 0, 3], [1, 2, 4]], np.int32)
    pred = rng.uniform(size=(2, 3, 4 * 4 * 3)).astype(np.float32)
    got = float(patch_recovery_loss(pred, target, mask_idx, 4))
    np.testing.assert_allclose(got, _ref_patch_loss(pred, target, mask_idx, 4), rtol=1e-6)
    # Exactly zero when the predictions are the true patches, and monotone in noise.
    true = masking.take_tokens(masking.patchify(jnp.asarray(target), 4), mask_idx)
    np.testing.assert_allclose(float(patch_recovery_loss(true, target, mask_idx, 4)), 1e-4)
    n = _noise(true.shape, 4)
    vals = [float(patch_recovery_loss(true + s * n, target, mask_idx, 4)) for s in NOISE_LEVELS]
    assert vals[0] < vals[1] < vals[2], vals
    g = jax.grad(patch_recovery_loss)(true + 0.1 * n, target, mask_idx, 4)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


# ----------------------------------------------------------------------------
# Mask loss.
# ----------------------------------------------------------------------------
def _soft_logits(mask, eps):
    """Logits of a prediction that puts probability 1 - eps on the true label."""
    p = mask * (1 - eps) + (1 - mask) * eps
    return jnp.log(p) - jnp.log1p(-p)


def test_mask_loss_values_and_monotone():
    mask = (np.random.default_rng(0).uniform(size=(2, 8, 8, 1)) > 0.5).astype(np.float32)
    has = jnp.ones(2)
    # BCE of probability 1 - eps on the true label is -log(1 - eps) at every pixel.
    vals = [float(mask_loss(_soft_logits(mask, e), mask, has)) for e in (1e-6,) + NOISE_LEVELS]
    np.testing.assert_allclose(
        vals, [-np.log1p(-e) for e in (1e-6,) + NOISE_LEVELS], rtol=1e-4, atol=1e-7
    )
    assert vals[0] < 1e-5 and vals[1] < vals[2] < vals[3]


def test_mask_loss_ignores_samples_without_masks():
    rng = np.random.default_rng(1)
    mask = (rng.uniform(size=(3, 8, 8, 1)) > 0.5).astype(np.float32)
    logits = jnp.asarray(rng.standard_normal((3, 8, 8, 1)), jnp.float32)
    has = jnp.array([1.0, 0.0, 1.0])
    base = float(mask_loss(logits, mask, has))
    # Only samples 0 and 2 count, each with equal weight.
    alone = [float(mask_loss(logits[i : i + 1], mask[i : i + 1], jnp.ones(1))) for i in (0, 2)]
    np.testing.assert_allclose(base, np.mean(alone), rtol=1e-6)
    # Changing the unmasked sample's logits changes nothing, and it gets no gradient.
    changed = logits.at[1].set(100.0)
    assert float(mask_loss(changed, mask, has)) == base
    g = jax.grad(mask_loss)(logits, mask, has)
    assert float(jnp.max(jnp.abs(g[1]))) == 0.0 and float(jnp.max(jnp.abs(g[0]))) > 0.0
    # No sample with a mask: exactly 0, with a zero gradient.
    assert float(mask_loss(logits, mask, jnp.zeros(3))) == 0.0
    assert float(jnp.max(jnp.abs(jax.grad(mask_loss)(logits, mask, jnp.zeros(3))))) == 0.0


# ----------------------------------------------------------------------------
# Total loss.
# ----------------------------------------------------------------------------
def _outputs_and_batch(faces, corrupt=0.1):
    """A fake model output dict (corrupted true faces) and a training batch."""
    b = BATCH
    source_true, target_true = faces[:b], faces[b:]
    n = masking.num_masked((SIZE // PATCH) ** 2, 0.5)
    mask_idx = jnp.stack(
        [jax.random.permutation(jax.random.PRNGKey(i), (SIZE // PATCH) ** 2)[:n] for i in range(b)]
    ).astype(jnp.int32)
    true_patches = masking.take_tokens(masking.patchify(target_true, PATCH), mask_idx)
    gt_mask = jnp.zeros((b, SIZE, SIZE, 1)).at[0, 8:24, 8:24].set(1.0)
    outputs = {
        "source": jnp.clip(source_true + corrupt * _noise(source_true.shape, 10), 0, 1),
        "target": jnp.clip(target_true + corrupt * _noise(target_true.shape, 11), 0, 1),
        "pred_patches": jnp.clip(true_patches + corrupt * _noise(true_patches.shape, 12), 0, 1),
        "mask_idx": mask_idx,
        "seg_logits": _noise((b, SIZE, SIZE, 1), 13),
        "forgery_logit": jnp.array([0.3, -1.2]),
    }
    batch = {
        "image": target_true,
        "source": source_true,
        "target": target_true,
        "mask": gt_mask,
        "label": jnp.array([1.0, 0.0]),
        "has_mask": jnp.array([1.0, 0.0]),
    }
    return outputs, batch


WEIGHTS = LossWeights(
    identity=0.7,
    perceptual=1.3,
    attribute=2.1,
    patch=3.0,
    mask=0.4,
    classification=0.9,
    identity_target=1.7,
    perceptual_target=2.5,
)

WEIGHTED_TERMS = (
    "identity/source",
    "identity/target",
    "perceptual/source",
    "perceptual/target",
    "attribute/target",
    "patch/target",
    "mask",
    "classification",
)
EXPECTED_KEYS = (
    set(WEIGHTED_TERMS)
    | {f"share/{k}" for k in WEIGHTED_TERMS}
    | {
        "identity_features/source",
        "identity_features/target",
        "identity_embedding/source",
        "identity_embedding/target",
        "total",
    }
)


def test_default_weights():
    w = LossWeights()
    # Eq. 10: identity 1, the other three 0.5; Eq. 4 / 7: target identity and perceptual x2.
    assert (w.identity, w.perceptual, w.attribute, w.patch, w.mask, w.classification) == (
        1.0,
        0.5,
        0.5,
        0.5,
        0.0,
        0.0,
    )
    assert (w.identity_target, w.perceptual_target) == (2.0, 2.0)


def test_total_is_weighted_sum_of_terms_and_jits(nets, faces):
    outputs, batch = _outputs_and_batch(faces)
    fn = jax.jit(lambda o, b: total_loss(o, b, nets, WEIGHTS))
    loss, metrics = fn(outputs, batch)
    assert set(metrics) == EXPECTED_KEYS
    for k, v in metrics.items():
        assert v.shape == () and v.dtype == jnp.float32, k
    # Every term computed on its own (not through total_loss's batched network calls).
    terms = {
        "identity/source": identity_loss(nets.identity, outputs["source"], batch["source"])[0],
        "identity/target": identity_loss(nets.identity, outputs["target"], batch["target"])[0],
        "perceptual/source": perceptual_loss(nets.perceptual, outputs["source"], batch["source"]),
        "perceptual/target": perceptual_loss(nets.perceptual, outputs["target"], batch["target"]),
        "attribute/target": attribute_loss(nets.attribute, outputs["target"], batch["target"]),
        "patch/target": patch_recovery_loss(
            outputs["pred_patches"], batch["target"], outputs["mask_idx"], PATCH
        ),
        "mask": mask_loss(outputs["seg_logits"], batch["mask"], batch["has_mask"]),
        "classification": classification_loss(outputs["forgery_logit"], batch["label"]),
    }
    for k, v in terms.items():
        assert float(v) > 0, k
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=k)
    weighted = {
        "identity/source": WEIGHTS.identity * terms["identity/source"],
        "identity/target": WEIGHTS.identity * 1.7 * terms["identity/target"],
        "perceptual/source": WEIGHTS.perceptual * terms["perceptual/source"],
        "perceptual/target": WEIGHTS.perceptual * 2.5 * terms["perceptual/target"],
        "attribute/target": WEIGHTS.attribute * terms["attribute/target"],
        "patch/target": WEIGHTS.patch * terms["patch/target"],
        "mask": WEIGHTS.mask * terms["mask"],
        "classification": WEIGHTS.classification * terms["classification"],
    }
    manual = sum(weighted.values())
    np.testing.assert_allclose(loss, manual, rtol=1e-5)
    for k, v in weighted.items():  # each term's share of the total, summing to 1
        np.testing.assert_allclose(metrics[f"share/{k}"], v / manual, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(sum(float(metrics[f"share/{k}"]) for k in weighted), 1.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["total"], loss, rtol=0)
    # jit and eager agree.
    eager_loss, _ = total_loss(outputs, batch, nets, WEIGHTS)
    np.testing.assert_allclose(eager_loss, loss, rtol=1e-5)


def test_total_recovery_terms_vanish_for_perfect_recovery(nets, faces):
    outputs, batch = _outputs_and_batch(faces, corrupt=0.0)
    _, metrics = total_loss(outputs, batch, nets, LossWeights())
    for k in ("identity/source", "identity/target", "perceptual/source", "perceptual/target"):
        assert abs(float(metrics[k])) < 1e-5, (k, metrics[k])
    assert float(metrics["attribute/target"]) < 1e-6
    assert float(metrics["patch/target"]) < 1e-3  # sqrt(1e-8) per patch


def test_total_without_attribute_net_or_masks(net_vars, faces):
    outputs, batch = _outputs_and_batch(faces)
    nets = _nets(net_vars, attribute=False)
    plain = {k: batch[k] for k in ("image", "source", "target")}
    loss, metrics = total_loss(outputs, plain, nets, LossWeights())
    assert float(metrics["attribute/target"]) == 0.0
    assert float(metrics["mask"]) == 0.0 and float(metrics["classification"]) == 0.0
    with pytest.raises(ValueError, match="batch\\['mask'\\]"):
        total_loss(outputs, plain, nets, LossWeights(mask=1.0))
    with pytest.raises(ValueError, match="batch\\['label'\\]"):
        total_loss(outputs, plain, nets, LossWeights(classification=1.0))


def test_total_gradients_reach_outputs_not_frozen_nets(net_vars, faces):
    outputs, batch = _outputs_and_batch(faces)
    diff_keys = ("source", "target", "pred_patches", "seg_logits", "forgery_logit")

    def make_fn(wrap):
        def fn(variables, diff):
            nets = LossNets(
                identity=wrap(TinyIdentity().apply, variables["identity"]),
                perceptual=wrap(TinyPerceptual().apply, variables["perceptual"]),
                attribute=wrap(TinyAttribute().apply, variables["attribute"]),
            )
            return total_loss({**outputs, **diff}, batch, nets, WEIGHTS)[0]

        return jax.jit(jax.grad(fn, argnums=(0, 1)))

    diff = {k: outputs[k] for k in diff_keys}
    g_vars, g_out = make_fn(frozen)(net_vars, diff)
    # Frozen nets: every parameter gradient is exactly zero.
    leaves = jax.tree_util.tree_leaves(g_vars)
    assert leaves and all(float(jnp.max(jnp.abs(x))) == 0.0 for x in leaves)
    # Model outputs: finite, non-zero gradients everywhere the loss reaches.
    for k in diff_keys:
        assert bool(jnp.all(jnp.isfinite(g_out[k]))), k
        assert float(jnp.max(jnp.abs(g_out[k]))) > 0.0, k
    # Control: without stop_gradient the same closure would train the nets.
    unfrozen = make_fn(lambda apply, v: lambda x: apply(v, x))(net_vars, diff)[0]
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(unfrozen)) > 0.0


def test_loss_weights_is_hashable_static_config():
    # Frozen dataclasses can be jit static arguments and config values.
    assert hash(LossWeights()) == hash(LossWeights())
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossWeights().identity = 1.0
