"""The real train step outside `train`: built from a config alone and fed host arrays (a
synthetic batch or fixed examples), then compiled and timed. `bench --what train_step`, the
step profile, the memory table, the learning check and the PyTorch peer all run this, so what
they measure is the step `train` runs. No TensorFlow.
"""

import functools
import time

import jax
import numpy as np

from dfrec_jax import inference, timing
from dfrec_jax import loss_nets as loss_nets_lib
from dfrec_jax.train import sharding as sharding_lib
from dfrec_jax.train import state as state_lib
from dfrec_jax.train import step as step_lib


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic uint8 training batch shaped like the input pipeline's (OUTPUT_KEYS):
    random source/target faces, an elliptical face mask, image = target pasted into source
    under the mask for forgeries (label 1, alpha 1) and, for real faces (label 0, alpha 0),
    image = source = target with mask 255 everywhere (a real face is its own source, the
    datasets' convention); has_mask 1 for all."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, image_size, image_size)
    source = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    target = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:image_size, :image_size] / image_size
    centre = rng.uniform(0.45, 0.55, (batch_size, 2, 1, 1))
    radius = rng.uniform(0.25, 0.35, (batch_size, 2, 1, 1))
    inside = ((yy - centre[:, 0]) / radius[:, 0]) ** 2 + ((xx - centre[:, 1]) / radius[:, 1]) ** 2
    label = (np.arange(batch_size) % 2).astype(np.float32)  # half forgeries
    real = label[:, None, None] == 0
    target = np.where(real[..., None], source, target)
    mask = (inside <= 1.0) | real
    image = np.where(mask[..., None], target, source)
    return {
        "image": image,
        "source": source,
        "target": target,
        "mask": (mask[..., None] * 255).astype(np.uint8),
        "label": label,
        "has_mask": np.ones_like(label),
        "method_id": np.zeros(batch_size, np.int32),
        "alpha": label.copy(),
    }


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Each process puts its own rows, as the input pipeline does (multi-host ready)."""
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        rows = len(value) // count
        local = value[index * rows : (index + 1) * rows]
        out[key] = jax.make_array_from_process_local_data(sharding, local, value.shape)
    return out


def build_train_step(
    config, mesh, *, loss_nets=None, total_steps: int | None = None, initialise: bool = True
):
    """The real sharded train step of `config` on `mesh` and its fresh state, as `train` builds
    them: (model, loss nets, optimizer, state, jitted step). `loss_nets`: None = the real frozen
    networks of config.loss; `total_steps`: the schedule's length (None = config.train.steps);
    `initialise=False`: the state as abstract leaves carrying their shardings, enough to lower
    or compile the step (init's own compile is skipped: seconds to a minute on CPU)."""
    model = inference.build_model(config)
    nets = loss_nets if loss_nets is not None else loss_nets_lib.build_loss_nets(config.loss)
    weights = loss_nets_lib.loss_weights(config.loss)
    steps = int(config.train.steps if total_steps is None else total_steps)
    tx = state_lib.make_optimizer(config.optim, steps, mesh)
    abstract = state_lib.abstract_train_state(config, model, tx)
    shardings = state_lib.state_shardings(abstract, mesh, int(config.mesh.fsdp_min_size))
    if initialise:
        state = state_lib.create_train_state(
            config, model, jax.random.key(config.seed), mesh, tx, shardings
        )
    else:
        state = sharding_lib.placed(abstract, shardings)
    train_step = step_lib.make_train_step(model, nets, weights, tx, mesh, shardings)
    return model, nets, tx, state, train_step


def measure_step(train_step, state, batch, *, repeats: int, warmup: int):
    """Compiles jit `train_step(state, batch) -> (state, metrics)` (the state may be donated;
    a `step.TrainStep` brings its frozen networks' weights) and times it: returns the new
    state and compile_s, flops_per_device, times (s), loss."""
    compiled, compile_s, flops = compile_step(train_step, state, batch)
    state, times, metrics = time_steps(compiled, state, batch, repeats=repeats, warmup=warmup)
    measured = {
        "compile_s": compile_s,
        "flops_per_device": flops,
        "times": times,
        "loss": float(metrics["total"]),
    }
    return state, measured


def compile_step(train_step, state, batch):
    """(callable(state, batch), compile seconds, XLA FLOPs per device) of a jitted step."""
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = timing.flops_of(compiled)
    if isinstance(train_step, step_lib.TrainStep):
        compiled = functools.partial(train_step.call, compiled)
    return compiled, compile_s, flops


def time_steps(compiled, state, batch, *, repeats: int, warmup: int = 0):
    """`warmup` untimed then `repeats` timed steps, each synced: (state, seconds, metrics)."""
    metrics = None
    for _ in range(warmup):
        state, metrics = jax.block_until_ready(compiled(state, batch))
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    return state, times, metrics
