"""`loss.dtype=bfloat16`: the real frozen loss networks in bfloat16 against float32, on LFW faces.

Eight real LFW faces t (demo config: 112 px, VGG at 56 px) against three kinds of recovery r:
t + 0.05 N(0, 1) noise, t + 0.15 noise (both clipped to [0, 1]) and another person's face.
Measured on CPU (XLA CPU at the tests' optimisation level 0, 2-core AMD EPYC; worst case over
the 3 x 8 pairs; the float32 batch means per kind of recovery are noise 0.05 / 0.15 / other):

  term (per sample)        fp32 batch means        max |bf16 - fp32|     asserted
  identity  (in [0, 4])    0.154 / 0.633 / 1.489   0.0061 (1.6% rel)     < 0.02
  perceptual (in [0, 4])   0.095 / 0.546 / 1.144   0.0014 (1.0% rel)     < 0.005
  attribute (145 outputs)  0.008 / 0.336 / 0.746   0.051  (4.7% rel)*    < 0.1 fp32 + 0.01
  FaceNet embedding        cos(e_bf16, e_fp32) min 0.99987                > 0.999
  d(sum of the 3)/d r      cos(g_bf16, g_fp32) 0.976 .. 0.986, finite     > 0.95, finite

* 11% relative on the smallest values (fp32 ~0.007, |delta| 0.0008).
The attribute term deviates most: face-api's landmark outputs (fractions of the image) come out
of a bfloat16 net (max |delta| 0.005, 0.6 px at 112 px), and its smooth L1 sums 145 of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo as demo_config
from dfrec_jax import loss_nets, losses
from tests.lfw import real_faces

B = 8


def _nets(dtype: str) -> losses.LossNets:
    config = demo_config.get_config()
    config.loss.dtype = dtype
    return loss_nets.build_loss_nets(config.loss)


@pytest.fixture(scope="module")
def nets():
    return {"float32": _nets("float32"), "bfloat16": _nets("bfloat16")}


@pytest.fixture(scope="module")
def pairs():
    """(recovered, true) pairs: noisy copies of 8 LFW faces, and 8 other people's faces."""
    faces = jnp.asarray(real_faces(2 * B))
    true = faces[:B]
    noise = jax.random.normal(jax.random.key(0), true.shape)
    return {
        "noise0.05": (jnp.clip(true + 0.05 * noise, 0, 1), true),
        "noise0.15": (jnp.clip(true + 0.15 * noise, 0, 1), true),
        "other": (faces[B:], true),
    }


def _terms(nets, recovered, true):
    return {
        "identity": losses.identity_per_sample(nets.identity, recovered, true)[0],
        "perceptual": losses.perceptual_per_sample(nets.perceptual, recovered, true),
        "attribute": losses.attribute_per_sample(nets.attribute, recovered, true),
    }


def _floating_dtypes(tree) -> set:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_loss_dtype_sets_weight_and_activation_dtypes(nets):
    arrays, _ = losses.split_frozen(nets["float32"])
    assert _floating_dtypes(arrays) == {"float32"}  # the default is unchanged
    bf16 = nets["bfloat16"]
    facenet = bf16.identity.net
    # The jitted step's frozen arguments: every weight bfloat16, FaceNet's BatchNorm
    # statistics (normalisation constants, 0.1% of the bytes) float32.
    assert _floating_dtypes(facenet.variables["params"]) == {"bfloat16"}
    assert _floating_dtypes(facenet.variables["batch_stats"]) == {"float32"}
    assert _floating_dtypes(bf16.perceptual) == {"bfloat16"}
    assert _floating_dtypes(bf16.attribute) == {"bfloat16"}
    arrays, _ = losses.split_frozen(bf16)
    bf16_bytes = sum(x.nbytes for x in arrays)
    fp32_bytes = sum(x.nbytes for x in losses.split_frozen(nets["float32"])[0])
    assert bf16_bytes < 0.51 * fp32_bytes
    # Activations (shapes only, nothing computed): bfloat16 maps, float32 embedding and
    # attribute vector, float32 losses.
    images = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
    features, embedding = jax.eval_shape(bf16.identity, images)
    assert {str(f.dtype) for f in features} == {"bfloat16"} and embedding.dtype == jnp.float32
    assert {str(f.dtype) for f in jax.eval_shape(bf16.perceptual, images)} == {"bfloat16"}
    assert jax.eval_shape(bf16.attribute, images).dtype == jnp.float32
    values = jax.eval_shape(lambda r, t: _terms(bf16, r, t), images, images)
    assert {str(v.dtype) for v in values.values()} == {"float32"}


def test_unknown_loss_dtype_fails_clearly():
    with pytest.raises(ValueError, match="unknown loss.dtype 'float16'"):
        _nets("float16")


def _max_deviation(terms, nets, pairs) -> dict:
    """{(case, term): (max |bf16 - fp32| over the samples, the fp32 values)}."""
    out = {}
    for case, (recovered, true) in pairs.items():
        ref = terms(nets["float32"], recovered, true)
        got = terms(nets["bfloat16"], recovered, true)
        for name, value in got.items():
            assert value.dtype == jnp.float32, (case, name)
            delta = np.abs(np.asarray(value) - np.asarray(ref[name]))
            out[case, name] = delta, np.asarray(ref[name])
    return out


def test_bf16_identity_loss_and_embeddings_match_fp32_on_lfw(nets, pairs):
    def identity(n, recovered, true):
        return {"identity": losses.identity_per_sample(n.identity, recovered, true)[0]}

    for key, (delta, _) in _max_deviation(jax.jit(identity), nets, pairs).items():
        assert np.all(delta < 0.02), (key, delta)
    embed = jax.jit(lambda n, x: n.identity(x)[1])
    true = pairs["other"][1]
    cos = jnp.sum(embed(nets["float32"], true) * embed(nets["bfloat16"], true), axis=-1)
    assert float(jnp.min(cos)) > 0.999, cos


def test_bf16_perceptual_and_attribute_losses_match_fp32_on_lfw(nets, pairs):
    def terms(n, recovered, true):
        return {
            "perceptual": losses.perceptual_per_sample(n.perceptual, recovered, true),
            "attribute": losses.attribute_per_sample(n.attribute, recovered, true),
        }

    tolerance = {"perceptual": lambda ref: 0.005, "attribute": lambda ref: 0.1 * ref + 0.01}
    for (case, name), (delta, ref) in _max_deviation(jax.jit(terms), nets, pairs).items():
        assert np.all(delta < tolerance[name](ref)), (case, name, delta, ref)


def _cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow  # compiles the backward pass of all three nets twice: 60-80 s on 2 cores
def test_bf16_gradients_to_recovered_faces_finite_and_aligned(nets, pairs):
    def loss(n, recovered, true):
        return sum(jnp.mean(v) for v in _terms(n, recovered, true).values())

    grad = jax.jit(jax.grad(loss, argnums=1))
    for case, (recovered, true) in pairs.items():
        g16 = grad(nets["bfloat16"], recovered, true)
        assert g16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g16))), case
        assert _cosine(g16, grad(nets["float32"], recovered, true)) > 0.95, case
