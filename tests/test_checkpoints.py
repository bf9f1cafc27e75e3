"""Training checkpoints (orbax) and the preemption guard, on plain pytrees of jax arrays.

Covers: bitwise round trip with the data-iterator state, restore onto other meshes (saved over
8 devices, read onto 1 and onto 8x1 with other specs), keep-last-N + best-by-metric, the save
interval and forced saves, resumption from a new process, a save killed midway, donation right
after an async save, clear errors, and SIGTERM/SIGINT handling.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dfrec_jax.run import checkpoints as checkpoints_lib
from dfrec_jax.run.checkpoints import (
    CheckpointDamagedError,
    Checkpointer,
    CheckpointMismatchError,
)
from dfrec_jax.train.preemption import PreemptionGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(shape, devices=None):
    devices = jax.devices()[: int(np.prod(shape))] if devices is None else devices
    return Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp"))


def _tree(mesh):
    """Mixed dtypes and specs, with values whose bits a sloppy cast would change."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((16, 8)).astype(np.float32)
    f32[0, :3] = [np.nan, -0.0, np.inf]
    specs = {
        "kernel": P(None, "fsdp"),
        "bias": P("fsdp"),
        "emb": P(("data", "fsdp")),
        "bf16": P("fsdp"),
        "count": P(),
        "rng": P(),
        "key": P(),
    }
    values = {
        "kernel": f32,
        "bias": rng.standard_normal(8).astype(np.float32),
        "emb": rng.standard_normal((8, 3)).astype(np.float32),
        "bf16": rng.standard_normal((4, 6)).astype(jnp.bfloat16),
        "count": np.int32(7),
        "rng": np.asarray(jax.random.key_data(jax.random.PRNGKey(3)), np.uint32),
        "key": jax.random.key(5),  # typed key array
    }
    return {k: jax.device_put(values[k], NamedSharding(mesh, specs[k])) for k in values}


def _target(tree, mesh, specs):
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs.get(k, P())))
        for k, v in tree.items()
    }


def _bits(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _assert_same(restored, original):
    assert restored.keys() == original.keys()
    for k in original:
        assert restored[k].dtype == original[k].dtype, k
        assert restored[k].shape == original[k].shape, k
        np.testing.assert_array_equal(_bits(restored[k]), _bits(original[k]), err_msg=k)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint saved from a (data=2, fsdp=4) mesh over 8 devices."""
    directory = str(tmp_path_factory.mktemp("ckpt") / "run")
    tree = _tree(_mesh((2, 4)))
    assert all(len(v.sharding.device_set) == 8 for v in tree.values())
    with Checkpointer(directory, save_every=10, keep=2) as ckpt:
        assert ckpt.save(10, tree, {"next_batch": np.int64(10), "epoch": 1})
    return directory, tree


def test_round_trip_bitwise_same_mesh(saved):
    directory, tree = saved
    ckpt = Checkpointer(directory, save_every=10, keep=2)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    state, data = ckpt.restore(target)
    _assert_same(state, tree)
    assert data == {"next_batch": 10, "epoch": 1}
    for k in tree:
        assert state[k].sharding == tree[k].sharding, k
    assert ckpt.meta() == {"step": 10}
    ckpt.close()


@pytest.mark.parametrize(
    "mesh_shape,specs",
    [
        ((1, 1), {}),  # everything onto one device
        ((8, 1), {"kernel": P(None, "data"), "bias": P("data"), "emb": P("data"), "bf16": P()}),
    ],
    ids=["1_device", "8x1_other_specs"],
)
def test_restore_on_different_mesh(saved, mesh_shape, specs):
    """ACCEPTANCE: saved over 8 devices as (2, 4), restored onto another mesh shape."""
    directory, tree = saved
    mesh = _mesh(mesh_shape)
    ckpt = Checkpointer(directory, save_every=10, keep=2, read_only=True)
    target = _target(tree, mesh, specs)
    state, data = ckpt.restore(target)
    _assert_same(state, tree)
    assert data["next_batch"] == 10
    for k in tree:
        assert state[k].sharding == target[k].sharding, k
        assert len(state[k].sharding.device_set) == int(np.prod(mesh_shape)), k
    ckpt.close()


def test_read_only_open_logs_nothing(saved, caplog):
    """Inference opens checkpoints read-only; orbax's two warnings about that are expected and
    kept off the console (they reach absl's logger, where the filter sits)."""
    directory, _ = saved
    with caplog.at_level("INFO", logger="absl"):
        Checkpointer(directory, save_every=10, keep=2, read_only=True).close()
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_restore_shape_mismatch_is_clear(saved):
    directory, tree = saved
    ckpt = Checkpointer(directory, save_every=10, keep=2, read_only=True)
    target = _target(tree, _mesh((1, 1)), {})
    target["bias"] = jax.ShapeDtypeStruct((9,), jnp.float32, sharding=target["bias"].sharding)
    with pytest.raises(ValueError, match=r"bias: checkpoint shape \(8,\), target shape \(9,\)"):
        ckpt.restore(target)
    extra = dict(_target(tree, _mesh((1, 1)), {}), new=target["bias"])
    with pytest.raises(ValueError, match="different model config"):
        ckpt.restore(extra)
    with pytest.raises(ValueError, match="no sharding"):
        ckpt.restore({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tree.items()})


@flax.struct.dataclass
class _TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def test_dataclass_and_optax_state(tmp_path):
    """The trainer's kind of state: a dataclass holding optax named tuples."""
    tx = optax.adamw(1e-3)
    params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)}}
    state = _TrainState(jnp.int32(3), params, tx.init(params))
    ckpt = Checkpointer(str(tmp_path / "run"), save_every=1, keep=1)
    ckpt.save(3, state, {"next_batch": 3})
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored, _ = ckpt.restore(target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored, _TrainState)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    bigger = {"dense": {"kernel": jnp.zeros((3, 5)), "bias": jnp.ones(4)}}
    wrong = _TrainState(jnp.int32(0), bigger, tx.init(bigger))
    with pytest.raises(ValueError, match=r"opt_state/0/mu/dense/kernel: checkpoint shape \(3, 4\)"):
        ckpt.restore(wrong)
    # A run saved leaf by leaf, resumed with optim.flatten's one-vector AdamW: named as such.
    flat = _TrainState(jnp.int32(0), params, optax.flatten(tx).init(params))
    with pytest.raises(ValueError, match="only the optimizer state differs: .*optim.flatten"):
        ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=x.sharding), flat))
    ckpt.close()


def _small(value):
    return {"w": jnp.full((4,), value, jnp.float32), "step": jnp.int32(value)}


def _save_series(directory, best_mode, metric_steps):
    ckpt = Checkpointer(
        directory, save_every=1, keep=2, best_metric="val/total", best_mode=best_mode
    )
    for step in range(1, 7):
        metrics = metric_steps.get(step)
        assert ckpt.save(step, _small(step), {"next_batch": step}, metrics=metrics)
    ckpt.wait()
    return ckpt


@pytest.mark.parametrize("best_mode,best", [("min", 4), ("max", 2)])
def test_keep_latest_n_plus_best(tmp_path, best_mode, best):
    metric_steps = {
        2: {"val/total": 5.0, "val/id": 0.1},
        3: {"train/total": 0.01},  # no best_metric: a plain periodic save
        4: {"val/total": jnp.float32(1.0)},
        5: {"val/total": float("nan")},  # ranks worst in both modes
        6: {"val/total": 3.0},
    }
    directory = str(tmp_path / best_mode)
    ckpt = _save_series(directory, best_mode, metric_steps)
    assert ckpt.all_steps() == sorted({5, 6, best})
    assert ckpt.best_step() == best
    assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == sorted({5, 6, best})
    assert ckpt.metrics(best)["val/total"] == metric_steps[best]["val/total"]
    ckpt.close()

    # The ranking survives re-opening: metrics are stored with the checkpoints.
    again = Checkpointer(
        directory, save_every=1, keep=2, best_metric="val/total", best_mode=best_mode
    )
    assert again.best_step() == best
    assert again.latest_step() == 6
    assert again.save(7, _small(7), {"next_batch": 7})
    again.wait()
    assert again.all_steps() == sorted({6, 7, best})
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _small(0)
    )
    state, data = again.restore(target, step=best)
    assert int(state["step"]) == best and data == {"next_batch": best}
    again.close()


def test_intervals_force_and_resume_in_new_checkpointer(tmp_path):
    directory = str(tmp_path / "run")
    ckpt = Checkpointer(directory, save_every=3, keep=5)
    assert [s for s in range(1, 10) if ckpt.should_save(s)] == [3, 6, 9]  # no initial save
    assert not ckpt.save(2, _small(2), {"next_batch": 2})  # off-interval, not forced
    assert ckpt.save(3, _small(3), {"next_batch": 3})
    assert not ckpt.should_save(3)  # already saved
    assert ckpt.save(5, _small(5), {"next_batch": 5}, force=True)  # e.g. preemption
    assert not ckpt.save(5, _small(50), {"next_batch": 50}, force=True)  # never overwritten
    assert ckpt.best_step() is None  # no best metric configured
    ckpt.close()

    again = Checkpointer(directory, save_every=3, keep=5)
    assert again.latest_step() == 5 and again.all_steps() == [3, 5]
    assert again.should_save(6) and not again.should_save(4)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _small(0)
    )
    state, data = again.restore(target)
    assert int(state["step"]) == 5 and data == {"next_batch": 5}
    again.close()


@pytest.mark.parametrize("replica_parallel", [True, False], ids=["sliced", "whole"])
def test_donating_right_after_async_save(tmp_path, replica_parallel):
    """The trainer donates the state to the next step as soon as save() returns.

    Replicated shards of at least MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL per replica slice are
    copied to host as new slices, so the donation must happen. Smaller arrays are written whole
    from the shard's own buffer, which on CPU numpy reads without a copy: while the background
    write still holds that view, XLA declines the donation (no error; measured: a live
    np.asarray view keeps a donated CPU buffer alive). Either way the checkpoint holds the
    values saved, never the step's.
    """
    ckpt = Checkpointer(str(tmp_path / "run"), save_every=1, keep=1)
    sharding = NamedSharding(_mesh((2, 4)), P("fsdp"))
    slice_floats = checkpoints_lib.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL // 4
    # 4 fsdp shards, each held by 2 data replicas: a replica slice of exactly the threshold.
    size = 4 * 2 * slice_floats if replica_parallel else 1 << 16
    state = {"w": jax.device_put(jnp.arange(size, dtype=jnp.float32), sharding)}
    expected = np.asarray(state["w"]).copy()
    target = {"w": jax.ShapeDtypeStruct(state["w"].shape, jnp.float32, sharding=sharding)}
    ckpt.save(1, state, {"next_batch": 1})
    step = jax.jit(lambda s: {"w": s["w"] * 0.0 - 1.0}, donate_argnums=0)
    new = step(state)
    new["w"].block_until_ready()
    if replica_parallel:
        assert state["w"].is_deleted()  # the buffer really was handed to the step
    restored, _ = ckpt.restore(target)
    np.testing.assert_array_equal(np.asarray(restored["w"]), expected)
    np.testing.assert_array_equal(np.asarray(new["w"]), -1.0)
    ckpt.close()


def test_missing_checkpoints_are_clear_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        Checkpointer(missing, save_every=1, keep=1, read_only=True)
    assert not os.path.exists(missing)
    empty = Checkpointer(missing, save_every=1, keep=1)
    assert empty.latest_step() is None and empty.all_steps() == []
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=_small(0)["w"].sharding)}
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {missing}"):
        empty.restore(target)
    empty.save(1, {"w": _small(1)["w"]}, {"next_batch": 1})
    with pytest.raises(FileNotFoundError, match=r"step 7 .*available: \[1\]"):
        empty.restore(target, step=7)
    empty.close()


def test_partial_checkpoint_is_ignored(tmp_path):
    """A temporary (unfinished) step directory is invisible and removed on the next open."""
    directory = str(tmp_path / "run")
    ckpt = Checkpointer(directory, save_every=1, keep=3)
    ckpt.save(1, _small(1), {"next_batch": 1})
    ckpt.close()
    partial = os.path.join(directory, "2.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "garbage"), "wb") as f:
        f.write(b"\0" * 100)
    again = Checkpointer(directory, save_every=1, keep=3)
    assert again.all_steps() == [1]
    assert _wait_for(lambda: not os.path.exists(partial))  # orbax cleans up in a thread
    again.close()


_KILLED_SAVER = """
import asyncio, os, signal, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
try:
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from dfrec_jax.run.checkpoints import (
    CheckpointDamagedError,
    Checkpointer,
    CheckpointMismatchError,
)

    directory = sys.argv[1]
    ckpt = Checkpointer(directory, save_every=1, keep=3)
    big = lambda v: {"w": jnp.full((1024, 4096), v, jnp.float32), "step": jnp.int32(v)}  # 16 MiB
    ckpt.save(1, big(1.0), {"next_batch": 1})
    ckpt.wait()

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def held(self, *args, **kwargs):  # every item of step 2 is written, never committed
        if os.path.basename(str(self.get())).startswith("2."):
            await asyncio.sleep(3600)
        return await commit(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = held
    ckpt.save(2, big(2.0), {"next_batch": 2})  # async: returns while the files are written
    items = [os.path.join(directory, "2.orbax-checkpoint-tmp", k) for k in ("state", "data")]
    end = time.monotonic() + 60
    while not all(os.path.isdir(p) for p in items) and time.monotonic() < end:
        time.sleep(0.005)
    print(sorted(os.listdir(directory)), all(os.path.isdir(p) for p in items), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
except BaseException as e:
    print(repr(e), file=sys.stderr, flush=True)
os._exit(3)  # never hang on the held commit
"""


def test_process_killed_mid_save_keeps_previous(tmp_path):
    """SIGKILL after step 2's arrays are written but before its commit (rename): step 1 stays
    the latest and the leftover is removed."""
    directory = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT)  # conftest's XLA flags
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_SAVER), directory],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    listing = proc.stdout.strip().splitlines()[-1]
    assert listing == "['1', '2.orbax-checkpoint-tmp'] True", listing
    ckpt = Checkpointer(directory, save_every=1, keep=3)
    assert ckpt.all_steps() == [1]
    sharding = _small(0)["w"].sharding
    target = {
        "w": jax.ShapeDtypeStruct((1024, 4096), jnp.float32, sharding=sharding),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
    }
    state, data = ckpt.restore(target)
    assert int(state["step"]) == 1 and float(state["w"][5, 7]) == 1.0
    assert data == {"next_batch": 1}
    assert _wait_for(lambda: not any("tmp" in n for n in os.listdir(directory)))
    ckpt.close()


def _wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def test_preemption_guard_sigterm_sets_flag():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)  # the default action would kill pytest
        assert _wait_for(lambda: guard.requested)
        assert guard.signal_name == "SIGTERM" and guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # schedulers may repeat it: still just the flag
        time.sleep(0.05)
    assert {s: signal.getsignal(s) for s in before} == before


def test_preemption_guard_second_sigint_raises():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGINT)
            assert _wait_for(lambda: guard.requested)
            assert guard.signal_name == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted by the KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) == before


def test_preemption_guard_off_main_thread_is_noop():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def run():
        with pytest.warns(RuntimeWarning, match="main thread"):
            with PreemptionGuard() as guard:
                seen["handler"] = signal.getsignal(signal.SIGTERM)
                seen["stop"] = guard.should_stop(0)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == {"handler": before, "stop": False}


def _tree_files(directory):
    return {
        os.path.relpath(os.path.join(root, f), directory): open(os.path.join(root, f), "rb").read()
        for root, _, files in os.walk(directory)
        for f in files
    }


def _truncate_data_files(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for f in files:
                path = os.path.join(root, f)
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)


def _remove_manifests(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            if f == "manifest.ocdbt":
                os.remove(os.path.join(root, f))


def _variables(value):
    return {
        "params": {"w": jnp.full((64, 8), value, jnp.float32)},
        "batch_stats": {"m": jnp.full((3,), value, jnp.float32)},
        "opt": jnp.full((64, 8), -value, jnp.float32),
        "step": jnp.int32(value),
    }


@pytest.mark.parametrize("damage", [_truncate_data_files, _remove_manifests])
def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, capsys, damage):
    """The newest step damaged: restore and restore_variables read the next older step with a
    warning naming the damaged one; asked for by number it is one line; nothing on disk
    changes; every step damaged is one line."""
    directory = str(tmp_path / "run")
    with Checkpointer(directory, save_every=1, keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _variables(step), {"next_batch": step})
    damage(os.path.join(directory, "3"))
    before = _tree_files(directory)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _variables(0)
    )
    ckpt = Checkpointer(directory, save_every=1, keep=3)
    variables = ckpt.restore_variables({k: abstract[k] for k in ("params", "batch_stats")})
    assert float(variables["params"]["w"][0, 0]) == 2 and ckpt.restored_step == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") for line in err), err
    assert "step 3" in err[0] and "damaged" in err[0]
    assert err[1].startswith(f"warning: restored step 2 of {directory} instead of the newest")
    state, data = ckpt.restore(abstract)
    assert ckpt.restored_step == 2 and len(capsys.readouterr().err.splitlines()) == 2
    assert int(state["step"]) == 2 and data == {"next_batch": 2}
    np.testing.assert_array_equal(state["opt"], -2.0)
    with pytest.raises(CheckpointDamagedError, match=r"^checkpoint step 3 in .* could not be read: step 3: ") as info:  # fmt: skip
        ckpt.restore_variables({k: abstract[k] for k in ("params", "batch_stats")}, step=3)
    assert "\n" not in str(info.value)
    for step in ("1", "2"):
        damage(os.path.join(directory, step))
    with pytest.raises(CheckpointDamagedError, match=r"^no intact checkpoint in .*step 3: .*step 2: .*step 1: "):  # fmt: skip
        ckpt.restore_variables({k: abstract[k] for k in ("params", "batch_stats")})
    ckpt.close()
    after = _tree_files(directory)
    for name in before:  # step 3 as the restores found it: nothing removed or rewritten
        if name.split(os.sep)[0] == "3":
            assert after.get(name) == before[name], name


def test_training_sets_damaged_steps_aside_and_saves_them_again(tmp_path, capsys):
    """After a fallback the trainer renames the damaged newer step (nothing deleted) so the
    resumed run can save that step again; the next restore reads the new one."""
    directory = str(tmp_path / "run")
    with Checkpointer(directory, save_every=1, keep=3) as ckpt:
        for step in (2, 4):
            ckpt.save(step, _variables(step), {"next_batch": step})
    _truncate_data_files(os.path.join(directory, "4"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _variables(0)
    )
    ckpt = Checkpointer(directory, save_every=1, keep=3)
    ckpt.restore(abstract)
    assert ckpt.restored_step == 2
    assert ckpt.set_aside_newer(2) == ["4.damaged"] and ckpt.all_steps() == [2]
    assert "set aside" in capsys.readouterr().err
    assert ckpt.save(4, _variables(40), {"next_batch": 4}, force=True)
    ckpt.wait()
    state, _ = ckpt.restore(abstract)
    assert ckpt.restored_step == 4 and int(state["step"]) == 40
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["2", "4", "4.damaged"]


def test_missing_metadata_file_reads_right_or_falls_back(tmp_path, capsys):
    """Without state/_METADATA a restore with a full target still reads the arrays; whatever
    step it reads, its values are that step's."""
    directory = str(tmp_path / "run")
    with Checkpointer(directory, save_every=1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _variables(step), {"next_batch": step})
    os.remove(os.path.join(directory, "2", "state", "_METADATA"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _variables(0)
    )
    with Checkpointer(directory, save_every=1, keep=3, read_only=True) as ckpt:
        # The layout check reads step 1's metadata instead (what a fallback would restore).
        assert ckpt.layout_matches(abstract) is True
        assert ckpt.layout_matches(dict(abstract, extra=abstract["opt"])) is False
        variables = ckpt.restore_variables({k: abstract[k] for k in ("params", "batch_stats")})
        np.testing.assert_array_equal(variables["params"]["w"], float(ckpt.restored_step))
        state, _ = ckpt.restore(abstract)
        assert int(state["step"]) == ckpt.restored_step
        np.testing.assert_array_equal(state["opt"], -float(ckpt.restored_step))


def test_config_mismatch_is_not_taken_for_damage(tmp_path, capsys):
    directory = str(tmp_path / "run")
    with Checkpointer(directory, save_every=1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _variables(step), {"next_batch": step})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    other = dict(_variables(0), extra=jnp.zeros(2))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), other)
    ckpt = Checkpointer(directory, save_every=1, keep=3, read_only=True)
    with pytest.raises(CheckpointMismatchError, match=r"step 2 .*extra: not in the checkpoint"):
        ckpt.restore(abstract)
    assert capsys.readouterr().err == ""  # no fallback attempted: older steps have the same shapes


def _compiles_during_first_save(directory) -> int:
    """XLA compiles while saving small replicated arrays of 12 shapes never saved before."""
    whole = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P())
    state = {f"w{i}": jax.device_put(np.ones((8, 1000 + i), np.float32), whole) for i in range(12)}
    jax.block_until_ready(state)
    compiles = []

    def listen(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        with Checkpointer(str(directory), save_every=1, keep=1) as ckpt:
            ckpt.save(1, state, {})
            ckpt.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return len(compiles)


def test_small_replicated_arrays_are_saved_whole_by_one_replica(tmp_path, monkeypatch):
    """Orbax's replica-parallel save cuts each replicated array into one slice per device with
    an eager lax.slice, an XLA compile per shape and slice (13 s on the first save of the tiny
    model over 8 devices); under 1 MiB per slice one replica writes the array whole."""
    assert jax.device_count() == 8
    assert _compiles_during_first_save(tmp_path / "whole") == 0
    monkeypatch.setattr(checkpoints_lib, "MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL", 0)
    assert _compiles_during_first_save(tmp_path / "sliced") >= 12  # the check sees them
