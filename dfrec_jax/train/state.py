"""Train state, the optax AdamW optimizer (schedule, clipping, accumulation) and sharded init.

The state is created directly in its sharded layout (one jit with `out_shardings`), so a model
larger than one device's memory never exists whole on one device. Loss networks are not part
of the state: they are frozen constants closed over by the step.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfrec_jax.train import sharding as sharding_lib


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: train steps taken (skipped non-finite steps included)
    params: Any  # float32
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # uint32 raw key data (jax.random.key_data), so checkpoints can hold it
    nonfinite_streak: jax.Array  # int32: consecutive non-finite (skipped) steps
    nonfinite_total: jax.Array  # int32: all skipped steps


def _accumulate(optim_config) -> int:
    k = int(optim_config.accumulate_steps)
    if k < 1:
        raise ValueError(f"optim.accumulate_steps must be >= 1, got {k}")
    return k


def _schedule(optim_config, total_steps: int) -> optax.Schedule:
    """lr as a function of the optimizer's own update count (train steps // accumulate_steps).

    warmup_steps and total_steps are in train steps; with accumulation they are divided by
    accumulate_steps, so the schedule spans the same part of training either way.
    """
    k = _accumulate(optim_config)
    lr = float(optim_config.learning_rate)
    warmup = int(optim_config.warmup_steps) // k
    updates = max(int(total_steps) // k, 1)
    name = optim_config.schedule
    if name == "constant":
        if warmup > 0:
            return optax.linear_schedule(0.0, lr, warmup)  # holds lr after the warmup
        return optax.constant_schedule(lr)
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(updates, warmup + 1),  # optax counts the warmup in decay_steps
            end_value=float(optim_config.end_factor) * lr,
        )
    raise ValueError(f"unknown optim.schedule {name!r} (constant|cosine)")


def learning_rate_fn(optim_config, total_steps: int) -> Callable[[Any], Any]:
    """train step -> lr of the update that step contributes to (for logging and tests)."""
    schedule = _schedule(optim_config, total_steps)
    k = _accumulate(optim_config)
    return lambda step: schedule(step // k)


def make_optimizer(
    optim_config, total_steps: int, mesh: jax.sharding.Mesh | None
) -> optax.GradientTransformation:
    """AdamW over a constant (+ linear warmup) or warmup-cosine schedule; optional global-norm
    clipping first; optax.MultiSteps when accumulate_steps > 1.

    The lr is an injected hyperparameter, so the opt state holds the lr of the last applied
    update (`current_learning_rate`). Weight decay applies to every parameter (AdamW default).
    `optim.flatten` runs AdamW on one concatenated vector where the parameters are replicated
    (`mesh`, the mesh the state lives on, has an "fsdp" axis of size 1; None: no mesh, e.g. a
    bare optimizer test); under fsdp it stays leaf by leaf, since the concatenation would
    gather every shard. A required argument so that no caller gets the flat layout under fsdp
    by forgetting it.
    """
    schedule = _schedule(optim_config, total_steps)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "weight_decay"))(
        learning_rate=schedule,
        b1=float(optim_config.b1),
        b2=float(optim_config.b2),
        weight_decay=float(optim_config.weight_decay),
    )
    sharded = mesh is not None and mesh.shape.get("fsdp", 1) > 1
    if optim_config.get("flatten", False) and not sharded:
        # One concatenated vector instead of ~430 leaves: the update compiles to a few fused
        # ops, not ~50 per leaf (XLA's compile time grows with the op count; the same
        # elementwise AdamW).
        adamw = optax.flatten(adamw)
    clip = float(optim_config.clip_norm)
    if clip < 0:
        raise ValueError(f"optim.clip_norm must be >= 0 (0 = off), got {clip}")
    tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    k = _accumulate(optim_config)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx


def opt_state_by_leaf(flat_opt_state, abstract_opt_state, params):
    """`optax.flatten(tx)`'s state as `tx`'s own, leaf by leaf (`abstract_opt_state`: the
    per-leaf state's structure, shapes and dtypes).

    Matched by key path: a flat leaf where the per-leaf state holds a parameter-shaped subtree
    (AdamW's mu and nu) is cut back into that subtree's leaves (optax.flatten's order:
    jax.tree.leaves of the parameters, each raveled; each part cast to its leaf's dtype, as
    the concatenation promoted them); a leaf with the same path on both sides (counts,
    injected hyperparameters, MultiSteps' accumulators) carries over. The same values: a flat
    run resumed where fsdp splits its parameters (make_optimizer keeps the optimizer per leaf
    there) continues with its moments."""
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    offsets = np.cumsum(sizes)[:-1]
    want = jax.tree.leaves_with_path(abstract_opt_state)
    out, i = [], 0
    for path, x in jax.tree.leaves_with_path(flat_opt_state):
        if i < len(want) and want[i][0] == path:
            out.append(x)
            i += 1
            continue
        group = want[i : i + len(sizes)]
        inside = all(len(p) > len(path) and p[: len(path)] == path for p, _ in group)
        if len(group) != len(sizes) or not inside or x.shape != (sum(sizes),):
            raise ValueError(
                f"the flat optimizer state does not cut into the per-leaf one at "
                f"{jax.tree_util.keystr(path)} (shape {x.shape})"
            )
        parts = jnp.split(x, offsets)
        out += [part.reshape(w.shape).astype(w.dtype) for part, (_, w) in zip(parts, group)]
        i += len(sizes)
    if i != len(want):
        raise ValueError(f"the flat optimizer state lacks {jax.tree_util.keystr(want[i][0])}")
    return jax.tree.structure(abstract_opt_state).unflatten(out)


def current_learning_rate(opt_state) -> jax.Array:
    """The lr of the last applied update, read from the injected hyperparameters (NaN when the
    optimizer does not inject one)."""

    def is_injected(x):
        return isinstance(x, optax.InjectStatefulHyperparamsState)

    for node in jax.tree.leaves(opt_state, is_leaf=is_injected):
        if is_injected(node) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    return jnp.array(jnp.nan, jnp.float32)


def _raw_key(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def _init_fn(model, tx) -> Callable[[jax.Array], TrainState]:
    """raw key -> TrainState. The variables are `inference.init_variables(model, k)`'s for
    k = split(key)[0] (same key splits); the state's own rng is split(key)[1]."""
    shape = (1, model.image_size, model.image_size, 3)

    def init(raw_key):
        key = jax.random.wrap_key_data(raw_key)
        init_key, state_key = jax.random.split(key)
        params_rng, masking_rng, dropout_rng = jax.random.split(init_key, 3)
        variables = model.init(
            {"params": params_rng, "masking": masking_rng, "dropout": dropout_rng},
            jnp.zeros(shape, jnp.float32),
            train=False,
        )
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=jax.random.key_data(state_key),
            nonfinite_streak=jnp.zeros((), jnp.int32),
            nonfinite_total=jnp.zeros((), jnp.int32),
        )

    return init


def abstract_train_state(config, model, tx) -> TrainState:
    """Shapes/dtypes of the state (jax.ShapeDtypeStruct leaves); nothing is computed."""
    del config  # the state's structure depends on the model and optimizer only
    raw = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return jax.eval_shape(_init_fn(model, tx), raw)


def state_shardings(abstract_state: TrainState, mesh, min_size: int) -> TrainState:
    """params and opt_state by the fsdp shape rule; step, batch stats, rng, counters replicated."""
    rep = sharding_lib.replicated(mesh)
    return TrainState(
        step=rep,
        params=sharding_lib.tree_shardings(abstract_state.params, mesh, min_size),
        batch_stats=jax.tree.map(lambda _: rep, abstract_state.batch_stats),
        opt_state=sharding_lib.tree_shardings(abstract_state.opt_state, mesh, min_size),
        rng=rep,
        nonfinite_streak=rep,
        nonfinite_total=rep,
    )


def create_train_state(
    config, model, rng: jax.Array, mesh, tx, shardings: TrainState | None = None
) -> TrainState:
    """The initial state, computed by one jit whose outputs are already sharded over `mesh`.

    rng: a key (typed or raw uint32 data). Params equal `inference.init_variables(model,
    split(rng)[0])`'s; the state's own rng is split(rng)[1]. shardings: the state's
    (`state_shardings` of `abstract_train_state`) where the caller has them already, which
    spares tracing the model once more (seconds for the real configs).
    """
    init = _init_fn(model, tx)
    if shardings is None:
        abstract = abstract_train_state(config, model, tx)
        shardings = state_shardings(abstract, mesh, int(config.mesh.fsdp_min_size))
    # The key enters as a host constant: no input array to place, so this is the same call on
    # every process of a multi-host run.
    raw = np.asarray(jax.device_get(_raw_key(rng)))
    # Init runs once; on CPU, XLA's backend optimisation costs most of its compile time and
    # buys nothing for it (as in inference.init_variables).
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    jitted = jax.jit(lambda: init(raw), out_shardings=shardings)
    return jitted.lower().compile(compiler_options=options)()


__all__ = [
    "TrainState",
    "abstract_train_state",
    "create_train_state",
    "current_learning_rate",
    "learning_rate_fn",
    "make_optimizer",
    "opt_state_by_leaf",
    "state_shardings",
]
