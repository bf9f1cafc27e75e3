"""Training checkpoints: an orbax CheckpointManager with the layout and policies the trainer uses.

Each step directory `<directory>/<step>/` holds three items:
- `state`: the train state (any pytree of jax.Arrays), written by orbax's PyTreeCheckpointHandler
  (what its StandardCheckpointHandler wraps, same files; tensorstore, one chunk per shard, so
  restoring onto another mesh reads only what it needs), with arrays under 1 MiB per replica
  slice written whole by one replica (`_array_handlers`);
- `data`: the input pipeline's position (small JSON dict), so a resumed run sees the same batches;
- `meta`: JSON with at least {"step": step}, plus anything the caller adds (config hash, ...).
Orbax adds `metrics` (JSON) to the checkpoints saved with a validation metric.

Saves are asynchronous: `save` returns once the arrays are copied to host memory (on CPU, an
array written whole is read in place: until its write ends, XLA declines to donate it to the next
step, which then allocates its own output; the checkpoint never sees the step), and a background
thread writes them under a temporary name that is renamed when complete, so a process killed
mid-save leaves the previous checkpoints intact and the partial one invisible (a Checkpointer
opening the directory removes it in a background thread, finished before its first save).

Retention: the newest `keep` checkpoints plus the best one by `best_metric`. Checkpoints saved
without that metric (periodic saves between evaluations) are kept only while among the newest.

Damage: restoring the newest checkpoint (step None) that turns out unreadable (a truncated
data file, a missing metadata file, ...) falls back to the next older one, with one
`warning:` line on stderr naming the damaged step and why; `restored_step` says which step was
read. A shape mismatch with the target is a config problem, not damage: it is raised at once
(CheckpointMismatchError). No intact checkpoint, or a damaged step asked for by number, is one
CheckpointDamagedError line. A failed restore never deletes or changes anything on disk.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

# Orbax's default ArrayHandler keeps this store (per-array metadata files); ours must too.
from orbax.checkpoint._src.metadata import array_metadata_store  # orbax pinned (requirements)

from dfrec_jax import paths

log = logging.getLogger(__name__)


class _DropExpectedOrbaxWarnings(logging.Filter):
    # Orbax warns on every save without metrics once best-tracking is on (most saves here,
    # periodic and preemption, legitimately have none) and twice on every read-only open (each
    # inference command) that it is read only: expected, so only noise on the console.
    NOISE = ("did not provide metrics", "Given directory is read only",
             "read_only=True, setting save_interval_steps=0")  # fmt: skip

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


# Replica-parallel saving (orbax's default off GPU) splits every replicated array into one
# slice per replica, each cut by an eager `lax.slice`: one XLA compile per array shape and
# slice, ~570 compiles (13 s on 2 CPU cores) on the first save of the tiny test model over 8
# devices, and many tiny writes. Below 1 MiB per slice one replica writes the array whole.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _array_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's default type handlers, the jax.Array one with the replica-parallel threshold."""
    array = ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
    )
    others = [(t, ocp.type_handlers.get_type_handler(t))
              for t in ocp.type_handlers.supported_types() if t is not jax.Array]  # fmt: skip
    return ocp.type_handlers.create_type_handler_registry((jax.Array, array), *others)


_absl_logger = logging.getLogger("absl")
if not any(isinstance(f, _DropExpectedOrbaxWarnings) for f in _absl_logger.filters):
    _absl_logger.addFilter(_DropExpectedOrbaxWarnings())


class _DropOrphanedRestoreErrors(logging.Filter):
    # When one array of a damaged checkpoint fails to read, orbax's sibling read tasks fail too
    # and asyncio logs each unretrieved one with a traceback when it is collected; the restore
    # already reported the damage in one line (see _restore_with_fallback).
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("exception was never retrieved" in message and "orbax" in message)


_asyncio_logger = logging.getLogger("asyncio")
if not any(isinstance(f, _DropOrphanedRestoreErrors) for f in _asyncio_logger.filters):
    _asyncio_logger.addFilter(_DropOrphanedRestoreErrors())


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the state to restore (a different model config)."""


class CheckpointDamagedError(ValueError):
    """No readable checkpoint where one was asked for: one line naming the steps and why."""


def _orphaned_read_callback(exc: BaseException | None) -> bool:
    """True for the error tensorstore's reader threads hit when a damaged checkpoint's other
    array reads finish after orbax closed its event loop (each would print a traceback; the
    restore reports the damage itself, in one line)."""
    return (
        isinstance(exc, RuntimeError)
        and str(exc) == "Event loop is closed"
        and threading.current_thread() is not threading.main_thread()
    )


def _install_quiet_hooks() -> None:
    if getattr(sys.excepthook, "_dfrec_quiet", False):
        return
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(kind, value, tb):
        if not _orphaned_read_callback(value):
            excepthook(kind, value, tb)

    def quiet_unraisablehook(info):
        if not _orphaned_read_callback(info.exc_value):
            unraisablehook(info)

    quiet_excepthook._dfrec_quiet = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())  # orbax / tensorstore messages span lines
    return f"{type(error).__name__}: {text[:300]}"


def _to_json(value: Any) -> Any:
    """Plain JSON types from dicts/lists of Python, numpy or jax scalars."""
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        return _to_json(np.asarray(value).tolist())
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a JSON checkpoint item: {value!r}")


class Checkpointer:
    """Periodic, retained, resumable checkpoints of a train state and the data iterator state."""

    def __init__(
        self,
        directory: str,
        *,
        save_every: int,
        keep: int,
        best_metric: str | None = None,
        best_mode: str = "min",
        read_only: bool = False,
    ):
        """`directory` is created unless `read_only` (then it must exist).

        `save_every`: `should_save(step)` is true when `step % save_every == 0`.
        `keep`: number of newest checkpoints kept; the best one by `best_metric` is kept too.
        `best_mode`: "min" (losses) or "max" (accuracies).
        """
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = paths.resolve(directory)  # a gs://... URL stays one
        if read_only and not paths.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self.save_every = save_every
        self.keep = keep
        self.restored_step: int | None = None  # the step the last restore actually read
        self.best_metric = best_metric
        self.best_mode = best_mode

        policies: list = [ocm.LatestN(keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = self._metric_value
            # BestN keeps the last n of the checkpoints sorted ascending by best_fn (descending
            # when reverse): reverse for "min" so the smallest value comes last.
            policies.append(
                ocm.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # Explicit decision policy: orbax's default one also saves the first step of a fresh
            # run (InitialSavePolicy), which is not a multiple of save_every.
            save_decision_policy=ocm.AnySavePolicy(
                [ocm.FixedIntervalPolicy(save_every), ocm.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            # best_fn/best_mode also make orbax write the metrics with each checkpoint (so the
            # best survives re-opening the directory) and drive best_step().
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=True,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_array_handlers()),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def _metric_value(self, metrics: Mapping) -> float:
        # Checkpoints whose metric is missing or not finite rank worst.
        worst = math.inf if self.best_mode == "min" else -math.inf
        try:
            value = float(metrics[self.best_metric])
        except (KeyError, TypeError, ValueError):
            return worst
        return value if math.isfinite(value) else worst

    # -- queries ---------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """True when `step` is a multiple of `save_every` (or at a multi-host preemption sync
        point) and newer than the latest checkpoint."""
        return bool(self._manager.should_save(step))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric`; None without a best metric or when no
        kept checkpoint has it."""
        if self.best_metric is None:
            return None
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with `step` (None for checkpoints saved without them)."""
        return self._manager.metrics(step)

    def meta(self, step: int | None = None) -> dict:
        """The `meta` item of `step` (latest when None)."""
        step = self._resolve_step(step)
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    # -- save / restore --------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        *,
        metrics: dict | None = None,
        force: bool = False,
        meta: dict | None = None,
    ) -> bool:
        """Start saving `state` and `data_state` as `step`; returns whether a save started.

        Without `force`, saves only when `should_save(step)`. A step that already has a
        checkpoint is never overwritten (returns False). `metrics` (e.g. validation losses)
        rank the checkpoint for best-keeping; a dict without `best_metric` counts as none.
        The arrays are copied to host before this returns, so `state` may be donated after.
        """
        step = int(step)
        if step in self._manager.all_steps():
            log.info("checkpoint for step %d already exists in %s: not saved", step, self.directory)
            return False
        if not force and not self.should_save(step):
            return False
        tracked = None
        if metrics is not None and self.best_metric is not None and self.best_metric in metrics:
            tracked = {k: v for k, v in _to_json(dict(metrics)).items() if _is_number(v)}
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave(_to_json(dict(data_state))),
            meta=ocp.args.JsonSave(_to_json({**(meta or {}), "step": step})),
        )
        return bool(self._manager.save(step, args=args, metrics=tracked, force=True))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Read `step` (the newest intact one when None) into the layout of `abstract_state`.

        `abstract_state`: a pytree of jax.ShapeDtypeStruct with `.sharding` set (or of
        jax.Arrays, whose shardings are used), for the mesh the state is restored onto; it may
        differ from the mesh the checkpoint was saved from. Returns (state, data_state).
        """
        self.wait()  # a save still being written is not readable yet
        target = _abstract_target(abstract_state)

        def read(step: int):
            self._check_shapes(step, target)
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target)),
                    data=ocp.args.JsonRestore(),
                ),
            )
            return out["state"], dict(out["data"])

        return self._restore_with_fallback(step, read)

    def restore_variables(self, abstract_variables: Any, step: int | None = None) -> Any:
        """Only the model variables of `step` (the newest intact one when None): the state's
        `params` and `batch_stats`, read into the layout of `abstract_variables` ({"params":
        ..., "batch_stats": ...} of jax.ShapeDtypeStruct with `.sharding`). The optimizer
        state, step, rng and counters are never read, so inference needs no optimizer (its
        config may differ from the run's) and reads about a third of a train state's bytes."""
        self.wait()
        target = {k: _abstract_target(abstract_variables[k]) for k in ("params", "batch_stats")}
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)

        def read(step: int):
            self._check_shapes(step, target, partial=True)
            # The manager's handler restores whole trees; PyTreeCheckpointer reads in part.
            path = paths.join(self.directory, str(step), "state")
            out = ocp.PyTreeCheckpointer().restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            )
            return {"params": out["params"], "batch_stats": out["batch_stats"]}

        return self._restore_with_fallback(step, read)

    def _restore_with_fallback(self, step: int | None, read):
        """read(step) for the asked step, or for the newest step that reads (see the module
        docstring); damage is reported, never repaired or deleted."""
        candidates = [self._resolve_step(step)] if step is not None else self.all_steps()[::-1]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        _install_quiet_hooks()
        failures = []
        for candidate in candidates:
            try:
                result = read(candidate)
            except CheckpointMismatchError:
                raise
            except (ValueError, OSError, KeyError) as e:  # unreadable files: damage
                failures.append(f"step {candidate}: {_reason(e)}")
                if step is None and candidate != candidates[-1]:
                    print(f"warning: checkpoint step {candidate} in {self.directory} is "
                          f"damaged ({_reason(e)}); trying an older one",
                          file=sys.stderr)  # fmt: skip
                continue
            self.restored_step = candidate
            if failures:
                print(f"warning: restored step {candidate} of {self.directory} instead of the "
                      f"newest (damaged: {', '.join(f.split(':')[0] for f in failures)})",
                      file=sys.stderr)  # fmt: skip
            return result
        what = f"checkpoint step {step}" if step is not None else "no intact checkpoint"
        raise CheckpointDamagedError(
            f"{what} in {self.directory} could not be read: " + "; ".join(failures)
        )

    def set_aside_newer(self, step: int) -> list[str]:
        """Renames the folders of steps newer than `step` (damaged ones a restore fell back
        past) to `<step>.damaged`, so training can save those steps again; nothing is deleted.
        Returns the new folder names."""
        moved = []
        for newer in self.all_steps():
            if newer <= step:
                continue
            source = paths.join(self.directory, str(newer))
            target, n = f"{source}.damaged", 1
            while paths.exists(target):
                n += 1
                target = f"{source}.damaged{n}"
            if jax.process_index() == 0:  # one folder, shared by all hosts: one renames it
                paths.rename(source, target)
            moved.append(target.rsplit("/", 1)[-1])
        if moved and jax.process_count() > 1:
            multihost_utils.sync_global_devices("dfrec_jax set_aside_newer")
        if moved:
            self._manager.reload()
            print(f"warning: set aside the damaged checkpoint(s) of {self.directory} as "
                  f"{', '.join(moved)} (nothing deleted); training continues from step {step}",
                  file=sys.stderr)  # fmt: skip
        return moved

    def _mismatch(self, step: int) -> str:
        return (
            f"checkpoint step {step} in {self.directory} does not match the state to restore "
            "(different model config?)"
        )

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (available: {steps})"
            )
        return int(step)

    def _saved_shapes(self, step: int) -> dict | None:
        """Leaf name -> shape of `step`'s state, from its metadata (None when unreadable)."""
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved_tree = saved.tree if hasattr(saved, "tree") else saved
        except Exception:  # metadata is a courtesy check; restore reports its own errors
            return None
        if saved_tree is None:
            return None
        return {_path_name(p): tuple(x.shape) for p, x in _leaves(saved_tree)}

    def layout_matches(self, abstract_state: Any) -> bool | None:
        """Whether the newest checkpoint with readable metadata holds exactly
        `abstract_state`'s leaves and shapes (None: no checkpoint's metadata reads). An older
        step answers when the newest one's metadata is damaged, as a restore falls back to it."""
        for step in reversed(self.all_steps()):
            got = self._saved_shapes(step)
            if got is not None:
                return got == _shapes(abstract_state)
        return None

    def _check_shapes(self, step: int, target: Any, partial: bool = False) -> None:
        """Name the leaves whose saved shape differs from the target's, and the leaves only one
        side has (all of the checkpoint's must be restored unless `partial`): orbax's own
        errors do not say which, and they must not be taken for damage."""
        got = self._saved_shapes(step)
        if got is None:
            return
        want = _shapes(target)
        problems = [
            f"{k}: checkpoint shape {got[k]}, target shape {want[k]}"
            for k in sorted(got.keys() & want.keys())
            if got[k] != want[k]
        ]
        problems += [f"{k}: not in the checkpoint" for k in sorted(want.keys() - got.keys())]
        if not partial:
            problems += [f"{k}: not in the target" for k in sorted(got.keys() - want.keys())]
        if problems:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            differing = (got.keys() ^ want.keys()) | {k for k in got.keys() & want.keys()
                                                      if got[k] != want[k]}  # fmt: skip
            if all(k.startswith("opt_state") for k in differing):
                more += (
                    "; only the optimizer state differs: resume with the run's optim settings"
                    " (accumulate_steps, clip_norm; see its config.json; `train` itself takes"
                    " the run's optim.flatten layout, or cuts a flat state per leaf under fsdp)"
                )
            raise CheckpointMismatchError(
                f"{self._mismatch(step)}: " + "; ".join(problems[:10]) + more
            )

    # -- lifecycle -------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until pending saves are on disk (and old checkpoints removed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _restore_args(target: Any) -> Any:
    """Each leaf read as its target says: jax.Arrays in their sharding (what StandardRestore
    builds)."""
    return ocp.checkpoint_utils.construct_restore_args(target)


def _shapes(tree: Any) -> dict:
    """Leaf name -> the shape its checkpoint entry has (as `_saved_shapes` reads them)."""
    return {_path_name(p): _stored_shape(x) for p, x in _leaves(tree)}


def _path_name(path: tuple) -> str:
    # Orbax's metadata tree holds dicts/lists where the state has dataclasses and named tuples:
    # compare paths by their names only ("opt_state/0/mu/params/kernel").
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _stored_shape(x: Any) -> tuple:
    # Typed PRNG keys are stored as their key data (an extra trailing dimension).
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return tuple(x.shape)


def _leaves(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    )[0]


def _abstract_target(abstract_state: Any) -> Any:
    def to_abstract(path, x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"restore target leaf {jax.tree_util.keystr(path)} has no sharding: pass "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=...) for the mesh to restore onto"
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(to_abstract, abstract_state)
