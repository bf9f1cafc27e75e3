"""TF.js weight reader and the face-api attribute nets on real LFW faces.

No JavaScript reference runs here. The port is checked (1) against the same nets written
directly in TensorFlow ops from face-api's TypeScript source (TF.js ops have TensorFlow's
semantics), and (2) by geometry on aligned LFW faces: landmarks inside the image, eyes above
nose above mouth, the image-left eye first, eye centres that agree across aligned faces, and
mirrored landmarks for mirrored faces. Measured here (16 faces): parity to TensorFlow
1e-7 (landmarks, fractions of the image), eye-centre std 1.3-1.8 px, flip error mean 1.9 px,
worst face 2.7 px, worst landmark (mean over faces) 3.4 px; a wrong mirror map gives 15 px.
"""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax import configlib, images
from dfrec_jax.pretrained import attributes, tfjs, weights

# ----------------------------------------------------------------------------- TF.js reader


def _write_model(folder, manifest, shards):
    for name, data in shards.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    path = os.path.join(folder, "tiny-weights_manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


def test_tfjs_reader_tiny_manifest(tmp_path):
    dense = np.arange(6, dtype="<f4").reshape(2, 3) / 4 - 0.3
    codes8 = np.array([0, 1, 2, 255], np.uint8)
    codes16 = np.array([3, 65535], "<u2")
    halves = np.array([0.5, -2.25, 1e-3], "<f2")
    ints = np.array([-7, 9], "<i4")
    blob = b"".join(a.tobytes() for a in (dense, codes8, codes16, halves, ints))
    q8 = {"dtype": "uint8", "scale": 0.1, "min": -0.2}
    q16 = {"dtype": "uint16", "scale": 0.25, "min": 1.0}
    manifest = [
        {
            "paths": ["tiny.bin.part1", "tiny.bin.part2"],  # a group split over two shards
            "weights": [
                {"name": "a/dense", "shape": [2, 3], "dtype": "float32"},
                {"name": "a/q8", "shape": [2, 2], "dtype": "float32", "quantization": q8},
                {"name": "b/q16", "shape": [2], "dtype": "int32", "quantization": q16},
                {
                    "name": "b/half",
                    "shape": [3],
                    "dtype": "float32",
                    "quantization": {"dtype": "float16"},
                },
                {"name": "c/ints", "shape": [2], "dtype": "int32"},
            ],
        }
    ]
    path = _write_model(
        tmp_path, manifest, {"tiny.bin.part1": blob[:10], "tiny.bin.part2": blob[10:]}
    )
    got = tfjs.load(path)
    assert list(got) == ["a/dense", "a/q8", "b/q16", "b/half", "c/ints"]
    np.testing.assert_array_equal(got["a/dense"], dense)
    assert got["a/q8"].dtype == np.float32 and got["a/q8"].shape == (2, 2)
    np.testing.assert_array_equal(
        got["a/q8"], np.float32([[-0.2, -0.1], [-0.2 + 0.2, -0.2 + 25.5]])
    )
    np.testing.assert_array_equal(got["b/q16"], np.int32([2, 16385]))  # 1.75 rounds to 2
    np.testing.assert_array_equal(got["b/half"], halves.astype(np.float32))
    np.testing.assert_array_equal(got["c/ints"], ints)

    # A shard that is too short or too long for the manifest is refused, naming the file.
    _write_model(tmp_path, manifest, {"tiny.bin.part2": blob[10:-1]})
    with pytest.raises(tfjs.TfjsError, match="inside c/ints"):
        tfjs.load(path)
    _write_model(tmp_path, manifest, {"tiny.bin.part2": blob[10:] + b"\0"})
    with pytest.raises(tfjs.TfjsError, match="uses 46 bytes but its shards hold 47"):
        tfjs.load(path)


# ----------------------------------------------------------------------------- real nets

H = attributes.INPUT_SIZE


@pytest.fixture(scope="module")
def faces():
    """16 aligned LFW faces from 16 different people, [16,112,112,3] in [0,1]."""
    people = sorted(glob.glob(os.path.join(configlib.lfw_dir(), "*")))[::50][:16]
    paths = [sorted(glob.glob(os.path.join(p, "*.jpg")))[0] for p in people]
    return np.stack([images.load_rgb(p, H) for p in paths])


@pytest.fixture(scope="module")
def landmark_net():
    return attributes.AttributeNet.load(heads=("landmarks",))


@pytest.fixture(scope="module")
def full_net():
    return attributes.AttributeNet.load()


@pytest.fixture(scope="module")
def landmarks_and_flipped(landmark_net, faces):
    """Landmarks in pixels for the faces and for their mirror images, one batch of 32."""
    batch = np.concatenate([faces, faces[:, :, ::-1]])
    lm = np.asarray(landmark_net.predict(batch)["landmarks"]) * H
    return lm[:16], lm[16:]


def test_landmarks_geometry_on_aligned_faces(landmarks_and_flipped):
    lm, _ = landmarks_and_flipped
    assert lm.shape == (16, 68, 2)
    # Inner points (brows, eyes, nose, mouth) well inside; the jaw line may touch the border.
    assert lm[:, 17:].min() > 8 and lm[:, 17:].max() < H - 8
    assert lm.min() > -4 and lm.max() < H + 4
    left_eye, right_eye = lm[:, 36:42].mean(1), lm[:, 42:48].mean(1)
    nose_tip, mouth = lm[:, 30], lm[:, 48:68].mean(1)
    eyes_y = np.maximum(left_eye[:, 1], right_eye[:, 1])
    assert np.all(eyes_y + 5 < nose_tip[:, 1]) and np.all(nose_tip[:, 1] + 5 < mouth[:, 1])
    assert np.all(left_eye[:, 0] + 20 < right_eye[:, 0])  # image-left eye is points 36-41
    assert np.all(np.abs(nose_tip[:, 0] - (left_eye[:, 0] + right_eye[:, 0]) / 2) < 12)
    # The faces are aligned, so the eye centres sit at the same place in every image.
    for eye in (left_eye, right_eye):
        assert eye.std(0).max() < 3.0, eye.std(0)
    assert abs(left_eye[:, 0].mean() - (H - right_eye[:, 0].mean())) < 4  # symmetric crop


def test_flipped_face_gives_mirrored_landmarks(landmarks_and_flipped):
    lm, lm_flipped = landmarks_and_flipped
    back = lm_flipped[:, attributes.MIRROR_68].copy()
    back[..., 0] = H - back[..., 0]
    err = np.linalg.norm(back - lm, axis=-1)
    assert err.mean() < 3.0 and err.mean(1).max() < 5.0, (err.mean(), err.mean(1).max())
    assert err.mean(0).max() < 5.0, err.mean(0)  # every point maps to its true mirror point
    # Without the left/right swap the error is large: the permutation is what makes it small.
    unswapped = lm_flipped.copy()
    unswapped[..., 0] = H - unswapped[..., 0]
    assert np.linalg.norm(unswapped - lm, axis=-1).mean() > 5 * err.mean()


def _tf_reference(x, tensors):
    """face-api's three nets in TensorFlow ops, written from its TypeScript source."""
    import tensorflow as tf

    def w(name):
        return tf.constant(tensors[name])

    def sep(x, p, s=1):
        y = tf.nn.separable_conv2d(
            x, w(p + "/depthwise_filter"), w(p + "/pointwise_filter"), [1, s, s, 1], "SAME"
        )
        return y + w(p + "/bias")

    def conv(x, p, s):
        return tf.nn.conv2d(x, w(p + "/filters"), s, "SAME") + w(p + "/bias")

    def fc(x, p):
        return tf.matmul(x, w(p + "/weights")) + w(p + "/bias")

    def pool(x):
        x = tf.nn.avg_pool2d(x, 7, 2, "VALID")
        return tf.reshape(x, [x.shape[0], -1])

    def dense_backbone(x, net):
        for i in range(4):
            p = f"{net}:dense{i}"
            o1 = tf.nn.relu(conv(x, p + "/conv0", 2) if i == 0 else sep(x, p + "/conv0", 2))
            o2 = sep(o1, p + "/conv1")
            o3 = sep(tf.nn.relu(o1 + o2), p + "/conv2")
            o4 = sep(tf.nn.relu(o1 + o2 + o3), p + "/conv3")
            x = tf.nn.relu(o1 + o2 + o3 + o4)
        return pool(x)

    def reduction(x, p, activate=True):
        o = sep(tf.nn.relu(x) if activate else x, p + "/separable_conv0")
        o = tf.nn.max_pool2d(sep(tf.nn.relu(o), p + "/separable_conv1"), 3, 2, "SAME")
        return o + conv(x, p + "/expansion_conv", 2)

    x = (tf.constant(x) * 255 - tf.constant(attributes.MEAN_RGB, tf.float32)) / 255
    out = {
        "landmarks": tf.reshape(fc(dense_backbone(x, "lm"), "lm:fc"), [-1, 68, 2]),
        "expression": tf.nn.softmax(fc(dense_backbone(x, "ex"), "ex:fc")),
    }
    o = tf.nn.relu(conv(x, "ag:entry_flow/conv_in", 2))
    o = reduction(o, "ag:entry_flow/reduction_block_0", activate=False)
    o = reduction(o, "ag:entry_flow/reduction_block_1")
    for i in range(2):
        p, y = f"ag:middle_flow/main_block_{i}", o
        for j in range(3):
            y = sep(tf.nn.relu(y), f"{p}/separable_conv{j}")
        o = o + y
    o = reduction(o, "ag:exit_flow/reduction_block")
    o = pool(tf.nn.relu(sep(o, "ag:exit_flow/separable_conv")))
    out["age"] = fc(o, "ag:fc/age")[:, 0]
    out["gender_male"] = tf.nn.softmax(fc(o, "ag:fc/gender"))[:, 0]
    return {k: v.numpy() for k, v in out.items()}


def test_port_matches_tensorflow_reference(full_net, faces):
    folder = attributes.face_api_dir()
    tensors = {}
    for short, model in (
        ("lm", "face_landmark_68_model"),
        ("ex", "face_expression_model"),
        ("ag", "age_gender_model"),
    ):
        loaded = tfjs.load(os.path.join(folder, f"{model}-weights_manifest.json"))
        tensors.update({f"{short}:{k}": v for k, v in loaded.items()})
    x = faces[:4]
    ref = _tf_reference(x, tensors)
    got = jax.tree.map(np.asarray, full_net.predict(x))
    np.testing.assert_allclose(got["landmarks"], ref["landmarks"], atol=1e-5)
    np.testing.assert_allclose(got["expression"], ref["expression"], atol=1e-5)
    np.testing.assert_allclose(got["age"], ref["age"], atol=1e-3)
    np.testing.assert_allclose(got["gender_male"], ref["gender_male"], atol=1e-5)
    # The vector is the same numbers, laid out as attribute_names() says.
    vec = np.asarray(full_net(x))
    names = full_net.attribute_names()
    assert vec.shape == (4, 145) and len(names) == 145
    assert names[2 * 30] == "landmark30_x" and names[136] == "expression_neutral"
    np.testing.assert_allclose(vec[:, 2 * 30 + 1], got["landmarks"][:, 30, 1], atol=1e-6)
    np.testing.assert_allclose(vec[:, 136:143].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vec[:, names.index("age_years_div100")], got["age"] / 100, rtol=1e-6)


def test_gradients_and_other_sizes(full_net, faces):
    """224x224 input is resized inside, differentiably; gradients reach the pixels only."""
    x = jnp.asarray(np.repeat(np.repeat(faces[:2], 2, axis=1), 2, axis=2))  # 224, same face
    vec = full_net(x)
    vec112 = full_net(faces[:2])
    lm_err = np.abs(np.asarray(vec - vec112)[:, :136]).max() * H
    assert lm_err < 1.5, lm_err  # the same face at twice the size: same landmarks

    def loss(images):
        return jnp.sum(full_net(images) * jnp.linspace(0.5, 1.5, 145))

    grad = jax.jit(jax.grad(loss))(x)
    assert grad.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 1e-4


def test_known_genders(full_net):
    """Real-data check of the age/gender head on LFW people of known gender."""
    groups = {
        "women": ["Angelina_Jolie", "Serena_Williams", "Laura_Bush", "Nicole_Kidman"],
        "men": ["Tony_Blair", "Colin_Powell", "Gerhard_Schroeder", "Aaron_Eckhart"],
    }
    male = {}
    for group, people in groups.items():
        paths = [
            sorted(glob.glob(os.path.join(configlib.lfw_dir(), p, "*.jpg")))[0] for p in people
        ]
        out = full_net.predict(np.stack([images.load_rgb(p, H) for p in paths]))
        male[group] = np.asarray(out["gender_male"])
        age = np.asarray(out["age"])
        assert np.all((age > 15) & (age < 80)), age
    assert np.all(male["women"] < 0.5) and np.all(male["men"] > 0.5), male


# ----------------------------------------------------------------------------- errors


def test_missing_weights_is_one_clear_line(tmp_path):
    with pytest.raises(weights.MissingWeightsError) as e:
        attributes.AttributeNet.load(str(tmp_path / "nowhere"))
    message = str(e.value)
    assert "\n" not in message
    assert "face_landmark_68_model-weights_manifest.json" in message and "run.sh" in message


def test_corrupt_weights_are_refused(tmp_path):
    src = attributes.face_api_dir()
    for name in ("face_landmark_68_model-weights_manifest.json", "face_landmark_68_model.bin"):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    with open(tmp_path / "face_landmark_68_model.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    with pytest.raises(weights.MissingWeightsError, match="face_landmark_68_model.bin.*sha256"):
        attributes.AttributeNet.load(str(tmp_path), heads=("landmarks",))


def test_factory_and_plug_in(monkeypatch):
    def celeba(images):  # a user's classifier: any callable images -> [B, A]
        return jnp.mean(images, axis=(1, 2))

    assert attributes.load_attribute_net(celeba) is celeba
    monkeypatch.setattr(attributes, "_FACTORIES", dict(attributes._FACTORIES))
    attributes.register_attribute_net("celeba", lambda path: celeba)
    assert attributes.load_attribute_net("celeba") is celeba
    with pytest.raises(ValueError, match="unknown attribute net 'nope'"):
        attributes.load_attribute_net("nope")
    with pytest.raises(ValueError, match="square"):
        attributes.preprocess(jnp.zeros((1, 112, 96, 3)))
