"""The training loop end to end on a tiny model and a tiny real-face lfw_swap:
kill-and-resume gives the same parameters and the same data order as an uninterrupted run
(SIGTERM and SIGKILL), the non-finite guard stops the run keeping the last good checkpoint,
and the workdir holds TensorBoard scalars, config and versions."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dfrec_jax import configlib
from dfrec_jax.run import checkpoints
from dfrec_jax.train import metric_writer, trainer
from tests import tiny

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny LFW tree and its lfw_swap (32 px) built once for the module."""
    from data_pipelines import datasets

    root = tmp_path_factory.mktemp("train_data")
    lfw = tiny.write_lfw_tree(root / "lfw")
    config = tiny.tiny_config()
    config.data.update(lfw_dir=lfw, data_dir=str(root / "tfds"))
    builder = datasets.prepare(config.data)
    assert builder.info.splits["train"].num_examples >= 32
    return {"lfw_dir": lfw, "data_dir": str(root / "tfds")}


def _command(data, workdir, record, steps=STEPS):
    return [
        sys.executable, "-m", "tests.tiny_training", "--workdir", str(workdir),
        "--lfw_dir", data["lfw_dir"], "--data_dir", data["data_dir"], "--steps", str(steps),
        "--checkpoint_every", "2", "--record", str(record),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The runs share XLA's persistent compilation cache: only the first one compiles."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _run(command, env):
    done = subprocess.run(
        command, cwd=configlib.REPO_ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _records(path):
    """step -> batch fingerprint; a resumed run's records overwrite the killed run's."""
    out = {}
    for line in open(path):
        item = json.loads(line)
        out[item["step"]] = item["batch"]
    return out


def _params(workdir):
    with np.load(os.path.join(workdir, "final_params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference(data, env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    result = _run(_command(data, workdir / "run", workdir / "record.jsonl"), env)
    assert result == {"step": STEPS, "stopped": "finished"}
    return {"workdir": workdir / "run", "records": _records(workdir / "record.jsonl")}


def _interrupt_then_resume(data, env, tmp_path, reference, sig):
    workdir, record = tmp_path / "run", tmp_path / "record.jsonl"
    process = subprocess.Popen(
        _command(data, workdir, record),
        cwd=configlib.REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 500
    # Interrupt once the first periodic checkpoint (step 2) is complete and before the end.
    while not (workdir / "checkpoints" / "2").is_dir():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["stopped"] == "preempted (SIGTERM)"
    interrupted_at = max(_records(record))
    assert interrupted_at < STEPS, "the run finished before the signal: nothing was tested"
    assert _run(_command(data, workdir, record), env) == {"step": STEPS, "stopped": "finished"}
    assert _records(record) == reference["records"]  # the same batches at every step
    ours, theirs = _params(workdir), _params(reference["workdir"])
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)  # bitwise, fp32 on CPU


def test_sigterm_then_resume_matches_uninterrupted(data, env, tmp_path, reference):
    _interrupt_then_resume(data, env, tmp_path, reference, signal.SIGTERM)


@pytest.mark.slow  # ~2 min more on 2 cores; the SIGTERM variant runs by default
def test_sigkill_then_resume_matches_uninterrupted(data, env, tmp_path, reference):
    _interrupt_then_resume(data, env, tmp_path, reference, signal.SIGKILL)


def test_workdir_has_scalars_config_and_versions(reference):
    workdir = str(reference["workdir"])
    scalars = metric_writer.read_scalars(workdir)
    for name in (
        "total",
        "identity/target",
        "perceptual/source",
        "patch/target",
        "lr",
        "grad_norm",
        "images_per_s",
    ):
        steps = [s for s, _ in scalars[name]]
        assert steps == list(range(1, STEPS + 1)), name
    assert all(np.isfinite(v) for _, v in scalars["total"])
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["train"]["steps"] == STEPS
    versions = json.load(open(os.path.join(workdir, "versions.json")))
    assert "jax" in versions and "flax" in versions
    ckpt = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_every=2, keep=3, best_metric=None
    )
    assert ckpt.latest_step() == STEPS


@pytest.mark.slow  # compiles its own step (~2-4 min); tests/test_train_step.py tests the guard
def test_nonfinite_guard_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    config = tiny.tiny_config()
    config.data.update(lfw_dir=data["lfw_dir"], data_dir=data["data_dir"])
    config.train.update(
        steps=20, checkpoint_every=2, log_every=1, image_every=0, eval_every=0, max_nonfinite=3
    )
    workdir = tmp_path / "nan"
    with pytest.raises(trainer.NonFiniteError, match="3 non-finite training steps in a row"):
        trainer.train(config, str(workdir), loss_nets=tiny.tiny_loss_nets(nan=True))
    ckpt = checkpoints.Checkpointer(
        str(workdir / "checkpoints"), save_every=2, keep=3, best_metric=None
    )
    steps = ckpt.all_steps()
    assert steps and max(steps) <= 4  # nothing was saved after the streak began to count
    scalars = metric_writer.read_scalars(str(workdir))
    assert [v for _, v in scalars["nonfinite"]][:3] == [1.0, 1.0, 1.0]


def test_config_is_on_record_only_once_the_model_builds(data, tmp_path, reference):
    """A first run whose model cannot be built leaves no config.json (recover would read it);
    a resume whose config changes array shapes is refused with one line before anything is
    compiled, and the run's config.json is untouched."""
    import shutil

    from dfrec_jax.run import checkpoints as checkpoints_lib

    def config(**model):
        c = tiny.tiny_config()
        c.data.update(lfw_dir=data["lfw_dir"], data_dir=data["data_dir"])
        c.train.update(steps=STEPS + 2, checkpoint_every=2, image_every=0, eval_every=0)
        c.model.tirm.update(model)
        return c

    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError):
        trainer.train(config(decoder_heads=3), str(fresh), loss_nets=tiny.tiny_loss_nets())
    assert not (fresh / "config.json").exists()

    run = tmp_path / "run"
    shutil.copytree(reference["workdir"], run)
    before = (run / "config.json").read_bytes()
    wider = config(decoder_width=2 * tiny.tiny_config().model.tirm.decoder_width)
    with pytest.raises(checkpoints_lib.CheckpointMismatchError, match=r"checkpoint shape") as info:
        trainer.train(wider, str(run), loss_nets=tiny.tiny_loss_nets())
    assert "\n" not in str(info.value)
    assert (run / "config.json").read_bytes() == before
    assert not list(run.glob("config.*.json"))
