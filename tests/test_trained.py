"""Reading a trained run back (dfrec_jax/trained.py): config, parameters, digests, errors."""

import json
import os

import jax
import numpy as np
import pytest

from dfrec_jax import inference, trained
from tests import tiny


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def test_load_restores_the_saved_parameters(run_dir):
    from dfrec_jax.run import checkpoints

    model = trained.load(workdir=run_dir)
    assert model.step == 3 and model.image_size == tiny.IMAGE_SIZE
    assert model.config_hash == open(os.path.join(run_dir, "config_hash.txt")).read().strip()
    with open(os.path.join(run_dir, "config.json")) as f:
        assert model.config.to_dict() == json.load(f)
    # The same arrays as the checkpoint's state (read independently, untyped).
    with checkpoints.Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=1, keep=1,
                                  read_only=True) as ckpt:  # fmt: skip
        raw = ckpt._manager.restore(3)["state"]
    for a, b in zip(jax.tree.leaves(raw["params"]), jax.tree.leaves(model.variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_folder_equals_workdir_and_predict_is_deterministic(run_dir):
    a = trained.load(workdir=run_dir)
    b = trained.load(checkpoint=os.path.join(run_dir, "checkpoints"))
    assert a.params_sha256 == b.params_sha256 and a.step == b.step
    # Two loads of one run (its config read back from JSON) build equal, hashable models and
    # share one jitted predict: one trace and one compile per input shape in a process.
    assert a.model == b.model and hash(a.model) == hash(b.model)
    in_memory = inference.build_model(tiny.tiny_config())  # the config the run was saved from
    assert a.model == in_memory
    assert inference.make_predict(in_memory, 0) is inference.make_predict(a.model, 0)
    assert inference.make_predict(a.model, 0) is inference.make_predict(b.model, 0)
    assert inference.make_predict(a.model, 0) is not inference.make_predict(a.model, 1)
    by_hand = a.model.clone(ism=a.model.ism.clone(atrous_rates=[1, 2, 3]))  # a list: unhashable
    assert inference.make_predict(by_hand, 0) is not inference.make_predict(by_hand, 0)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out_a, out_b = jax.device_get(a.predict(images)), jax.device_get(b.predict(images))
    assert set(out_a) == set(inference.OUTPUT_KEYS)
    for key in out_a:
        np.testing.assert_array_equal(out_a[key], out_b[key])
    # uint8 input is the same as its float [0, 1] version.
    as_float = jax.device_get(a.predict(images.astype(np.float32) / 255.0))
    np.testing.assert_allclose(as_float["target"], out_a["target"], atol=1e-6)


def test_params_digest_sees_every_change():
    tree = {"a": {"kernel": np.zeros((2, 3), np.float32)}, "b": np.ones(4, np.float32)}
    digest = trained.params_sha256(tree)
    assert digest == trained.params_sha256(jax.tree.map(np.copy, tree))
    changed = jax.tree.map(np.copy, tree)
    changed["a"]["kernel"][1, 2] = 1e-7
    assert trained.params_sha256(changed) != digest
    reshaped = {"a": {"kernel": np.zeros((3, 2), np.float32)}, "b": tree["b"]}
    assert trained.params_sha256(reshaped) != digest
    renamed = {"a": {"bias": tree["a"]["kernel"]}, "b": tree["b"]}
    assert trained.params_sha256(renamed) != digest


def test_bad_locations_are_one_line_errors(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match="workdir not found"):
        trained.load(workdir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="exactly one of"):
        trained.load(workdir=run_dir, checkpoint=run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        trained.load(workdir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        trained.load(checkpoint=str(tmp_path / "empty"))


def test_load_reads_parameters_only_whatever_the_optimizer_config(tmp_path, run_dir, monkeypatch):
    """Inference never builds an optimizer or reads its state: a run whose optimizer config
    no longer builds (unknown schedule) or builds a differently shaped state (gradient
    accumulation wraps it in MultiSteps) loads the same parameters."""
    import shutil

    from dfrec_jax.train import state as state_lib

    reference = trained.load(workdir=run_dir)
    for optim in ({"schedule": "no-such-schedule"}, {"accumulate_steps": 4, "clip_norm": 1.0}):
        copy = tmp_path / f"run_{len(optim)}"
        shutil.copytree(run_dir, copy)
        with open(copy / "config.json") as f:
            config = json.load(f)
        config["optim"].update(optim)
        with open(copy / "config.json", "w") as f:
            json.dump(config, f)

        def no_optimizer(*args, **kwargs):
            raise AssertionError("inference built an optimizer")

        monkeypatch.setattr(state_lib, "make_optimizer", no_optimizer)
        loaded = trained.load(workdir=str(copy))
        monkeypatch.undo()
        assert loaded.params_sha256 == reference.params_sha256 and loaded.step == 3
        assert set(loaded.variables) == {"params", "batch_stats"}


def test_restore_variables_names_a_shape_mismatch(run_dir):
    from dfrec_jax import inference
    from dfrec_jax.run import checkpoints

    config = trained.read_config(os.path.join(run_dir, "config.json"))
    config.model.tirm.decoder_width *= 2
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        inference.abstract_variables(inference.build_model(config)),
    )
    with checkpoints.Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=1, keep=1,
                                  read_only=True) as ckpt:  # fmt: skip
        with pytest.raises(ValueError, match=r"params/tirm/decoder_blocks_0/attn/proj/kernel: checkpoint shape \(32, 32\)"):
            ckpt.restore_variables(target, 3)



def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, run_dir, capsys):
    """A copy of the run whose newest step (4, a copy of 3) has truncated data files: load
    reads step 3 with one warning naming step 4; asking for step 4 is one line."""
    import shutil

    from dfrec_jax.run import checkpoints

    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    newest = os.path.join(copy, "checkpoints", "4")
    shutil.copytree(os.path.join(copy, "checkpoints", "3"), newest)
    for root, _, files in os.walk(os.path.join(newest, "state")):
        for f in files:
            if os.path.basename(root) == "d":
                os.truncate(os.path.join(root, f), 10)
    model = trained.load(workdir=copy)
    assert model.step == 3
    assert model.params_sha256 == trained.load(workdir=run_dir).params_sha256
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "checkpoint step 4" in err[0] and "damaged" in err[0], err
    with pytest.raises(checkpoints.CheckpointDamagedError, match="^checkpoint step 4 in "):
        trained.load(workdir=copy, step=4)
