"""DFREC model: output contract, parameter counts, gradient flow, sharding, config variants."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default as default_config
from configs import demo as demo_config
from configs import official as official_config
from dfrec_jax import inference, masking
from dfrec_jax.models import DFREC, ViTEncoder
from tests import tiny
from tests.lfw import real_faces

# Weights come from tiny.model_variables (numpy): compiling init's random initialisers would
# cost more than the tests (init itself: tests/test_train_step.py).


@pytest.fixture(scope="module")
def demo():
    model = inference.build_model(demo_config.get_config())
    return model, tiny.model_variables(model)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, images, seed=0, train=False):
    rngs = {"masking": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
    if train:
        out, _ = model.apply(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
        return out
    return model.apply(variables, images, train=False, rngs=rngs)


def check_contract(out, batch, size, patch, ratio):
    n = (size // patch) ** 2
    k = int(n * ratio)
    chex.assert_shape(out["seg"], (batch, size, size, 1))
    chex.assert_shape(out["forgery_logit"], (batch,))
    chex.assert_shape([out["source"], out["target"]], (batch, size, size, 3))
    chex.assert_shape(out["mask"], (batch, n))
    chex.assert_shape(out["mask_idx"], (batch, k))
    chex.assert_shape(out["keep_idx"], (batch, n - k))
    chex.assert_shape(out["pred_patches"], (batch, k, patch * patch * 3))
    assert out["mask"].dtype == jnp.bool_
    for key in ("seg", "source", "target", "forgery_logit"):
        assert out[key].dtype == jnp.float32, key
    return n, k


def test_demo_forward_contract_on_real_faces(demo):
    model, variables = demo
    faces = real_faces(2)
    out = _apply(model, variables, faces)
    n, k = check_contract(out, 2, 112, 8, 0.5)
    assert n == 196 and k == 98
    chex.assert_tree_all_finite(out)
    for key in ("seg", "source", "target"):
        assert 0.0 <= float(out[key].min()) and float(out[key].max()) <= 1.0, key
    np.testing.assert_array_equal(np.asarray(out["mask"]).sum(1), [k, k])


def test_target_is_visible_input_patches_plus_predictions(demo):
    model, variables = demo
    faces = real_faces(2)
    out = _apply(model, variables, faces)
    target = np.asarray(masking.patchify(out["target"], 8))
    source = np.asarray(masking.patchify(faces, 8))
    keep, drop = np.asarray(out["keep_idx"]), np.asarray(out["mask_idx"])
    for b in range(2):
        np.testing.assert_array_equal(target[b, keep[b]], source[b, keep[b]])
        np.testing.assert_allclose(
            target[b, drop[b]], np.asarray(out["pred_patches"][b]), rtol=0, atol=1e-6
        )
        # The predictions are the model's, not a copy of the input.
        assert np.abs(target[b, drop[b]] - source[b, drop[b]]).mean() > 1e-3


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny model (tests/tiny.py: every module of the demo's, narrower, 32 px): for what is
    structural (masking rule, sharding), not size-dependent."""
    model = inference.build_model(tiny.tiny_config())
    return model, tiny.model_variables(model)


def test_masking_rng_determinism_and_train_mode(tiny_model):
    model, variables = tiny_model
    size = model.image_size
    faces = real_faces(2, size)
    a, b = _apply(model, variables, faces, seed=3), _apply(model, variables, faces, seed=3)
    c = _apply(model, variables, faces, seed=4)
    chex.assert_trees_all_equal(a, b)
    _, k = check_contract(a, 2, size, 8, 0.5)
    # The mask is Algorithm 1 on the model's own map: patches whose mean is >= 0.5 are masked
    # highest first; only when fewer than K are marked do the rng's choices fill the rest.
    for out in (a, c):
        weights = np.asarray(masking.patch_weights(out["seg"], 8, "mean"))
        for w, masked in zip(weights, np.asarray(out["mask"])):
            marked = w >= 0.5
            if marked.sum() >= k:
                assert w[masked].min() >= np.sort(w)[-k]
            else:
                assert masked[marked].all()
    train_out = _apply(model, variables, faces, train=True)
    check_contract(train_out, 2, size, 8, 0.5)
    chex.assert_tree_all_finite(train_out)


def _nonzero_leaves(grads):
    flat = traverse_util.flatten_dict(jax.device_get(grads))  # numpy: no compile per leaf shape
    return {"/".join(k): bool(np.abs(v).sum() > 0) for k, v in flat.items()}


def test_gradients_reach_every_parameter(tiny_model):
    """On the tiny model (every module of the demo's, narrower): which parameters a loss
    reaches is structural, the demo's widths add only compile time. (The depthwise slice sum
    the demo runs on CPU has its gradients checked against lax's in tests/test_layers.py.)"""
    model, variables = tiny_model
    faces = real_faces(2, model.image_size)
    keys = ("seg", "forgery_logit", "source", "target")

    @jax.jit
    def grads_of(params, weights):
        """Gradient of sum_k weights[k] * mean(output k): one compile for every choice of keys."""

        def scalar(params):
            out = _apply(model, {**variables, "params": params}, faces, train=True)
            return sum(w * out[k].astype(jnp.float32).mean() for k, w in zip(keys, weights))

        return jax.grad(scalar)(params)

    def reached(*chosen):
        grads = grads_of(variables["params"], jnp.array([k in chosen for k in keys], jnp.float32))
        grads = jax.device_get(grads)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        return _nonzero_leaves(grads)

    everything = reached(*keys)
    dead = [k for k, ok in everything.items() if not ok]
    assert not dead, f"parameters with zero gradient: {dead}"
    assert {k.split("/")[0] for k in everything} == {"ism", "sirm", "tirm"}

    # The ISM map is trained through recovery: the source output alone reaches the ISM
    # decoder, and the target output alone reaches the SIRM (identity features) and TIRM.
    from_source = reached("source")
    assert any(ok for k, ok in from_source.items() if k.startswith("ism/decoder"))
    from_target = reached("target")
    assert any(ok for k, ok in from_target.items() if k.startswith("sirm/identity_head"))
    assert all(ok for k, ok in from_target.items() if k.startswith("tirm/"))


def test_sharded_apply_matches_unsharded(tiny_model):
    model, variables = tiny_model
    assert jax.device_count() == 8
    faces = np.concatenate([real_faces(4, model.image_size)] * 2)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharded = jax.device_put(faces, NamedSharding(mesh, P(("data", "fsdp"))))
    replicated = jax.device_put(variables, NamedSharding(mesh, P()))
    out_sharded = _apply(model, replicated, sharded)
    assert len(out_sharded["target"].sharding.device_set) == 8
    out_single = _apply(model, variables, jnp.asarray(faces))
    chex.assert_trees_all_close(
        jax.device_get(out_sharded), jax.device_get(out_single), atol=1e-5, rtol=1e-5
    )


def _abstract_outputs(config, batch=2):
    model = DFREC.from_config(config.model)
    size = config.model.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = inference.abstract_variables(model)
    out = jax.eval_shape(
        functools.partial(model.apply, train=False),
        variables,
        images,
        rngs={"masking": jax.random.key(0)},
    )
    return model, variables, out


@pytest.mark.parametrize(
    "name,module,encoder_range",
    [
        ("default", default_config, (85.0e6, 87.0e6)),  # ViT-B/16 ~86M
        ("official", official_config, (302.0e6, 305.0e6)),  # ViT-L/16 ~303M
    ],
)
def test_full_size_configs_shapes_and_param_counts(name, module, encoder_range):
    config = module.get_config()
    _, variables, out = _abstract_outputs(config)
    check_contract(out, 2, 224, 16, 0.5)
    counts = inference.param_counts(variables["params"])
    print(
        f"\n{name} parameter counts: " + ", ".join(f"{k}={v / 1e6:.2f}M" for k, v in counts.items())
    )
    assert 3.3e6 <= counts["ism/encoder"] <= 4.3e6  # EfficientNet-B0 backbone ~4M
    assert encoder_range[0] <= counts["tirm/encoder"] <= encoder_range[1]
    assert out["seg"].dtype == jnp.float32


def test_official_identity_feature_is_98_by_196():
    config = official_config.get_config()
    model = DFREC.from_config(config.model)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.sirm.init(jax.random.key(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: model.sirm.apply(v, x, train=False), variables, x)
    chex.assert_shape(out["target_identity"], (2, 98, 196))
    enc = variables["params"]["enc_4"]["layer_0"]["conv"]["kernel"]
    assert enc.shape == (3, 3, 256, 1024)


def test_vit_b16_and_l16_encoder_param_counts():
    def count(width, depth, heads, mlp, pos):
        vit = ViTEncoder(16, 224, width, depth, heads, mlp, pos)
        images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
        keep = jax.ShapeDtypeStruct((1, 98), jnp.int32)
        shapes = jax.eval_shape(vit.init, jax.random.key(0), images, keep)
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    b16, l16 = count(768, 12, 12, 3072, "learned"), count(1024, 24, 16, 4096, "learned")
    print(f"\nViT-B/16 encoder {b16 / 1e6:.2f}M, ViT-L/16 encoder {l16 / 1e6:.2f}M")
    assert 85.5e6 <= b16 <= 86.8e6
    assert 302.5e6 <= l16 <= 304.5e6


@pytest.mark.parametrize(
    "arg",
    [
        # ~11-17 s each at demo size; tiny models cover the options in the default suite.
        pytest.param("fusion=sequence", marks=pytest.mark.slow),
        pytest.param("variant=official", marks=pytest.mark.slow),
        pytest.param("dtype=bfloat16", marks=pytest.mark.slow),
    ],
)
def test_demo_variants_run(arg):
    config = demo_config.get_config(arg)
    model = inference.build_model(config)
    for leaf in jax.tree.leaves(inference.abstract_variables(model)["params"]):
        assert leaf.dtype == jnp.float32  # bf16 is compute only
    variables = tiny.model_variables(model)
    out = _apply(model, variables, real_faces(2))
    check_contract(out, 2, 112, 8, 0.5)
    chex.assert_tree_all_finite(out)
    assert 0.0 <= float(out["target"].min()) and float(out["target"].max()) <= 1.0


@pytest.mark.parametrize("option", ["fusion=sequence", "dtype=bfloat16"])
def test_tiny_variants_run(option):
    """The demo variants' options on the tiny model (demo-size runs are marked slow; the
    official masking variant runs on the tiny model in tests/test_wrong_step.py)."""
    config = tiny.tiny_config()
    key, value = option.split("=")
    if key == "fusion":
        config.model.tirm.fusion = value
        config.model.sirm.identity_tokens = 16
    elif key == "dtype":
        config.model.dtype = value
    else:
        config.model.masking_variant = value
        config.model.sirm.gate = value
    model = inference.build_model(config)
    variables = tiny.model_variables(model)
    for leaf in jax.tree.leaves(variables["params"]):
        assert leaf.dtype == jnp.float32  # bf16 is compute only
    size = config.model.image_size
    out = _apply(model, variables, real_faces(2, size))
    check_contract(out, 2, size, config.model.patch_size, config.model.mask_ratio)
    chex.assert_tree_all_finite(out)
    assert 0.0 <= float(out["target"].min()) and float(out["target"].max()) <= 1.0


def test_bad_inputs_and_configs_fail_clearly(demo):
    model, variables = demo
    with pytest.raises(ValueError, match="expects images"):
        _apply(model, variables, jnp.zeros((2, 96, 96, 3)))
    with pytest.raises(ValueError, match="unknown config arg"):
        demo_config.get_config("colour=blue")
    config = demo_config.get_config()
    config.model.sirm.identity_tokens = 50
    with pytest.raises(ValueError, match="one identity row per visible patch"):
        inference.init_variables(inference.build_model(config), jax.random.key(0))
    config = demo_config.get_config()
    with config.unlocked():
        config.model.tirm.depth = 3  # a key the model does not have
    with pytest.raises(ValueError, match="bad model config"):
        inference.build_model(config)
