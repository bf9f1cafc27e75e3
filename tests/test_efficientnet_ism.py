"""EfficientNet-B0 encoder and ISM: shapes, names, randomness, gradients, dtypes.

Shapes at 224 are checked with eval_shape (no compute); real compute runs at
112 or smaller with batch 2 so the file stays fast on a small CPU.
"""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax.models.efficientnet import EfficientNetB0
from dfrec_jax.models.ism import ISM
from tests import tiny


def _init_shapes(model, size, batch=1):
    x = jnp.zeros((batch, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _numpy_variables(model, size=16, seed=0):
    """Variables with exactly init's tree and dtypes, filled by numpy (tests/tiny.host_values):
    compiling flax's ~300 random initialisers costs ~20 s of XLA time on CPU (the ISM
    forward itself ~3 s)."""
    return tiny.host_values(_init_shapes(model, size), seed)


def _num_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _paths(tree):
    return {"/".join(k) for k in flax.traverse_util.flatten_dict(tree)}


@pytest.fixture(scope="module")
def ism_small():
    model = ISM()
    images = jax.random.uniform(jax.random.key(1), (2, 112, 112, 3))
    return model, _numpy_variables(model), images


def test_efficientnet_param_count():
    n = _num_params(_init_shapes(EfficientNetB0(), 224)["params"])
    print(f"EfficientNetB0 params (no conv_head/classifier): {n:,}")
    # timm efficientnet_b0 minus classifier and conv_head/bn2 is 3,595,388.
    assert 3_300_000 <= n <= 4_300_000
    assert n == 3_595_388


@pytest.mark.parametrize("output_stride,high_hw", [(32, 7), (16, 14), (8, 28)])
def test_efficientnet_shapes(output_stride, high_hw):
    model = EfficientNetB0(output_stride=output_stride)
    variables = _init_shapes(model, 224)
    out = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3)), train=False), variables
    )
    chex.assert_shape(out["low"], (2, 56, 56, 24))
    chex.assert_shape(out["high"], (2, high_hw, high_hw, 320))
    strides = [224 // f.shape[1] for f in out["features"]]
    assert strides == [min(s, output_stride) for s in (2, 4, 8, 16, 32)]
    assert [f.shape[-1] for f in out["features"]] == [16, 24, 40, 112, 320]
    # Dilation keeps the parameter tree identical across output strides.
    assert _num_params(variables["params"]) == 3_595_388


def test_efficientnet_timm_names():
    paths = _paths(_init_shapes(EfficientNetB0(), 64)["params"])
    for expected in [
        "conv_stem/kernel",
        "bn1/scale",
        "blocks_0_0/conv_dw/kernel",
        "blocks_0_0/bn1/scale",
        "blocks_0_0/conv_pw/kernel",
        "blocks_0_0/bn2/bias",
        "blocks_0_0/se/conv_reduce/kernel",
        "blocks_0_0/se/conv_reduce/bias",
        "blocks_0_0/se/conv_expand/bias",
        "blocks_1_0/conv_pw/kernel",
        "blocks_1_0/bn1/scale",
        "blocks_3_1/conv_dw/kernel",
        "blocks_3_1/bn2/scale",
        "blocks_5_3/se/conv_expand/kernel",
        "blocks_6_0/conv_pwl/kernel",
        "blocks_6_0/bn3/bias",
    ]:
        assert expected in paths, expected
    blocks = {p.split("/")[0] for p in paths if p.startswith("blocks_")}
    assert len(blocks) == 16
    assert "blocks_0_1" not in blocks and "blocks_6_1" not in blocks
    assert not any(p.endswith("bias") and "conv" in p and "/se/" not in p for p in paths)


def test_stochastic_depth_rng():
    # Half the depth (10 blocks, 3 of them residual: the ones drop-path applies to) compiles
    # in a third of the full encoder's time; the rng plumbing is the same.
    model = EfficientNetB0(stochastic_depth_rate=0.5, depth_coefficient=0.5, depthwise_impl="xla")
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    variables = _numpy_variables(model)

    @jax.jit
    def train_apply(key):
        out, _ = model.apply(
            variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        return out["high"]

    a, b, a2 = (train_apply(jax.random.key(k)) for k in (1, 2, 1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a2)

    # Eval mode: no dropout rng needed, and deterministic.
    eval_apply = jax.jit(lambda v: model.apply(v, x, train=False)["high"])
    np.testing.assert_array_equal(eval_apply(variables), eval_apply(variables))


def test_ism_forward_small(ism_small):
    model, variables, images = ism_small
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    chex.assert_shape([out["seg"], out["seg_logits"]], (2, 112, 112, 1))
    chex.assert_shape(out["forgery_logit"], (2,))
    chex.assert_tree_all_finite(out)
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert float(out["seg"].min()) >= 0.0 and float(out["seg"].max()) <= 1.0
    assert set(variables["params"]) == {"encoder", "decoder", "classifier"}
    print(f"ISM params: {_num_params(variables['params']):,}")


def test_ism_eval_shape_224_and_bad_size():
    model = ISM()
    variables = _init_shapes(model, 224)
    out = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3)), train=False), variables
    )
    chex.assert_shape(out["seg"], (2, 224, 224, 1))
    chex.assert_shape(out["forgery_logit"], (2,))
    with pytest.raises(ValueError, match="divisible by 16"):
        _init_shapes(model, 100)


def test_ism_gradients_reach_every_param(ism_small):
    model, variables, images = ism_small
    # The graph that connects parameters to outputs is the same in eval mode (running BN
    # statistics) and with lax's grouped depthwise conv (same parameters) as with the CPU slice
    # sum, whose gradients tests/test_layers.py checks: both keep the compile small (11 -> 6 s).
    model = model.clone(depthwise_impl="xla")

    @jax.jit
    def grads(params):
        def loss(p):
            out = model.apply({**variables, "params": p}, images, train=False)
            return out["seg"].sum() + out["forgery_logit"].sum()

        return jax.grad(loss)(params)

    g = grads(variables["params"])
    chex.assert_tree_all_finite(g)
    # Every leaf gets gradient. Single entries may legitimately be zero: the
    # off-centre taps of the rate-12/24/36 atrous kernels only ever see zero
    # padding on a 7x7 stride-16 map, and ReLU-dead channels pass none.
    zero = [
        path
        for path, leaf in flax.traverse_util.flatten_dict(g, sep="/").items()
        if not float(jnp.abs(leaf).sum()) > 0
    ]
    assert not zero, zero


def test_ism_bf16_compute():
    # The tiny test model's ISM (tests/tiny.py): the dtype plumbing is the full one's, the
    # compile a third of it.
    model = ISM(dtype=jnp.bfloat16, **tiny.tiny_config().model.ism)
    shapes = _init_shapes(model, 64)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    variables = tiny.host_values(shapes)
    images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    out, _ = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
        )
    )(variables, images)
    chex.assert_shape(out["seg"], (2, 64, 64, 1))
    assert all(v.dtype == jnp.float32 for v in out.values())
    chex.assert_tree_all_finite(out)
