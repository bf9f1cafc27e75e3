"""Robustness perturbations: parity with OpenCV / PIL, noise statistics, ranges, determinism."""

import io
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import perturbations, skips
from dfrec_jax import configlib

perturb = perturbations.perturb


@pytest.fixture(scope="module")
def faces():
    root = configlib.lfw_dir()
    assert os.path.isdir(root), f"real LFW faces needed at {root} (or set DFREC_LFW_DIR)"
    people = sorted(os.listdir(root))[:2]
    return [
        skips.read_rgb8(os.path.join(root, p, sorted(os.listdir(os.path.join(root, p)))[0]))
        for p in people
    ]


def seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def pil_jpeg(image, quality):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_blur_matches_opencv(faces, k):
    for image in faces:
        got = perturb(image, "gaussian_blur", seed(0), k).numpy().astype(int)
        want = cv2.GaussianBlur(image, (k, k), 0).astype(int)
        assert np.abs(got - want).max() <= 1, k
        assert np.abs(got - image.astype(int)).mean() > 1  # it does blur


def test_random_blur_is_one_of_the_paper_kernels(faces):
    image = faces[0]
    fixed = {k: perturb(image, "gaussian_blur", seed(0), k).numpy() for k in (3, 5, 7)}
    seen = set()
    for s in range(20):
        got = perturb(image, "gaussian_blur", seed(s)).numpy()
        match = [k for k, v in fixed.items() if np.array_equal(got, v)]
        assert len(match) == 1, s
        seen.add(match[0])
    assert seen == {3, 5, 7}


@pytest.mark.parametrize("quality", [50, 75, 99])
def test_jpeg_matches_pil(faces, quality):
    for image in faces:
        got = perturb(image, "jpeg", seed(0), quality).numpy().astype(float)
        err = np.abs(got - pil_jpeg(image, quality)).mean()
        assert err < 0.5, (quality, err)
        if quality == 50:
            assert np.abs(got - image).mean() > 1


def test_random_jpeg_quality_in_paper_range(faces):
    image = faces[1]
    fixed = {q: perturb(image, "jpeg", seed(0), q).numpy() for q in range(40, 101)}
    qualities = []
    for s in range(15):
        got = perturb(image, "jpeg", seed(s)).numpy()
        match = [q for q, v in fixed.items() if np.array_equal(got, v)]
        assert match, s
        qualities.append(match)
    # Neighbouring qualities can decode identically; each draw must fit [50, 99].
    assert all(min(m) <= 99 and max(m) >= 50 for m in qualities)
    assert len({m[0] for m in qualities}) > 5


@pytest.mark.parametrize("variance", [10, 30, 50])
def test_noise_variance(variance):
    grey = np.full((128, 128, 3), 128, np.uint8)
    noise = perturb(grey, "gaussian_noise", seed(variance), variance).numpy() - 128.0
    assert abs(noise.var() / variance - 1) < 0.15, noise.var()
    assert abs(noise.mean()) < 0.2


def test_random_noise_variance_in_paper_range():
    grey = np.full((64, 64, 3), 128, np.uint8)
    variances = [
        (perturb(grey, "gaussian_noise", seed(s)).numpy() - 128.0).var() for s in range(40)
    ]
    assert min(variances) > 10 * 0.85 and max(variances) < 50 * 1.15, variances
    assert min(variances) < 20 and max(variances) > 40  # spread over the whole range


@pytest.mark.parametrize("name", perturbations.PERTURBATIONS)
def test_deterministic_static_shape_and_tf_data(faces, name):
    image = faces[0]
    a = perturb(image, name, seed(3, 1)).numpy()
    np.testing.assert_array_equal(a, perturb(image, name, seed(3, 1)).numpy())
    assert a.dtype == np.uint8 and a.shape == image.shape
    others = [perturb(image, name, seed(s, 1)).numpy() for s in range(4, 10)]
    assert any(not np.array_equal(a, o) for o in others)
    ds = tf.data.Dataset.from_tensor_slices((np.stack(faces), tf.constant([[3, 1], [5, 1]])))
    ds = ds.map(lambda im, sd: perturb(im, name, sd))
    assert ds.element_spec.shape == image.shape and ds.element_spec.dtype == tf.uint8
    got = [x.numpy() for x in ds]
    np.testing.assert_array_equal(got[0], a)
    np.testing.assert_array_equal(got[1], perturb(faces[1], name, seed(5, 1)).numpy())


def test_bad_arguments(faces):
    with pytest.raises(ValueError, match="gaussian_blur, jpeg, gaussian_noise"):
        perturb(faces[0], "motion_blur", seed(0))
    with pytest.raises(ValueError, match="odd"):
        perturb(faces[0], "gaussian_blur", seed(0), 4)
    with pytest.raises(ValueError, match="uint8"):
        perturb(faces[0].astype(np.float32), "jpeg", seed(0))


def test_parse():
    assert perturbations.parse("jpeg") == ("jpeg", None)
    assert perturbations.parse("jpeg:75") == ("jpeg", 75)
    assert perturbations.parse("gaussian_blur:5") == ("gaussian_blur", 5)
    assert perturbations.parse("gaussian_noise:30") == ("gaussian_noise", 30.0)
    assert perturbations.parse(" gaussian_noise : 12.5 ") == ("gaussian_noise", 12.5)
    for bad in (
        "blur",
        "",
        "jpeg:",
        "jpeg:abc",
        "jpeg:0",
        "jpeg:101",
        "gaussian_blur:4",
        "gaussian_blur:2.5",
        "gaussian_noise:-1",
        "gaussian_noise:nan",
    ):
        with pytest.raises(ValueError):
            perturbations.parse(bad)
