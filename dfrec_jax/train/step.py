"""The sharded, jitted DFREC train step with a non-finite guard.

One `jax.jit` over the mesh: the state in its fsdp layout (`state.state_shardings`), the batch
split over ("data", "fsdp") on axis 0, metrics replicated. BatchNorm statistics and the loss
means are over the global batch (XLA inserts the cross-device reductions), so the numbers do
not depend on the mesh shape. Nothing here assumes a single process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from dfrec_jax import inference, losses
from dfrec_jax.batch import normalize_batch
from dfrec_jax.train import sharding as sharding_lib
from dfrec_jax.train.state import TrainState, current_learning_rate


def _select(ok: jax.Array, new, old):
    """new where ok else old, leaf by leaf (bitwise old when not ok)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _norm(tree, concatenate: bool) -> jax.Array:
    """Global L2 norm of `tree`. `concatenate`: of one vector of every leaf, one reduction
    instead of a few ops per leaf (XLA's compile time grows with the op count: the tiny test
    model's step compiles ~20% faster); only for replicated trees, since under fsdp the
    concatenation would gather every shard."""
    if concatenate:
        return jnp.linalg.norm(ravel_pytree(tree)[0])
    return optax.tree.norm(tree)


def train_step_fn(
    model,
    loss_nets: losses.LossNets,
    loss_weights: losses.LossWeights,
    tx,
    *,
    replicated_params: bool = False,
):
    """The unjitted step (state, batch) -> (state, metrics); `make_train_step` jits it.
    `replicated_params`: every parameter is whole on every device (no fsdp), so the norms are
    taken over one concatenated vector (`_norm`)."""

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        batch = normalize_batch(batch)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        masking_key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            outputs, mutated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                rngs={"masking": masking_key, "dropout": dropout_key},
                mutable=["batch_stats"],
            )
            loss, terms = losses.total_loss(
                inference.float32_outputs(outputs), batch, loss_nets, loss_weights
            )
            return loss, (terms, mutated.get("batch_stats", state.batch_stats))

        (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        grad_norm = _norm(grads, replicated_params)
        # One scalar test for every gradient: NaN/Inf anywhere makes the norm non-finite (so
        # does a norm overflowing float32, > 1.8e19, which is no usable step either). Testing
        # each leaf instead (426 reductions stacked) makes XLA's CPU compile 10x slower.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A skipped step leaves the weights, statistics and every optimizer counter as they
        # were; `step` still advances because the data stream (and the step's rng) moved on.
        streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
        total = (state.nonfinite_total + jnp.where(ok, 0, 1)).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=_select(ok, params, state.params),
            batch_stats=_select(ok, batch_stats, state.batch_stats),
            opt_state=_select(ok, opt_state, state.opt_state),
            nonfinite_streak=streak,
            nonfinite_total=total,
        )
        metrics = dict(terms)
        metrics.update(
            total=loss,
            grad_norm=grad_norm,
            param_norm=_norm(new_state.params, replicated_params),
            lr=current_learning_rate(new_state.opt_state),
            nonfinite=jnp.where(ok, 0.0, 1.0),
            nonfinite_streak=streak,
            nonfinite_total=total,
        )
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return new_state, metrics

    return step


class TrainStep(losses.BoundToFrozen):
    """The jitted step bound to the frozen loss networks' weights: `step(state, batch)`.

    The weights are an argument of the compiled program (placed replicated once), not
    constants inside it; `lower(state, batch)` and `call(compiled, state, batch)` give the
    ahead-of-time path (bench) the same signature.
    """


def replicated_frozen(nets, mesh: jax.sharding.Mesh) -> tuple[list, losses.FrozenLayout]:
    """`losses.split_frozen(nets)` with the arrays placed once, replicated over `mesh`: the
    argument a jitted step takes instead of compiling the weights in as constants."""
    arrays, layout = losses.split_frozen(nets)
    return jax.device_put(arrays, sharding_lib.replicated(mesh)), layout


def make_train_step(
    model,
    loss_nets: losses.LossNets,
    loss_weights: losses.LossWeights,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    state_sharding: TrainState,
    *,
    donate: bool = True,
) -> TrainStep:
    """jit(step) over `mesh`: state in `state_sharding`, every batch leaf split on axis 0 over
    ("data", "fsdp"), the loss networks' weights and the metrics (float32 scalars)
    replicated; the input state is donated.

    Metrics: every term of `losses.total_loss`, total, grad_norm (before clipping),
    param_norm (after the step), lr (of the last applied update), nonfinite (1.0 = this step
    was skipped), nonfinite_streak, nonfinite_total.
    """
    arrays, rebuild = replicated_frozen(loss_nets, mesh)
    whole = all(s.is_fully_replicated for s in jax.tree.leaves(state_sharding.params))

    def step(state, batch, frozen_arrays):
        nets = rebuild(frozen_arrays)
        return train_step_fn(model, nets, loss_weights, tx, replicated_params=whole)(state, batch)

    replicated = sharding_lib.replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh), replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,) if donate else (),
    )
    return TrainStep(jitted, arrays)
