"""On-the-fly blended-image forgeries: contract of the feature dict, exactness and randomness."""

import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import blending, landmarks, skips
from dfrec_jax import configlib

S = 112


@pytest.fixture(scope="module")
def faces():
    """4 real LFW faces of different people, with face masks from real 68-point landmarks."""
    root = configlib.lfw_dir()
    assert os.path.isdir(root), f"real LFW faces needed at {root} (or set DFREC_LFW_DIR)"
    people = sorted(os.listdir(root))[:4]
    images = np.stack(
        [
            skips.read_rgb8(os.path.join(root, p, sorted(os.listdir(os.path.join(root, p)))[0]))
            for p in people
        ]
    )
    assert images.shape == (4, S, S, 3)
    points = landmarks.LandmarkDetector(batch_size=4)(images)
    masks = np.stack([landmarks.hull_mask(p, S) for p in points])
    return people, images, points, masks


def example(faces, i, *, image=None, face_mask=None, label=0):
    people, images, points, masks = faces
    image = images[i] if image is None else image
    return {
        "image": tf.constant(image),
        "source": tf.constant(image),
        "target": tf.constant(image),
        "mask": tf.fill([S, S, 1], tf.constant(255, tf.uint8)),  # pristine: its own source
        "face_mask": tf.constant(masks[i] if face_mask is None else face_mask),
        "landmarks": tf.constant(points[i]),
        "alpha": tf.constant(0.0),
        "label": tf.constant(label, tf.int64),
        "method": tf.constant("pristine"),
        "source_id": tf.constant(people[i]),
        "target_id": tf.constant(people[i]),
    }


def blend(faces, t, p, seed, morph_fraction=0.0, morph_alpha=blending.MORPH_ALPHA, **kw):
    out = blending.blend_pair(
        example(faces, t, **kw), example(faces, p), tf.constant(seed), morph_fraction, morph_alpha
    )
    return {k: v.numpy() for k, v in out.items()}


def test_feature_dict_contract(faces):
    people, images, points, masks = faces
    target, partner = example(faces, 0), example(faces, 1)
    out = blending.blend_pair(target, partner, tf.constant([1, 2], tf.int32))
    assert set(out) == set(target)
    for k in target:
        assert out[k].dtype == target[k].dtype, k
        assert out[k].shape == target[k].shape, k
    assert out["label"].numpy() == 1
    assert out["method"].numpy() == blending.METHOD.encode()
    assert out["alpha"].numpy() == 1.0  # a splice (morph_fraction defaults to 0)
    assert out["source_id"].numpy() == people[1].encode()
    assert out["target_id"].numpy() == people[0].encode()
    np.testing.assert_array_equal(out["source"], images[1])
    np.testing.assert_array_equal(out["target"], images[0])
    np.testing.assert_array_equal(out["face_mask"], masks[0])
    np.testing.assert_array_equal(out["landmarks"], points[0])


@pytest.mark.parametrize("seed", [[0, 0], [1, 5], [7, 3], [123, 9]])
def test_image_is_target_outside_mask_and_partner_inside(faces, seed):
    out = blend(faces, 0, 1, seed)
    outside = out["mask"][..., 0] == 0
    assert outside.any() and (~outside).any()
    # Bit-exact: the quantised alpha is 0 there, so nothing of the partner leaks in.
    np.testing.assert_array_equal(out["image"][outside], out["target"][outside])
    inside = out["mask"][..., 0] == 255
    assert inside.sum() > 500
    diff = np.abs(out["image"].astype(int) - out["target"].astype(int))[inside].mean()
    assert diff > 10, diff


def test_mask_nonempty_and_near_face(faces):
    masks = faces[3]
    grown = cv2.dilate(masks[0][..., 0], np.ones((int(0.2 * S) | 1,) * 2, np.uint8)) > 0
    face = masks[0][..., 0] > 0
    binaries = []
    for s in range(12):
        mask = blend(faces, 0, 2, [s, 1])["mask"][..., 0].astype(np.float64)
        assert (mask > 0).sum() > 0.3 * face.sum()
        inside = mask[grown].sum() / mask.sum()
        assert inside > 0.95, (s, inside)
        binaries.append(mask >= 128)
    # The region is randomly deformed: not the face mask itself, and not the same every time.
    ious = [(b & face).sum() / (b | face).sum() for b in binaries]
    assert 0.5 < np.mean(ious) < 0.98, ious
    assert len({b.sum() for b in binaries}) > 6


def test_deterministic_per_seed(faces):
    a, b = blend(faces, 1, 2, [4, 2]), blend(faces, 1, 2, [4, 2])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    c = blend(faces, 1, 2, [4, 3])
    assert not np.array_equal(a["mask"], c["mask"])
    assert not np.array_equal(a["image"], c["image"])


def test_inside_tf_data_map_matches_eager(faces):
    def stacked(indices):
        exs = [example(faces, i) for i in indices]
        return {k: tf.stack([e[k] for e in exs]) for k in exs[0]}

    targets, partners = stacked([0, 1, 2]), stacked([3, 0, 1])
    seeds = tf.constant([[5, 0], [5, 1], [5, 2]], tf.int64)
    ds = tf.data.Dataset.from_tensor_slices((targets, partners, seeds))
    ds = ds.map(blending.blend_pair, num_parallel_calls=2, deterministic=True)
    for (t, p), got in zip([(0, 3), (1, 0), (2, 1)], ds):
        seed = [5, t]
        want = blend(faces, t, p, seed)
        for k in want:
            np.testing.assert_array_equal(got[k].numpy(), want[k], err_msg=k)


def test_colour_transfer_moves_partner_towards_target(faces):
    # A strongly tinted partner: without colour transfer its face would stay blue.
    tinted = np.clip(faces[1][1] * np.array([0.5, 0.8, 1.6]), 0, 255).astype(np.uint8)
    target = example(faces, 0)
    partner = example(faces, 1, image=tinted)
    out = blending.blend_pair(target, partner, tf.constant([3, 3]))
    full = out["mask"].numpy()[..., 0] == 255
    mean_out = out["image"].numpy()[full].mean(0)
    mean_target = faces[1][0][full].mean(0)
    mean_partner = tinted[full].mean(0)
    assert np.abs(mean_out - mean_target).max() < 0.25 * np.abs(mean_partner - mean_target).max()
    assert np.abs(mean_out - mean_target).max() < 12, (mean_out, mean_target)


def test_colour_transfer_matches_statistics():
    rng = np.random.default_rng(0)
    partner = rng.uniform(60, 120, (S, S, 3)).astype(np.float32)
    target = rng.uniform(100, 200, (S, S, 3)).astype(np.float32)
    region = np.zeros((S, S, 1), np.float32)
    region[20:90, 30:80] = 1
    out = blending.colour_transfer(partner, target, region).numpy()
    sel = region[..., 0] > 0
    np.testing.assert_allclose(out[sel].mean(0), target[sel].mean(0), atol=0.05)
    np.testing.assert_allclose(out[sel].std(0), target[sel].std(0), rtol=1e-3)


def test_tiny_and_empty_face_masks_still_give_a_forgery(faces):
    tiny = np.zeros((S, S, 1), np.uint8)
    tiny[55:58, 55:58] = 255  # erosion / shrinking can wipe this out: falls back to it
    empty = np.zeros((S, S, 1), np.uint8)  # falls back to the aligned-face template ellipse
    for face_mask in (tiny, empty):
        for s in range(8):
            out = blend(faces, 0, 1, [s, 0], face_mask=face_mask)
            assert (out["mask"] > 0).any()
            outside = out["mask"][..., 0] == 0
            np.testing.assert_array_equal(out["image"][outside], out["target"][outside])
    assert (blend(faces, 0, 1, [0, 0], face_mask=empty)["mask"] == 255).sum() > 1000


def test_is_blendable(faces):
    assert bool(blending.is_blendable(example(faces, 0)))
    assert not bool(blending.is_blendable(example(faces, 0, label=1)))
    empty = np.zeros((S, S, 1), np.uint8)
    assert not bool(blending.is_blendable(example(faces, 0, face_mask=empty)))
    ds = tf.data.Dataset.from_tensors(example(faces, 0)).filter(blending.is_blendable)
    assert len(list(ds)) == 1


def test_morph_keeps_the_region_and_mixes_the_texture(faces):
    """A morph with the same seed: the same mask as the splice (mask = region, whatever
    alpha), target outside it bit for bit, and inside target + alpha * (splice - target)."""
    lo, hi = blending.MORPH_ALPHA
    for seed in ([0, 0], [7, 3]):
        splice = blend(faces, 0, 1, seed)
        morph = blend(faces, 0, 1, seed, morph_fraction=1.0)
        assert morph["method"] == blending.MORPH_METHOD.encode()
        alpha = float(morph["alpha"])
        assert lo <= alpha <= hi and morph["alpha"].dtype == np.float32
        np.testing.assert_array_equal(morph["mask"], splice["mask"])
        outside = morph["mask"][..., 0] == 0
        np.testing.assert_array_equal(morph["image"][outside], morph["target"][outside])
        target = morph["target"].astype(np.float64)
        expected = target + alpha * (splice["image"] - target)
        assert np.abs(morph["image"] - expected).max() <= 1.5  # two roundings
        inside = morph["mask"][..., 0] == 255
        gap = {k: np.abs(v["image"].astype(int) - morph["target"])[inside].mean()
               for k, v in (("morph", morph), ("splice", splice))}  # fmt: skip
        assert 2.0 < gap["morph"] < 0.85 * gap["splice"], gap


def test_morph_fraction_and_alpha_are_keyed_by_the_seed(faces):
    draws = [blending.morph_draw(tf.constant([9, i], tf.int64), 0.5) for i in range(200)]
    morph = np.array([bool(m) for m, _ in draws])
    alpha = np.array([float(a) for _, a in draws])
    assert 0.4 < morph.mean() < 0.6
    np.testing.assert_array_equal(alpha[~morph], 1.0)
    lo, hi = blending.MORPH_ALPHA
    assert (alpha[morph] >= lo).all() and (alpha[morph] <= hi).all()
    assert alpha[morph].std() > 0.03  # drawn, not constant
    again = blending.morph_draw(tf.constant([9, 3], tf.int64), 0.5)
    assert (bool(again[0]), float(again[1])) == (morph[3], alpha[3])
    assert not any(bool(blending.morph_draw(tf.constant([9, i]), 0.0)[0]) for i in range(20))
    with pytest.raises(ValueError, match="morph_fraction"):
        blending.morph_draw(tf.constant([0, 0]), 1.5)
    with pytest.raises(ValueError, match="morph_alpha"):
        blending.morph_draw(tf.constant([0, 0]), 0.5, (0.0, 0.5))
