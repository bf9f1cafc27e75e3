"""dlib ResNet face descriptor: our reader of dlib's format, parity with dlib, identity on LFW.

dlib itself (PyPI dlib-bin) is a test-only reference; the library never imports it.
"""

import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax import configlib, images
from dfrec_jax.pretrained import dlib_format, dlib_resnet, weights

DLIB_BIN = "dlib-bin==20.0.1.post1"
BATCH = 25  # one compiled batch shape per input size


@pytest.fixture(scope="module")
def path():
    return weights.locate(weights.DLIB_RESNET)


@pytest.fixture(scope="module")
def descriptor():
    return dlib_resnet.DlibDescriptor.load()


@pytest.fixture(scope="module")
def embed(descriptor):
    """Descriptors for any number of images, in fixed-size jitted batches."""
    fn = jax.jit(lambda d, x: d(x))

    def run(x):
        out = []
        for i in range(0, len(x), BATCH):
            chunk = x[i : i + BATCH]
            padded = np.concatenate([chunk, np.zeros((BATCH - len(chunk),) + chunk.shape[1:])])
            out.append(np.asarray(fn(descriptor, padded.astype(np.float32)))[: len(chunk)])
        return np.concatenate(out)

    return run


def _people(min_images: int) -> list[str]:
    root = configlib.lfw_dir()
    return [
        os.path.join(root, p)
        for p in sorted(os.listdir(root))
        if os.path.isdir(os.path.join(root, p))
        and len(os.listdir(os.path.join(root, p))) >= min_images
    ]


def _first_images(folder: str, n: int) -> list[str]:
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:n]]


def test_parameters_match_file_and_module(path):
    variables = dlib_resnet.load_variables(path)
    leaves = jax.tree.leaves(variables)
    assert sum(x.size for x in leaves) == dlib_resnet.NUM_PARAMS == 5_614_592
    assert all(x.dtype == np.float32 and np.all(np.isfinite(x)) for x in leaves)
    params = variables["params"]
    assert len([k for k in params if k.startswith("conv_")]) == 29
    assert len([k for k in params if k.startswith("affine_")]) == 29
    assert params["conv_0"]["kernel"].shape == (7, 7, 3, 32)
    assert params["fc"]["kernel"].shape == (256, 128)
    # The Flax module's own parameter tree has exactly the loaded shapes.
    shapes = jax.eval_shape(
        dlib_resnet.DlibResNet().init, jax.random.key(0), jnp.zeros((1, 150, 150, 3))
    )
    chex.assert_trees_all_equal_shapes(shapes, variables)


def test_parity_with_dlib(path, embed):
    try:
        import dlib
    except ImportError:
        pytest.fail(f"dlib is missing (test-only reference): pip install {DLIB_BIN}")
    files = [_first_images(p, 1)[0] for p in _people(1)[::400][:8]]
    chips = np.stack([np.round(images.load_rgb(f, 150) * 255).astype(np.uint8) for f in files])
    model = dlib.face_recognition_model_v1(path)
    # A 150x150 image is taken as an aligned chip: no re-cropping, no jitter.
    ref = np.stack([np.asarray(model.compute_face_descriptor(c)) for c in chips])
    ours = embed(chips / 255.0)
    err = float(np.abs(ours - ref).max())
    print(f"\ndlib parity on {len(chips)} LFW chips: max abs error {err:.2e}")
    assert ref.shape == (8, 128) and np.abs(ref).max() > 0.1
    assert err < 1e-4
    # Distances agree too (what callers threshold).
    np.testing.assert_allclose(
        dlib_resnet.distance(ours[:4], ours[4:]),
        np.linalg.norm(ref[:4] - ref[4:], axis=-1),
        atol=1e-4,
    )


def test_identity_on_lfw(embed):
    """Same-person pairs are closer than different-person pairs (112x112 crops, resized inside)."""
    people = _people(2)
    people = people[:: len(people) // 50][:50]
    files = [f for p in people for f in _first_images(p, 2)]
    x = np.stack([images.load_rgb(f, 112) for f in files])
    e = embed(x)
    d = np.linalg.norm(e[:, None] - e[None], axis=-1)
    person = np.repeat(np.arange(len(people)), 2)
    i, j = np.triu_indices(len(files), 1)
    same, diff = d[i, j][person[i] == person[j]], d[i, j][person[i] != person[j]]
    ranked = float((same[:, None] < diff[None, :]).mean())
    # Balanced verification set: each same pair and one different pair per person.
    n = len(people)
    other = np.array([d[2 * k, 2 * ((k + 1) % n) + 1] for k in range(n)])
    dist = np.concatenate([same, other])
    label = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])

    def accuracy(t):
        return float(((dist < t) == label).mean())

    best = max(np.sort(dist), key=accuracy)
    print(
        f"\nLFW ({n} people, {n} same + {n} different pairs): accuracy {accuracy(0.6):.3f} at "
        f"dlib's 0.6, {accuracy(best):.3f} at best threshold {best:.3f}; same-closer-than-"
        f"different over {same.size}x{diff.size} pair combinations {ranked:.3f}; "
        f"mean distance same {same.mean():.3f}, different {diff.mean():.3f}"
    )
    assert ranked > 0.9
    assert same.mean() < diff.mean()


def test_gradient_reaches_images(descriptor):
    x = jnp.asarray(images.load_rgb(_first_images(_people(1)[0], 1)[0], 64))[None]
    target = jax.lax.stop_gradient(descriptor(x[:, ::-1]))

    def loss(x):
        return dlib_resnet.distance(descriptor(x), target).sum()

    g = jax.jit(jax.grad(loss))(x)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0
    # Zero distance has a zero (not NaN) gradient.
    at_zero = jax.grad(lambda a: dlib_resnet.distance(a, jnp.ones((2, 4))).sum())(jnp.ones((2, 4)))
    np.testing.assert_array_equal(at_zero, 0.0)


def _read(file):
    return dlib_format.read_network(str(file), dlib_resnet.wrapper_kinds())


def test_reader_consumes_whole_file(path):
    net = _read(path)
    assert net.input.fields["mean"] == pytest.approx(dlib_resnet.MEAN_RGB, abs=1e-4)
    assert net.loss.fields["distance_threshold"] == pytest.approx(0.6)
    kinds = [layer.type for layer in net.layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds[-1] == "fc"


@pytest.mark.parametrize("cut", ["start", "middle", "last_byte"])
def test_reader_rejects_truncated_file(path, tmp_path, cut):
    data = open(path, "rb").read()
    keep = {"start": 40, "middle": len(data) // 2, "last_byte": len(data) - 1}[cut]
    bad = tmp_path / "truncated.dat"
    bad.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"truncated\.dat: .* at byte \d+") as e:
        _read(bad)
    assert "\n" not in str(e.value)


def test_reader_rejects_garbage_and_trailing_bytes(path, tmp_path):
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"garbage\.dat: .* at byte \d+") as e:
        _read(garbage)
    assert "\n" not in str(e.value)
    longer = tmp_path / "longer.dat"
    longer.write_bytes(open(path, "rb").read() + b"\x00")
    with pytest.raises(ValueError, match=r"1 unexpected bytes after the network at byte"):
        _read(longer)


def test_primitive_decoders():
    def dec(raw):
        return dlib_format.Decoder(raw, "hand-made")

    assert dec(b"\x01\x00").integer() == 0
    assert dec(b"\x81\x05").integer() == -5  # 0x80 = negative
    assert dec(b"\x02\x34\x12").integer() == 0x1234  # little-endian
    assert dec(b"\x82\x00\x01").integer() == -256
    with pytest.raises(ValueError, match="bad control byte"):
        dec(b"\x81\x05").integer(signed=False)
    with pytest.raises(ValueError, match="need 2 bytes"):
        dec(b"\x02\x01").integer()
    # 0x99999a * 2**-24 = 0.6 (float32): loss_metric's distance threshold in the real file.
    assert dec(b"\x03\x9a\x99\x99\x81\x18").float() == np.float32(0.6)
    assert dec(b"\x01\x03\x01\x02").float() == 12.0  # 3 * 2**2
    assert dec(b"\x01\x05hello").string() == "hello"
    assert dec(b"1").boolean() and not dec(b"0").boolean()
    tensor = b"\x01\x02" + b"\x01\x01\x01\x02\x01\x01\x01\x01" + np.float32([1.5, -2]).tobytes()
    np.testing.assert_array_equal(dec(tensor).tensor(), np.float32([1.5, -2]).reshape(1, 2, 1, 1))
    # Round trips through the encoders.
    for v in (0, 1, -1, 255, -256, 2**62 + 3, -(2**63) + 1):
        d = dec(dlib_format.encode_integer(v))
        assert d.integer() == v and d.offset == len(d.data)
    for v in (0.0, 0.6, -1.5, 122.782, 1e-30, -3e38):
        v32 = float(np.float32(v))
        assert dec(dlib_format.encode_float(v32)).float() == v32
    assert dec(dlib_format.encode_float(math.inf)).float() == math.inf
    assert math.isnan(dec(dlib_format.encode_float(math.nan)).float())
    assert dec(dlib_format.encode_string("con_4")).string() == "con_4"


def test_missing_weights(tmp_path):
    bogus = str(tmp_path / "no_such_model.dat")
    with pytest.raises(weights.MissingWeightsError, match="no_such_model.dat"):
        dlib_resnet.load_variables(bogus)
    with pytest.raises(weights.MissingWeightsError):
        dlib_resnet.DlibDescriptor.load(bogus)
