"""The training loop: `python -m dfrec_jax train --config C --workdir W` (resumable).

One call of `train` runs (or continues) a run in `workdir`:
- workdir/config.json, versions.json: the resolved config and library versions;
- workdir/checkpoints/<step>/: orbax checkpoints (train state + input-pipeline position),
  every `train.checkpoint_every` steps, at each evaluation (with the validation metrics, so
  the best one is kept), on SIGTERM/SIGINT and at the end;
- workdir/tensorboard/: scalars every `train.log_every` steps (each loss term, lr, grad norm,
  img/s, step time) and image grids every `train.image_every` steps (also written to
  workdir/panels/step_N.png: input | recovered mask | true/recovered source | true/recovered
  target | true mask).
Re-running the same command continues from the newest checkpoint and reproduces the batches
and the parameters of an uninterrupted run exactly (same config, same device count).

The loop keeps one step in flight: step k+1 is dispatched before the host reads anything of
step k, and the only per-step read is step k's non-finite streak (a scalar that is ready by
then), so the host never stalls the device.
"""

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import datasets, input_pipeline
from dfrec_jax import images, inference, losses, paths
from dfrec_jax import loss_nets as loss_nets_lib
from dfrec_jax.batch import normalize_batch
from dfrec_jax.run import checkpoints, multihost
from dfrec_jax.run import progress as progress_lib
from dfrec_jax.run import workdir as workdir_lib
from dfrec_jax.train import init_from, metric_writer, preemption, sharding
from dfrec_jax.train import state as state_lib
from dfrec_jax.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the newest checkpoint holds the last good state."""


@dataclasses.dataclass
class TrainResult:
    step: int  # steps done when the run ended
    stopped: str  # "finished" | "preempted (SIGTERM)" | ...
    metrics: dict[str, float]  # the last logged training metrics
    checkpoint_step: int | None
    state: Any  # the final TrainState (on the devices)


def _data_pipelines(config, mesh):
    """Training and validation input pipelines."""
    data = config.data
    processes, index = jax.process_count(), jax.process_index()
    builder = datasets.prepare_in_every_process(data)  # one host builds a missing dataset
    local_batch = data.batch_size // processes
    batch_sharding = sharding.batch_sharding(mesh)
    # Splits, not their examples: each process reads only its own part of them.
    train_examples = input_pipeline.Split(builder, "train")

    def train_fn(start_batch):
        return input_pipeline.training_dataset(
            train_examples,
            data,
            batch_size=local_batch,
            start_batch=start_batch,
            process_index=index,
            process_count=processes,
        )

    train = input_pipeline.InputPipeline(train_fn, batch_sharding, data.batch_size)
    validation = []
    if "validation" in builder.info.splits:
        full_batches = builder.info.splits["validation"].num_examples // data.batch_size
        count = min(config.train.eval_batches, full_batches)
        examples = input_pipeline.Split(builder, "validation")
        evaluation = input_pipeline.InputPipeline(
            lambda start: input_pipeline.make_dataset(
                examples,
                batch_size=local_batch,
                seed=data.seed,
                training=False,
                process_index=index,
                process_count=processes,
                start_batch=start,
            ),
            batch_sharding,
            data.batch_size,
        )
        # Only full batches: the validation loss then needs no padding mask.
        validation = [next(evaluation) for _ in range(count)]
    if not validation:
        log.warning("no full validation batch: no validation loss, no best checkpoint")
    return train, validation


def _make_eval_step(model, nets, weights, mesh, seed):
    """jit (params, batch_stats, batch) -> loss metrics of the model's outputs as eval and
    recover see them (`inference.apply_per_image`: each image alone, masking key `seed`), the
    frozen networks' weights an argument (replicated), as in the train step."""
    arrays, rebuild = step_lib.replicated_frozen(nets, mesh)

    @jax.jit
    def eval_step_with(params, batch_stats, batch, frozen_arrays):
        nets = rebuild(frozen_arrays)
        batch = normalize_batch(batch)
        variables = {"params": params, "batch_stats": batch_stats}
        outputs = inference.apply_per_image(model, variables, batch["image"], seed, keys=None)
        total, metrics = losses.total_loss(outputs, batch, nets, weights)
        return dict(metrics, total=total)

    def eval_step(params, batch_stats, batch):
        return eval_step_with(params, batch_stats, batch, arrays)

    return eval_step


def _validate(eval_step, state, batches) -> dict[str, float]:
    sums: dict[str, Any] = {}
    for batch in batches:
        metrics = eval_step(state.params, state.batch_stats, batch)
        sums = metrics if not sums else jax.tree.map(jnp.add, sums, metrics)
    return {f"val/{k}": float(v) / len(batches) for k, v in jax.device_get(sums).items()}


def _image_grid(predict, state, batch, rows=4) -> np.ndarray:
    # This process's first shard only: works on every host without gathering the batch.
    keys = ("image", "source", "target", "mask")
    small = {k: np.asarray(batch[k].addressable_shards[0].data)[:rows] for k in keys}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    outputs = predict(variables, small["image"])
    return metric_writer.image_grid(small, jax.device_get(outputs), max_rows=rows)


def _has_checkpoint(ckpt_dir: str) -> bool:
    """Cheap early look (orbax step folders are named by the step); the Checkpointer decides."""
    return any(name.isdigit() for name in paths.listdir(ckpt_dir))


def _optimizer(config, model, mesh, total_steps: int, ckpt):
    """(config, tx, abstract train state, saved): the optimizer a run resumes with.

    A run resumes with the optimizer layout its checkpoint holds: when only the other
    `optim.flatten` setting matches it (a run from before flatten became the default, or one
    started with the other setting), that setting is taken, with a warning, and recorded in
    the run's config.json. A flat checkpoint resumed where fsdp splits the parameters (the
    optimizer is per leaf there, `state.make_optimizer`) is restored flat and cut into the
    per-leaf state (`saved`: the checkpoint's abstract state; None when no conversion)."""
    tx = state_lib.make_optimizer(config.optim, total_steps, mesh)
    abstract = state_lib.abstract_train_state(config, model, tx)
    if ckpt.layout_matches(abstract) is not False:
        return config, tx, abstract, None
    if mesh.shape.get("fsdp", 1) > 1:  # per leaf whatever optim.flatten says: only flat differs
        return _from_flat(config, model, mesh, total_steps, ckpt, tx, abstract)
    other = config.copy_and_resolve_references()
    other.optim.flatten = not config.optim.get("flatten", False)
    other_tx = state_lib.make_optimizer(other.optim, total_steps, mesh)
    other_abstract = state_lib.abstract_train_state(other, model, other_tx)
    if ckpt.layout_matches(other_abstract):
        log.warning(
            "resuming with optim.flatten=%s, the optimizer layout of the checkpoints in %s",
            other.optim.flatten,
            ckpt.directory,
        )
        return other, other_tx, other_abstract, None
    return config, tx, abstract, None  # the restore names the mismatch


def _from_flat(config, model, mesh, total_steps: int, ckpt, tx, abstract):
    """_optimizer's result under fsdp: the checkpoint's flat abstract state as `saved` when
    it holds optax.flatten's layout (a run saved at fsdp 1)."""
    flat = config.copy_and_resolve_references()
    flat.optim.flatten = True
    # mesh None: the flat layout a replicated (fsdp 1) run saved.
    flat_abstract = state_lib.abstract_train_state(
        flat, model, state_lib.make_optimizer(flat.optim, total_steps, None)
    )
    if ckpt.layout_matches(flat_abstract):
        log.warning(
            "the checkpoints in %s hold a flat optimizer state (fsdp 1); this mesh splits the "
            "parameters (fsdp %d): the state is cut into per-leaf moments",
            ckpt.directory,
            mesh.shape["fsdp"],
        )
        return config, tx, abstract, flat_abstract
    return config, tx, abstract, None  # the restore names the mismatch


def _initial_state(
    config, workdir, model, tx, mesh, abstract, shardings, ckpt, saved_abstract=None
):
    """(state, data_state): the newest checkpoint's (data_state: the input pipeline's position),
    or a fresh state with the pretrained sources of `config.init` merged in (data_state None).
    The sources are applied only here, at step 0: a resumed run's checkpoint always wins.
    saved_abstract: the checkpoint's own abstract state when its flat optimizer state is to be
    cut into `abstract`'s per-leaf one (`_optimizer`)."""
    if ckpt.latest_step() is not None:
        if saved_abstract is None:
            state, data_state = ckpt.restore(sharding.placed(abstract, shardings))
        else:
            saved_shardings = state_lib.state_shardings(
                saved_abstract, mesh, config.mesh.fsdp_min_size
            )
            saved, data_state = ckpt.restore(sharding.placed(saved_abstract, saved_shardings))
            by_leaf = jax.jit(
                lambda opt, params: state_lib.opt_state_by_leaf(opt, abstract.opt_state, params),
                out_shardings=shardings.opt_state,
            )
            # The rest of the state is restored with the shardings it keeps.
            state = saved.replace(opt_state=by_leaf(saved.opt_state, saved.params))
        # Restored from an older step past damaged newer ones: set those aside so this run
        # can save its steps again (a damaged step would block every save up to it).
        ckpt.set_aside_newer(ckpt.restored_step)
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
        if init_from.enabled(config.get("init")):
            log.info("config.init ignored: the run resumes from its checkpoint")
        return state, data_state
    key = jax.random.PRNGKey(config.seed)
    state = state_lib.create_train_state(config, model, key, mesh, tx, shardings)
    state, applied = init_from.apply(config, state, mesh)
    init_from.record(workdir, applied)
    return state, None


def train(
    config,
    workdir: str,
    *,
    loss_nets: losses.LossNets | None = None,
    batch_hook: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Runs or resumes training in `workdir` until `config.train.steps`.

    `loss_nets`: the frozen loss networks; None builds the real ones from `config.loss`
    (tests pass tiny ones). `batch_hook(step, batch)`: called with each step's global batch
    (reading it syncs the host; for audits and tests). Raises NonFiniteError after
    `train.max_nonfinite` non-finite steps in a row (the updates were skipped, the newest
    checkpoint is intact).
    """
    multihost.initialize(config.mesh.distributed)  # before any other JAX use
    workdir = paths.resolve(workdir)  # gs://... stays a URL: every host writes one folder
    cfg_train = config.train
    total_steps = cfg_train.steps
    ckpt_dir = paths.join(workdir, "checkpoints")
    if not _has_checkpoint(ckpt_dir):  # a fresh run: a bad init source fails before the data
        init_from.validate(config.get("init"))
    if jax.process_index() == 0:
        paths.makedirs(paths.join(workdir, "panels"))
    mesh = sharding.make_mesh(config.mesh)
    pipeline, validation = _data_pipelines(config, mesh)

    model = inference.build_model(config)
    nets = loss_nets if loss_nets is not None else loss_nets_lib.build_loss_nets(config.loss)
    weights = loss_nets_lib.loss_weights(config.loss)
    ckpt = checkpoints.Checkpointer(
        ckpt_dir,
        save_every=cfg_train.checkpoint_every,
        keep=cfg_train.keep_checkpoints,
        best_metric=cfg_train.best_metric if validation else None,
    )
    config, tx, abstract, saved_abstract = _optimizer(config, model, mesh, total_steps, ckpt)
    shardings = state_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    state, data_state = _initial_state(
        config, workdir, model, tx, mesh, abstract, shardings, ckpt, saved_abstract
    )
    # Only now, with the model built and its state created or restored, is the config on record.
    workdir_lib.save_run_metadata(workdir, config, resumed=data_state is not None)
    if data_state is not None:
        pipeline.restore(data_state)
    start = int(state.step)
    train_step = step_lib.make_train_step(model, nets, weights, tx, mesh, shardings)
    eval_step = _make_eval_step(model, nets, weights, mesh, int(config.seed))
    predict = inference.make_predict(model, int(config.seed))
    writer = metric_writer.MetricWriter(workdir)
    progress = progress_lib.Progress(total_steps, start, every=cfg_train.log_every)
    batch_size = config.data.batch_size

    # The step restored from (None for a fresh run): a newer, damaged step does not count.
    step, stopped, logged, saved_step = start, "finished", {}, ckpt.restored_step
    previous, streak_at = None, 0
    window_start, window_steps = time.perf_counter(), 0
    with preemption.PreemptionGuard() as guard:
        while step < total_steps:
            batch = next(pipeline)
            state, metrics = train_step(state, batch)
            step += 1
            if batch_hook is not None:
                batch_hook(step, batch)
            window_steps += 1
            if previous is not None:  # the previous step is done by now: no stall
                streak_at = int(previous["nonfinite_streak"])
                if streak_at >= cfg_train.max_nonfinite:
                    stopped = "non-finite"
                    break
            previous = metrics

            if step % cfg_train.log_every == 0 or step == total_steps:
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                logged["step_time_s"] = elapsed / window_steps
                logged["images_per_s"] = batch_size * window_steps / elapsed
                writer.scalars(step, logged)
                shown = {
                    k: v for k, v in logged.items() if k not in ("step_time_s", "images_per_s")
                }
                progress.update(step, shown, images_per_step=batch_size)
                window_start, window_steps = time.perf_counter(), 0
            if cfg_train.image_every and step % cfg_train.image_every == 0:
                grid = _image_grid(predict, state, batch)
                writer.images(step, {"panels": grid})
                if jax.process_index() == 0:  # also as PNG, for readers without TensorBoard
                    panel = paths.join(workdir, "panels", f"step_{step:07d}.png")
                    paths.write_atomic(panel, images.png_bytes(grid))
            val_metrics = None
            if validation and cfg_train.eval_every and step % cfg_train.eval_every == 0:
                val_metrics = _validate(eval_step, state, validation)
                writer.scalars(step, val_metrics)
            if val_metrics is not None or ckpt.should_save(step):
                if ckpt.save(step, state, pipeline.state(), metrics=val_metrics, force=True):
                    saved_step = step
            if guard.should_stop(step):
                stopped = f"preempted ({guard.signal_name})"
                break
        if stopped == "finished" and previous is not None:
            streak_at = int(previous["nonfinite_streak"])
            if streak_at >= cfg_train.max_nonfinite:
                stopped = "non-finite"
        if stopped != "non-finite" and saved_step != step:
            if ckpt.save(step, state, pipeline.state(), force=True):
                saved_step = step
    ckpt.wait()
    ckpt.close()
    writer.close()
    if stopped == "non-finite":
        raise NonFiniteError(
            f"{streak_at} non-finite training steps in a row (up to step {step}); updates were "
            f"skipped and training stopped. The newest checkpoint "
            f"(step {ckpt.latest_step()} in {ckpt_dir}) holds the last good state: lower "
            "the learning rate or enable optim.clip_norm and re-run to resume."
        )
    log.info("training %s at step %d", stopped, step)
    return TrainResult(step, stopped, logged, saved_step, state)
