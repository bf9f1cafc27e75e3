"""The real loss networks from config.loss, plugged into total_loss on real LFW faces."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import pytest

from configs import demo as demo_config
from dfrec_jax import loss_nets, losses, masking
from dfrec_jax.pretrained import facenet
from tests.lfw import real_faces


@pytest.fixture(scope="module")
def nets_and_weights():
    config = demo_config.get_config()
    return loss_nets.build_loss_nets(config.loss), loss_nets.loss_weights(config.loss)


def _fake_outputs(source, target, true_target, mask_idx):
    """Model-like outputs whose predicted patches are the target's masked patches."""
    pred = masking.take_tokens(masking.patchify(target, 8), mask_idx)
    return {"source": source, "target": target, "pred_patches": pred, "mask_idx": mask_idx}


@pytest.mark.slow  # compiles FaceNet + VGG16 + face-api forward and backward: ~90 s on 2 cores
def test_real_loss_nets_zero_for_perfect_recovery_and_grow_with_damage(nets_and_weights):
    nets, weights = nets_and_weights
    # The recovery terms: the ISM's mask and classification terms need segmentation outputs
    # and true masks that this test does not fake (tests/test_losses.py covers them).
    weights = dataclasses.replace(weights, mask=0.0, classification=0.0)
    faces = jnp.asarray(real_faces(4))
    source, target = faces[:2], faces[2:]
    batch = {"image": target, "source": source, "target": target}
    mask_idx = jnp.tile(jnp.arange(0, 196, 2, dtype=jnp.int32)[None], (2, 1))

    @jax.jit
    def loss_of(rec_source, rec_target):
        outputs = _fake_outputs(rec_source, rec_target, target, mask_idx)
        return losses.total_loss(outputs, batch, nets, weights)

    perfect, metrics = loss_of(source, target)
    assert float(perfect) < 1e-4, metrics
    noise = jax.random.normal(jax.random.key(0), target.shape)
    previous = float(perfect)
    for level in (0.05, 0.15):
        damaged, m = loss_of(
            jnp.clip(source + level * noise, 0, 1), jnp.clip(target + level * noise, 0, 1)
        )
        assert float(damaged) > previous, (level, m)
        for key in ("identity/source", "identity/target", "perceptual/target", "attribute/target"):
            assert float(m[key]) > 0, key
        previous = float(damaged)

    grads = jax.jit(jax.grad(lambda s, t: loss_of(s, t)[0], argnums=(0, 1)))(
        jnp.clip(source + 0.1 * noise, 0, 1), jnp.clip(target + 0.1 * noise, 0, 1)
    )
    chex.assert_tree_all_finite(grads)
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


def test_unknown_loss_net_names_fail_clearly():
    config = demo_config.get_config()
    config.loss.identity_net = "arcface"
    with pytest.raises(ValueError, match="unknown loss.identity_net"):
        loss_nets.build_loss_nets(config.loss)
    config = demo_config.get_config()
    config.loss.perceptual_net = "vgg19_torchvision"
    with pytest.raises(ValueError, match="perceptual_weights"):
        loss_nets.build_loss_nets(config.loss)
    weights = loss_nets.loss_weights(config.loss)  # the paper's Eq. 4/7/10 reading
    assert (weights.identity, weights.patch, weights.identity_target) == (1.0, 0.5, 2.0)


def test_identity_size_resizes_faces_for_the_loss_facenet(nets_and_weights):
    """loss.identity_size=128 runs the identity loss's FaceNet at 128 px: its maps shrink with
    the input, its embedding of a real face stays that person's. The demo keeps 160."""
    nets, _ = nets_and_weights
    full_net = nets.identity.net
    assert full_net.input_size == facenet.INPUT_SIZE == 160
    config = demo_config.get_config()
    config.loss.identity_size = 128
    small_nets = loss_nets.build_loss_nets(config.loss)
    small_net = small_nets.identity.net
    assert small_net.input_size == 128
    faces = jnp.asarray(real_faces(4))  # four people
    maps = jax.eval_shape(small_nets.identity, faces)[0]
    assert [m.shape[1] for m in maps] == [13, 13, 6, 2]
    assert [m.shape[1] for m in jax.eval_shape(full_net, faces)["features"]] == [17, 17, 8, 3]
    small, full = small_net(faces)["embedding"], full_net(faces)["embedding"]
    cosines = small @ full.T  # unit vectors; [i, j]: face i at 128 px vs face j at 160 px
    same_face = jnp.diag(cosines)
    other_faces = jnp.where(jnp.eye(4, dtype=bool), -1.0, cosines)
    # Measured 0.77-0.87 for the same face, about 0 between people.
    assert float(same_face.min()) > 0.6, cosines
    assert bool(jnp.all(same_face > other_faces.max(axis=1) + 0.3)), cosines
    assert float(same_face.max()) < 0.99  # the size did change what FaceNet sees

    config.loss.identity_size = 64
    with pytest.raises(ValueError, match="loss.identity_size must be 0"):
        loss_nets.build_loss_nets(config.loss)
