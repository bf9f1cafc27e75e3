"""Tests that a WRONG training step fails: each pins one thing a broken step gets wrong.

A gradient-ascent step, flipped classification labels and a model that ignores
`masking_variant` each passed the older suites; here they fail at least one test each
(the SGD update and the loss decrease; the hand-computed BCE; the model's mask against the
masking function of its configured variant, and the two variants' masks on one input).

Nothing here hard-codes a total loss: the loss weights and formulas may change, so every
total is recomputed through `losses.total_loss` (with the weights test_train_step uses).
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
from tests.test_train_step import (
    WEIGHTS,
    TinyDFREC,
    _batch,
    _config,
    _put,
    loss_nets,  # noqa: F401  (pytest fixture)
)


# ----------------------------------------------------------------------------
# The step against an independent value_and_grad of the same loss (TinyDFREC, plain SGD).
# ----------------------------------------------------------------------------
def _keys(state):
    """The masking and dropout keys the step derives (dfrec_jax/train/step.py)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return tuple(jax.random.split(key))


@pytest.fixture(scope="module")
def sgd_run(loss_nets):  # noqa: F811
    """One plain-SGD step of TinyDFREC on one batch, with everything needed to check it.

    `loss_and_grad(params, batch_stats, masking_key, dropout_key, batch)` is the step's loss
    written out again (one jit shared by every test): ((total, new batch_stats), grads)."""
    config = _config()
    mesh = sharding.make_mesh(config.mesh)
    model = TinyDFREC()
    lr = 0.05
    tx = optax.sgd(lr)  # no momentum: the update is exactly -lr * grad
    abstract = state_lib.abstract_train_state(config, model, tx)
    shardings = state_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    state = state_lib.create_train_state(config, model, jax.random.key(3), mesh, tx)
    step = step_lib.make_train_step(model, loss_nets, WEIGHTS, tx, mesh, shardings, donate=False)
    batch = _put(_batch(11), mesh)

    def loss(params, batch_stats, masking_key, dropout_key, batch):
        batch = normalize_batch(batch)
        out, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            rngs={"masking": masking_key, "dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return losses.total_loss(out, batch, loss_nets, WEIGHTS)[0], mutated["batch_stats"]

    loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (total, batch_stats), grads = loss_and_grad(state.params, state.batch_stats, *_keys(state),
                                                batch)  # fmt: skip
    new_state, metrics = step(state, batch)
    return dict(state=state, new_state=new_state, metrics=metrics, loss=total,
                batch_stats=batch_stats, grads=grads, lr=lr, step=step, batch=batch,
                loss_and_grad=loss_and_grad)  # fmt: skip


def test_reported_total_is_the_loss_of_the_same_forward(sgd_run):
    """metrics["total"] == total_loss(model.apply(params, batch_stats, batch, the step's
    masking/dropout keys)), at step 0 and again at step 1 (the keys fold in the step)."""
    assert float(sgd_run["metrics"]["nonfinite"]) == 0.0
    np.testing.assert_allclose(float(sgd_run["metrics"]["total"]), float(sgd_run["loss"]),
                               rtol=1e-5)  # fmt: skip
    state, batch = sgd_run["new_state"], sgd_run["batch"]
    assert int(state.step) == 1
    (want, _), _ = sgd_run["loss_and_grad"](state.params, state.batch_stats, *_keys(state), batch)
    _, metrics = sgd_run["step"](state, batch)
    np.testing.assert_allclose(float(metrics["total"]), float(want), rtol=1e-5)
    # ... and the keys matter: the same params with step 0's keys give another loss.
    (other, _), _ = sgd_run["loss_and_grad"](state.params, state.batch_stats,
                                             *_keys(sgd_run["state"]), batch)  # fmt: skip
    assert abs(float(other) - float(want)) > 1e-4 * abs(float(want))


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
    # The step really moved, by lr * |grad| (a no-op or a scaled step fails here).
    np.testing.assert_allclose(float(moved), sgd_run["lr"] * float(optax.tree.norm(
        sgd_run["grads"])), rtol=1e-4)  # fmt: skip
    assert float(moved) > 0


def test_batch_statistics_change_after_a_good_step(sgd_run):
    """After a finite step the batch_stats moved, to what the same forward's BatchNorm gave."""
    assert float(sgd_run["metrics"]["nonfinite"]) == 0.0
    before = jax.tree.leaves(sgd_run["state"].batch_stats)
    after = jax.tree.leaves(sgd_run["new_state"].batch_stats)
    assert before and any(not np.allclose(a, b) for a, b in zip(before, after))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                atol=1e-7),  # fmt: skip
        sgd_run["new_state"].batch_stats,
        sgd_run["batch_stats"],
    )


def test_steps_on_one_batch_lower_its_loss(sgd_run):
    """The same batch, the same keys and batch stats: the loss at the params after 3 SGD
    steps is clearly lower than at the start (a gradient-ascent step raises it)."""
    state, step, batch = sgd_run["state"], sgd_run["step"], sgd_run["batch"]
    fixed = (state.batch_stats, *_keys(state), batch)

    def loss_at(params):
        return float(sgd_run["loss_and_grad"](params, *fixed)[0][0])

    start = loss_at(state.params)
    for _ in range(3):
        state, metrics = step(state, batch)
        assert float(metrics["nonfinite"]) == 0.0
    end = loss_at(state.params)
    assert end < start - 1e-3 * abs(start), (start, end)


# ----------------------------------------------------------------------------
# Classification and mask BCE against numbers computed by hand.
# ----------------------------------------------------------------------------
def _bce(x, y):
    """-[y log s(x) + (1 - y) log(1 - s(x))] in float64 NumPy, s = sigmoid."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    s = 1.0 / (1.0 + np.exp(-x))
    return -(y * np.log(s) + (1.0 - y) * np.log(1.0 - s))


def test_classification_and_mask_losses_against_hand_computed_bce():
    logits = jnp.array([2.0, -1.0, 0.5])
    labels = jnp.array([1.0, 0.0, 0.0])
    # By hand: 2.0 (label 1) -> -log s(2) = log(1 + e^-2) = 0.126928;
    # -1.0 (label 0) -> -log(1 - s(-1)) = log(1 + e^-1) = 0.313262;
    # 0.5 (label 0) -> -log(1 - s(0.5)) = log(1 + e^0.5) = 0.974077.
    want = (0.126928 + 0.313262 + 0.974077) / 3
    np.testing.assert_allclose(np.mean(_bce(logits, labels)), want, rtol=1e-5)  # the hand sums
    right = float(losses.classification_loss(logits, labels))
    np.testing.assert_allclose(right, want, rtol=1e-5)
    # Integer labels (as the pipeline sends them) give the same number.
    np.testing.assert_allclose(losses.classification_loss(logits, jnp.array([1, 0, 0])), want,
                               rtol=1e-5)  # fmt: skip
    # Flipped labels: log(1 + e^2) = 2.126928, log(1 + e^1) = 1.313262, log(1 + e^-0.5) =
    # 0.474077 -- a different and larger loss (these logits mostly agree with the labels).
    flipped = float(losses.classification_loss(logits, 1.0 - labels))
    np.testing.assert_allclose(flipped, (2.126928 + 1.313262 + 0.474077) / 3, rtol=1e-5)
    assert flipped > right + 0.5

    # Mask: pixel-mean BCE per sample, averaged over the samples that have a mask.
    seg_logits = jnp.array([[[[2.0], [-1.0]]], [[[0.5], [0.5]]]])  # [2, 1, 2, 1]
    true = jnp.array([[[[1.0], [0.0]]], [[[0.0], [0.0]]]])
    want = (0.126928 + 0.313262) / 2  # sample 1 has no mask
    np.testing.assert_allclose(np.mean(_bce(seg_logits[0], true[0])), want, rtol=1e-5)
    right = float(losses.mask_loss(seg_logits, true, jnp.array([1.0, 0.0])))
    np.testing.assert_allclose(right, want, rtol=1e-5)
    both = float(losses.mask_loss(seg_logits, true, jnp.array([1.0, 1.0])))
    np.testing.assert_allclose(both, (want + 0.974077) / 2, rtol=1e-5)
    flipped = float(losses.mask_loss(seg_logits, 1.0 - true, jnp.array([1.0, 0.0])))
    np.testing.assert_allclose(flipped, (2.126928 + 1.313262) / 2, rtol=1e-5)
    assert flipped > right + 0.5


# ----------------------------------------------------------------------------
# The real DFREC (tiny size): the configured masking variant, bf16 compute.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dfrec_runs():
    """The real DFREC (tiny size) in both masking variants, with ONE set of variables (the
    variant has no parameters), on one batch and one masking rng (jitted). The masking call's
    arguments are recorded at trace time; the key the model derived with make_rng("masking")
    comes back through the jitted outputs."""
    images = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3))
    original = masking.semantic_guided_masking
    runs, variables = {}, None
    for variant in masking.VARIANTS:
        config = tiny.tiny_config()
        config.model.masking_variant = variant
        config.model.dtype = "float32"
        model = inference.build_model(config)
        if variables is None:
            variables = tiny.model_variables(model)
        calls, seen = [], {}

        def recording(seg, rng, _calls=calls, _seen=seen, **kw):
            _calls.append(kw)
            _seen["seg"], _seen["rng"] = seg, jax.random.key_data(rng)
            return original(seg, rng, **kw)

        def apply(v, x, _model=model, _seen=seen):
            out = _model.apply(v, x, rngs={"masking": jax.random.key(6)})
            return out, dict(_seen)

        masking.semantic_guided_masking = recording
        try:
            out, got = jax.jit(apply)(variables, images)
        finally:
            masking.semantic_guided_masking = original
        assert len(calls) == 1
        runs[variant] = (config, out, (got["seg"], jax.random.wrap_key_data(got["rng"]), calls[0]))
    return dict(runs=runs, variables=variables, images=images)


@pytest.mark.parametrize("variant", masking.VARIANTS)
def test_model_masks_with_its_configured_variant(tiny_dfrec_runs, variant):
    """out["mask_idx"] == semantic_guided_masking(out["seg"], the model's masking key,
    patch_size, mask_ratio, variant) for the variant the config names."""
    config, out, (seg, rng, kw) = tiny_dfrec_runs["runs"][variant]
    np.testing.assert_array_equal(seg, out["seg"])  # the masking sees the model's own map
    want = masking.semantic_guided_masking(out["seg"], rng, patch_size=config.model.patch_size,
                                           mask_ratio=config.model.mask_ratio,
                                           variant=variant)  # fmt: skip
    np.testing.assert_array_equal(out["mask_idx"], want.mask_idx)
    np.testing.assert_array_equal(out["keep_idx"], want.keep_idx)
    np.testing.assert_array_equal(out["mask"], want.mask)
    assert kw["variant"] == variant
    assert (kw["patch_size"], kw["mask_ratio"]) == (config.model.patch_size,
                                                    config.model.mask_ratio)  # fmt: skip


def test_the_two_variants_mask_differently(tiny_dfrec_runs):
    """Same variables, images and masking rng: the model's seg is the same in both variants,
    its masked patches are not (a model that ignores masking_variant fails here). The masking
    function alone also differs between the variants on a constant map with one key."""
    runs = tiny_dfrec_runs["runs"]
    paper, official = runs["paper"][1], runs["official"][1]
    np.testing.assert_array_equal(paper["seg"], official["seg"])
    masked = {v: np.sort(np.asarray(runs[v][1]["mask_idx"]), axis=-1) for v in runs}
    assert not np.array_equal(masked["paper"], masked["official"]), masked
    config, _, (_, rng, _) = runs["paper"]
    flat = jnp.full_like(paper["seg"], 0.3)
    alt = {v: masking.semantic_guided_masking(flat, rng, patch_size=config.model.patch_size,
                                              mask_ratio=config.model.mask_ratio, variant=v)
           for v in masking.VARIANTS}  # fmt: skip
    assert not np.array_equal(alt["paper"].mask_idx, alt["official"].mask_idx)


def test_bf16_compute_is_close_to_fp32_with_the_same_params(tiny_dfrec_runs):
    """bf16 compute (fp32 params) against fp32 with the same variables, images and rng.

    Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per op), and
    seg/source/target are sigmoid outputs in [0, 1], so after the tiny DFREC's ~40 layers
    they should agree to well under 1e-2 (measured on this init: seg 1e-4, source 5e-5,
    target 5e-3 -- the TIRM's attention and patch head round most). Limits: 0.01 for seg and
    source, 0.03 (about 8 bf16 steps at 1.0) for target. At a random init seg and source
    are nearly constant (~0.5), so an absolute bound alone says little: the error must also
    stay under 10% of each output's own spread over pixels (measured: under 1%). bf16 must
    also really be used (outputs not bitwise fp32). The masking ranks map values, so the
    target is compared only on images whose masked patches agree (a near-tie may flip)."""
    config, fp32, _ = tiny_dfrec_runs["runs"]["paper"]
    config.model.dtype = "bfloat16"
    model16 = inference.build_model(config)
    config.model.dtype = "float32"
    bf16 = jax.jit(lambda v, x: model16.apply(v, x, rngs={"masking": jax.random.key(6)}))(
        tiny_dfrec_runs["variables"], tiny_dfrec_runs["images"]
    )
    assert {k: v.shape for k, v in bf16.items()} == {k: v.shape for k, v in fp32.items()}
    n = fp32["seg"].shape[0]
    same = [i for i in range(n) if np.array_equal(np.sort(fp32["mask_idx"][i]),
                                                  np.sort(bf16["mask_idx"][i]))]  # fmt: skip
    assert same, "bf16 changed the masking of every image"
    errors = {}
    for key, tol, rows in (("seg", 0.01, slice(None)), ("source", 0.01, slice(None)),
                           ("target", 0.03, same)):  # fmt: skip
        a = np.asarray(fp32[key], np.float32)[rows]
        b = np.asarray(bf16[key], np.float32)[rows]
        err = float(np.max(np.abs(a - b)))
        errors[key] = err
        assert err < tol, (key, err)
        assert err < 0.1 * float(np.ptp(a)), (key, err, float(np.ptp(a)))
    assert max(errors.values()) > 0, "bf16 outputs are bitwise fp32: dtype was not applied"
