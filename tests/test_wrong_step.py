"""Tests that a WRONG training step fails: each pins one thing a broken step gets wrong.

A gradient-ascent step, flipped classification labels and a model that ignores
`masking_variant` each passed the older suites; here they fail at least one test each
(the total, the SGD update and the loss decrease; the hand-computed BCE; the model's mask
against the masking function of its configured variant).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfrec_jax import inference, losses, masking
from dfrec_jax.batch import normalize_batch
from dfrec_jax.train import sharding
from dfrec_jax.train import state as state_lib
from dfrec_jax.train import step as step_lib
from tests import tiny
from tests.test_train_step import WEIGHTS, TinyDFREC, _batch, _config, _put
from tests.test_train_step import loss_nets  # noqa: F401  (pytest fixture)


def _keys(state):
    """The masking and dropout keys the step derives (dfrec_jax/train/step.py)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return jax.random.split(key)


def _loss_fn(model, state, batch, nets):
    masking_key, dropout_key = _keys(state)
    batch = normalize_batch(batch)

    def fn(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"masking": masking_key, "dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return losses.total_loss(out, batch, nets, WEIGHTS)[0]

    return fn


@pytest.fixture(scope="module")
def sgd_run(loss_nets):  # noqa: F811
    """One plain-SGD step of TinyDFREC on one batch, with everything needed to check it."""
    config = _config()
    mesh = sharding.make_mesh(config.mesh)
    model = TinyDFREC()
    lr = 0.05
    tx = optax.sgd(lr)
    abstract = state_lib.abstract_train_state(config, model, tx)
    shardings = state_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    state = state_lib.create_train_state(config, model, jax.random.key(3), mesh, tx)
    step = step_lib.make_train_step(model, loss_nets, WEIGHTS, tx, mesh, shardings, donate=False)
    batch = _put(_batch(11), mesh)
    loss_fn = _loss_fn(model, state, batch, loss_nets)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    new_state, metrics = step(state, batch)
    return dict(model=model, state=state, new_state=new_state, metrics=metrics, loss=loss,
                grads=grads, lr=lr, step=step, batch=batch, loss_fn=loss_fn)  # fmt: skip


def test_reported_total_is_the_loss_of_the_same_forward(sgd_run):
    np.testing.assert_allclose(float(sgd_run["metrics"]["total"]), float(sgd_run["loss"]),
                               rtol=1e-5)  # fmt: skip


def test_sgd_update_is_params_minus_lr_times_grad(sgd_run):
    want = jax.tree.map(lambda p, g: p - sgd_run["lr"] * g, sgd_run["state"].params,
                        sgd_run["grads"])  # fmt: skip
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                atol=1e-6),  # fmt: skip
        sgd_run["new_state"].params,
        want,
    )
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, sgd_run["new_state"].params,
                                         sgd_run["state"].params))  # fmt: skip
    assert float(moved) > 0


def test_batch_statistics_change_after_a_good_step(sgd_run):
    assert float(sgd_run["metrics"]["nonfinite"]) == 0.0
    before = jax.tree.leaves(sgd_run["state"].batch_stats)
    after = jax.tree.leaves(sgd_run["new_state"].batch_stats)
    assert before and any(not np.allclose(a, b) for a, b in zip(before, after))


def test_steps_on_one_batch_lower_its_loss(sgd_run):
    """The same batch, the same keys: the loss at the params after 3 steps is lower."""
    state, step, batch = sgd_run["state"], sgd_run["step"], sgd_run["batch"]
    loss_fn = jax.jit(sgd_run["loss_fn"])  # keys and batch stats of the initial state
    start = float(loss_fn(state.params))
    for _ in range(3):
        state, _ = step(state, batch)
    assert float(loss_fn(state.params)) < start - 1e-3


def test_classification_and_mask_losses_against_hand_computed_bce():
    logits = jnp.array([2.0, -1.0, 0.5])
    labels = jnp.array([1.0, 0.0, 0.0])
    # BCE(x, y) = -[y log s(x) + (1 - y) log(1 - s(x))], s = sigmoid:
    # 2.0 -> -log s(2) = 0.126928; -1.0 -> -log(1 - s(-1)) = 0.313262; 0.5 -> 0.974077.
    want = (0.126928 + 0.313262 + 0.974077) / 3
    np.testing.assert_allclose(losses.classification_loss(logits, labels), want, rtol=1e-5)
    flipped = losses.classification_loss(logits, 1.0 - labels)
    # flipped: -log(1 - s(2)) = 2.126928, -log s(-1) = 1.313262, -log s(0.5) = 0.474077
    np.testing.assert_allclose(flipped, (2.126928 + 1.313262 + 0.474077) / 3, rtol=1e-5)
    # Mask: pixel-mean BCE per sample, averaged over samples that have a mask.
    seg_logits = jnp.array([[[[2.0], [-1.0]]], [[[0.5], [0.5]]]])  # [2, 1, 2, 1]
    true = jnp.array([[[[1.0], [0.0]]], [[[0.0], [0.0]]]])
    got = losses.mask_loss(seg_logits, true, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(got, (0.126928 + 0.313262) / 2, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_dfrec_runs():
    """The real DFREC (tiny size) in both masking variants on one batch (jitted), with the
    arguments of its masking call recorded at trace time (the key the model derives is
    returned through the recorded output)."""
    images = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3))
    original = masking.semantic_guided_masking
    runs = {}
    for variant in masking.VARIANTS:
        config = tiny.tiny_config()
        config.model.masking_variant = variant
        model = inference.build_model(config)
        variables = inference.init_variables(model, jax.random.key(0))
        calls = []

        def recording(seg, rng, **kw):
            calls.append(kw)
            seen["seg"], seen["rng"] = seg, jax.random.key_data(rng)
            return original(seg, rng, **kw)

        def apply(v, x):
            out = model.apply(v, x, rngs={"masking": jax.random.key(6)})
            return out, dict(seen)

        seen = {}
        masking.semantic_guided_masking = recording
        try:
            out, got = jax.jit(apply)(variables, images)
        finally:
            masking.semantic_guided_masking = original
        assert len(calls) == 1
        runs[variant] = (config, out, (got["seg"], jax.random.wrap_key_data(got["rng"]), calls[0]))
    return runs


@pytest.mark.parametrize("variant", masking.VARIANTS)
def test_model_masks_with_its_configured_variant(tiny_dfrec_runs, variant):
    config, out, (seg, rng, kw) = tiny_dfrec_runs[variant]
    assert kw["variant"] == variant
    np.testing.assert_array_equal(seg, out["seg"])  # the masking sees the model's own map
    want = masking.semantic_guided_masking(out["seg"], rng, patch_size=config.model.patch_size,
                                           mask_ratio=config.model.mask_ratio,
                                           variant=variant)  # fmt: skip
    np.testing.assert_array_equal(out["mask_idx"], want.mask_idx)
    np.testing.assert_array_equal(out["keep_idx"], want.keep_idx)
    # ... and the other variant on the same map and key would have masked differently
    other = "official" if variant == "paper" else "paper"
    alt = masking.semantic_guided_masking(jnp.full_like(out["seg"], 0.3), rng,
                                          patch_size=config.model.patch_size,
                                          mask_ratio=config.model.mask_ratio, variant=other)  # fmt: skip
    mine = masking.semantic_guided_masking(jnp.full_like(out["seg"], 0.3), rng,
                                           patch_size=config.model.patch_size,
                                           mask_ratio=config.model.mask_ratio, variant=variant)  # fmt: skip
    assert not np.array_equal(alt.mask_idx, mine.mask_idx)


def test_bf16_compute_is_close_to_fp32_with_the_same_params():
    """bf16 has an 8-bit mantissa (relative step 2^-8 = 0.4%): after a tiny DFREC's ~40
    layers outputs in [0, 1] stay within a few hundredths of fp32; the masking is a ranking
    of map values, so it is compared only where fp32's map has no near-ties."""
    config = tiny.tiny_config()
    model32 = inference.build_model(config)
    variables = inference.init_variables(model32, jax.random.key(0))
    config.model.dtype = "bfloat16"
    model16 = inference.build_model(config)
    images = jax.random.uniform(jax.random.key(8), (2, 32, 32, 3))
    run = {}
    for name, model in (("fp32", model32), ("bf16", model16)):
        apply = jax.jit(lambda v, x, m=model: m.apply(v, x, rngs={"masking": jax.random.key(9)}))
        run[name] = apply(variables, images)
    for key, tol in (("seg", 0.03), ("source", 0.05)):
        a = np.asarray(run["fp32"][key], np.float32)
        b = np.asarray(run["bf16"][key], np.float32)
        assert np.max(np.abs(a - b)) < tol, (key, np.max(np.abs(a - b)))
    # The recovered target: compared on images whose masked patches agree (a near-tie in the
    # map may flip a patch between masked and kept under bf16 rounding).
    same = [i for i in range(2) if np.array_equal(np.sort(run["fp32"]["mask_idx"][i]),
                                                  np.sort(run["bf16"]["mask_idx"][i]))]  # fmt: skip
    assert same, "bf16 changed the masking of every image"
    a, b = (np.asarray(run[n]["target"], np.float32)[same] for n in ("fp32", "bf16"))
    assert np.max(np.abs(a - b)) < 0.05, np.max(np.abs(a - b))
    assert {k: v.shape for k, v in run["bf16"].items()} == {
        k: v.shape for k, v in run["fp32"].items()
    }
