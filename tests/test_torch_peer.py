"""The PyTorch peer of the train step (tests/torch_peer.py) computes what our step computes:
its frozen networks carry our weights and give our outputs, its loss equals losses.total_loss
term for term on the same inputs, and its network optimises as many parameters as ours
(the same in the ISM and TIRM, 0.5% more in the SIRM's attention gates).
Otherwise `bench --what peer_torch` would compare two different programs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from dfrec_jax import inference, loss_nets, losses
from dfrec_jax.train import standalone
from tests.lfw import real_faces

torch = pytest.importorskip("torch", reason="test-only dependency: pip install torch==2.13.0")
torch_peer = pytest.importorskip("tests.torch_peer")

B = 3  # examples; the identity and perceptual nets see 2B faces


@pytest.fixture(scope="module")
def config():
    return demo.get_config()


@pytest.fixture(scope="module")
def nets(config):
    return loss_nets.build_loss_nets(config.loss)


@pytest.fixture(scope="module")
def peer_nets(nets):
    torch.set_num_threads(1)
    return torch_peer.frozen_nets(nets)


def nchw(x) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _relative(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def test_frozen_networks_carry_our_weights_and_outputs(nets, peer_nets):
    faces = real_faces(B)
    x = nchw(faces)
    with torch.no_grad():
        features, embedding = peer_nets["identity"](x)
        perceptual = peer_nets["perceptual"](x)
        attribute = peer_nets["attribute"](x)
    our_features, our_embedding = nets.identity(jnp.asarray(faces))
    errors = {
        "embedding": _relative(our_embedding, embedding.numpy()),
        "attribute": _relative(nets.attribute(jnp.asarray(faces)), attribute.numpy()),
    }
    pairs = [(f"facenet{i}", a, b) for i, (a, b) in enumerate(zip(our_features, features))]
    pairs += [(f"vgg{i}", a, b) for i, (a, b) in enumerate(zip(nets.perceptual(faces), perceptual))]
    assert len(pairs) == losses.NUM_IDENTITY_LAYERS + losses.NUM_PERCEPTUAL_LAYERS
    for name, ours, theirs in pairs:
        errors[name] = _relative(np.asarray(ours).transpose(0, 3, 1, 2), theirs.numpy())
    print(f"max |JAX - PyTorch| / max |PyTorch| per output: {errors}")
    assert max(errors.values()) < 1e-5, errors
    assert float(np.std(attribute.numpy())) > 1e-2  # real outputs, not a constant


def _outputs_and_batch(config, seed=0):
    """Random DFREC outputs for B real examples, and the batch they are scored against."""
    rng = np.random.default_rng(seed)
    size, patch = config.model.image_size, config.model.patch_size
    n = (size // patch) ** 2
    faces = real_faces(2 * B, size)
    noisy = np.clip(faces + rng.normal(0, 0.1, faces.shape), 0, 1).astype(np.float32)
    mask_idx = np.stack([rng.permutation(n)[: n // 2] for _ in range(B)]).astype(np.int32)
    outputs = {
        "source": noisy[:B],
        "target": noisy[B:],
        "pred_patches": rng.uniform(0, 1, (B, n // 2, patch * patch * 3)).astype(np.float32),
        "mask_idx": mask_idx,
        "seg_logits": rng.normal(0, 2, (B, size, size, 1)).astype(np.float32),
        "forgery_logit": rng.normal(0, 2, (B,)).astype(np.float32),
    }
    batch = {
        "source": faces[:B],
        "target": faces[B:],
        "mask": (rng.uniform(0, 1, (B, size, size, 1)) > 0.5).astype(np.float32),
        "has_mask": np.array([1, 0, 1], np.float32),
        "label": np.array([1, 0, 1], np.float32),
    }
    return outputs, batch


def test_peer_loss_equals_ours_term_for_term(config, nets, peer_nets):
    outputs, batch = _outputs_and_batch(config)
    weights = loss_nets.loss_weights(config.loss)
    total, metrics = losses.total_loss(
        {k: jnp.asarray(v) for k, v in outputs.items()},
        {k: jnp.asarray(v) for k, v in batch.items()},
        nets,
        weights,
    )
    images = {"source", "target", "seg_logits", "mask"}
    peer_out = {k: nchw(v) if k in images else torch.from_numpy(v) for k, v in outputs.items()}
    peer_out["mask_idx"] = peer_out["mask_idx"].long()
    peer_out["patch"] = config.model.patch_size
    peer_batch = {k: nchw(v) if k in images else torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        peer_total, terms = torch_peer.total_loss(peer_out, peer_batch, peer_nets, weights)
    for name, value in terms.items():
        assert float(value) == pytest.approx(float(metrics[name]), rel=1e-5, abs=1e-6), name
    assert float(peer_total) == pytest.approx(float(total), rel=1e-5)
    assert all(float(metrics[k]) > 0.01 for k in terms), metrics  # every term is exercised


def test_peer_network_is_ours_in_size_and_trains(config, nets):
    model = inference.build_model(config)
    ours = inference.param_counts(inference.abstract_variables(model)["params"])
    step = torch_peer.PeerStep(config, nets)
    peer = step.model
    count = torch_peer.trainable
    parts = {"ism": count(peer.ism) + count(peer.classifier), "sirm": count(peer.sirm),
             "tirm": count(peer.tirm)}  # fmt: skip
    print(f"parameters, ours {ours} vs the peer {parts}")
    assert parts["ism"] == ours["ism"] and parts["tirm"] == ours["tirm"], (parts, ours)
    # The release's attention gates are a little wider than the paper's (sirm.gate="paper").
    assert 0 <= parts["sirm"] - ours["sirm"] <= 0.01 * ours["sirm"], (parts, ours)

    batch = torch_peer.nchw_batch(standalone.synthetic_batch(2, config.model.image_size))
    before = [p.detach().clone() for p in peer.parameters() if p.requires_grad]
    first, second = step(batch), step(batch)
    assert np.isfinite(first) and np.isfinite(second) and first != second
    after = [p for p in peer.parameters() if p.requires_grad]
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed == len(before), f"{len(before) - changed} parameters never updated"


@pytest.mark.slow  # two demo-step compiles (float32, bfloat16) and 21 steps: ~6 min on 2 cores
def test_bench_peer_torch_prints_the_ratio_last():
    cmd = [sys.executable, "-m", "dfrec_jax", "bench", "--what", "peer_torch",
           "--config", "configs/demo.py", "--batch", "2", "--repeats", "1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    turns, summary = lines[:-1], lines[-1]
    assert [t["side"] for t in turns] == ["jax", "torch", "jax_bf16"] * 2
    assert summary["ratio"] == pytest.approx(
        summary["jax_img_per_s"] / summary["torch_img_per_s"], rel=1e-2
    )
    assert all(np.isfinite(v) for v in summary["first_loss"].values()), summary
    assert jax.devices()[0].platform == "cpu" and summary["batch"] == 2
