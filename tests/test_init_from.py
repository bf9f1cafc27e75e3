"""Pretrained initialisation (`config.init`, dfrec_jax/train/init_from.py) on tiny models.

Checkpoints are written in the sources' own layouts with the PyTorch references of
tests/test_convert_backbones.py and tests/test_convert_released.py (random weights, tiny
widths). The fresh states are random host values placed with the run's shardings (no model
init compile, which takes 15-35 s on 2 busy cores), mostly on a mesh where some leaves really
are split over "fsdp".
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import tests.test_convert_backbones as ref
from configs import default, demo, official
from dfrec_jax import inference, trained
from dfrec_jax.models.efficientnet import B0_STAGES, scaled_channels, scaled_repeats
from dfrec_jax.pretrained import convert_backbones as cb
from dfrec_jax.pretrained import convert_released as cr
from dfrec_jax.run import checkpoints
from dfrec_jax.train import init_from, sharding, trainer
from dfrec_jax.train import state as state_lib
from tests import tiny
from tests.test_convert_released import released, small_config  # noqa: F401 (fixture)

torch = ref.torch


@pytest.fixture(autouse=True)
def _torch_required():
    if torch is None:
        pytest.fail("these tests write checkpoints with PyTorch: pip install torch==2.13.0",
                    pytrace=False)  # fmt: skip
    torch.manual_seed(0)
    torch.set_num_threads(1)


def sharded_config(config=None):
    config = config or tiny.tiny_config()
    config.mesh.update(data=2, fsdp=4, fsdp_min_size=64)  # some leaves split over "fsdp"
    return config


def fake_state(config, seed=0):
    """A TrainState of random host values with the shardings `create_train_state` gives."""
    model = inference.build_model(config)
    mesh = sharding.make_mesh(config.mesh)
    tx = state_lib.make_optimizer(config.optim, config.train.steps, mesh)
    abstract = state_lib.abstract_train_state(config, model, tx)
    shardings = state_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    rng = np.random.default_rng(seed)

    def leaf(a, s):
        value = rng.normal(size=a.shape) if np.issubdtype(a.dtype, np.floating) else 0
        return jax.device_put(np.asarray(np.broadcast_to(value, a.shape), a.dtype), s)

    return jax.tree.map(leaf, abstract, shardings), mesh


def flat(state) -> dict:
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return init_from._flat(variables)


def assert_same_layout(before, after):
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)


def check_merge(before, after, expected: dict):
    """`expected` leaves replaced exactly; every other leaf (and the opt state) unchanged."""
    assert_same_layout(before, after)
    old, new = flat(before), flat(after)
    assert set(expected) <= set(new)
    for key, value in new.items():
        want = expected.get(key, old[key])
        np.testing.assert_array_equal(value, want, err_msg=key)
    for a, b in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state)):
        np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))


# ----------------------------------------------------------------------------- checkpoints


def timm_trunk(width, depth, eps=1e-5):
    """timm-named EfficientNet scaled like our ISM encoder, random BN statistics."""
    net = torch.nn.Module()
    stem = scaled_channels(32, width)
    net.conv_stem = torch.nn.Conv2d(3, stem, 3, 2, 1, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(stem, eps=eps)
    stages, cin = [], stem
    for expand, k, s, cout, repeats in B0_STAGES:
        cout, blocks = scaled_channels(cout, width), []
        for i in range(scaled_repeats(repeats, depth)):
            blocks.append(ref.TimmBlock(cin, cout, expand, k, s if i == 0 else 1, eps))
            cin = cout
        stages.append(torch.nn.Sequential(*blocks))
    net.blocks = torch.nn.Sequential(*stages)
    net.classifier = torch.nn.Linear(cin, 10)  # a head the converter ignores
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return ref.state_of(net)


@pytest.fixture(scope="module")
def ism_checkpoint(tmp_path_factory):
    ism = tiny.tiny_config().model.ism
    state = timm_trunk(ism.width_coefficient, ism.depth_coefficient)
    return ref.save(state, tmp_path_factory.mktemp("ism") / "efficientnet_tiny.pth")


def vit_state(dim=32):
    """A timm ViT with the tiny TIRM encoder's shape (32 px, patch 8, width 32, 1 block)."""
    return ref.state_of(ref.TimmViT(image=32, patch=8, dim=dim, depth=1, heads=2, hidden=64))


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    """An MAE pretraining file: {"model": timm-named encoder + an MAE decoder part}."""
    state = vit_state()
    state["decoder_embed.weight"] = torch.zeros(16, 32)
    return ref.save({"model": state, "epoch": 799}, tmp_path_factory.mktemp("mae") / "mae.pth")


# ----------------------------------------------------------------------------- tests


def test_every_config_has_init_off():
    for module in (default, demo, official):
        init = module.get_config().init
        assert init_from.enabled(init) == []
        assert init.ism_encoder_naming in cb.EFFICIENTNET_NAMINGS
        assert init.tirm_encoder_naming in cb.VIT_NAMINGS


def test_ism_encoder_from_timm_checkpoint(ism_checkpoint):
    config = sharded_config()
    config.init.update(ism_encoder=ism_checkpoint, ism_encoder_naming="timm")
    before, mesh = fake_state(config)
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(before.params))  # fmt: skip
    after, applied = init_from.apply(config, before, mesh)

    converted, report = cb.convert_efficientnet_b0(
        ism_checkpoint, "timm", width_coefficient=0.25, depth_coefficient=0.25
    )
    assert report.missing == [] and report.unexpected == []
    expected = init_from._flat(converted, "ism/encoder")
    check_merge(before, after, expected)
    (item,) = applied
    assert item.source == "ism_encoder" and item.sha256 == init_from.file_sha256(ism_checkpoint)
    assert item.arrays == len(expected) and item.kept_init == []
    assert item.batch_stats_arrays == sum(k.startswith("batch_stats/") for k in expected) > 0
    assert item.parameters == sum(v.size for k, v in expected.items() if k.startswith("params/"))
    assert "eps" in item.line()  # timm's BatchNorm epsilon differs from ours: said


def test_tirm_encoder_from_mae_checkpoint(mae_checkpoint):
    config = sharded_config()
    config.init.tirm_encoder = mae_checkpoint  # naming "mae" is the default
    before, mesh = fake_state(config)
    after, (item,) = init_from.apply(config, before, mesh)
    converted, _ = cb.convert_vit(mae_checkpoint, "mae", 32, 8, pos_embed="sincos")
    expected = init_from._flat(converted, "tirm/encoder")
    check_merge(before, after, expected)
    encoder = [k for k in flat(before) if k.startswith("params/tirm/encoder/")]
    assert sorted(expected) == sorted(encoder) and item.kept_init == []
    # The tiny TIRM uses a fixed sin-cos table: the learned one has nowhere to go.
    assert item.unused_checkpoint_keys == ["pos_embed"] and item.batch_stats_arrays == 0


def test_released_checkpoint_fills_the_whole_model(released):  # noqa: F811
    path, _, _ = released
    config = small_config()
    config.mesh.update(data=4, fsdp=2, fsdp_min_size=4096)
    config.init.released = path
    before, mesh = fake_state(config)
    after, (item,) = init_from.apply(config, before, mesh)
    converted, _ = cr.convert_released_checkpoint(path, config)
    expected = {k: v for k, v in init_from._flat(converted).items() if k not in cr.EXPECTED_MISSING}
    check_merge(before, after, expected)  # the classifier the release lacks keeps its init
    assert item.kept_init == sorted(cr.EXPECTED_MISSING)
    assert item.arrays == len(flat(before)) - len(cr.EXPECTED_MISSING)


@pytest.fixture(scope="module")
def tiny_run_model(tiny_run):
    """The shared tiny run (conftest: one checkpoint, step 3, saved on an 8 x 1 mesh) as
    `trained.load` reads it: the reference for what a restore must give."""
    return trained.load(workdir=tiny_run)


def test_workdir_copies_params_and_batch_stats_of_an_earlier_run(tiny_run, tiny_run_model):
    config = sharded_config()  # a 2 x 4 mesh
    config.init.workdir = tiny_run
    before, mesh = fake_state(config)
    after, (item,) = init_from.apply(config, before, mesh)
    check_merge(before, after, init_from._flat(jax.device_get(tiny_run_model.variables)))
    assert int(after.step) == 0  # the step (and optimizer state) are not taken
    assert item.details["checkpoint_step"] == 3 and item.kept_init == []
    assert item.sha256 == tiny_run_model.params_sha256


def test_resumed_run_ignores_init_and_fresh_run_applies_it(
    tmp_path, mae_checkpoint, tiny_run, tiny_run_model, monkeypatch
):
    config = tiny.tiny_config()
    config.init.tirm_encoder = mae_checkpoint
    model = inference.build_model(config)
    random_init, mesh = fake_state(config)
    # The fresh state is created as the trainer does, minus the init compile (seconds here).
    monkeypatch.setattr(state_lib, "create_train_state", lambda *args: random_init)
    tx = state_lib.make_optimizer(config.optim, config.train.steps, mesh)
    abstract = state_lib.abstract_train_state(config, model, tx)
    shardings = state_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    converted, _ = cb.convert_vit(mae_checkpoint, "mae", 32, 8, pos_embed="sincos")
    expected = init_from._flat(converted, "tirm/encoder")

    def initial(workdir):
        with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                                      keep=1) as ckpt:  # fmt: skip
            return trainer._initial_state(
                config, str(workdir), model, tx, mesh, abstract, shardings, ckpt
            )

    fresh, data_state = initial(tmp_path / "fresh")
    assert data_state is None and int(fresh.step) == 0
    check_merge(random_init, fresh, expected)
    record = json.load(open(tmp_path / "fresh" / "init.json"))
    (source,) = record["sources"]
    assert source["source"] == "tirm_encoder" and source["path"] == mae_checkpoint
    assert source["sha256"] == init_from.file_sha256(mae_checkpoint)
    assert source["arrays"] == len(expected) and source["unused_checkpoint_keys"] == 1

    # A workdir with a checkpoint resumes from it: the init source is not applied again.
    folder = shutil.copytree(tiny_run, tmp_path / "resumed")
    resumed, data_state = initial(folder)
    assert int(resumed.step) == 3 and data_state == {"next_batch": 3}
    assert not os.path.exists(os.path.join(folder, "init.json"))
    saved = init_from._flat(jax.device_get(tiny_run_model.variables))
    assert flat(resumed).keys() == saved.keys()
    for key, value in flat(resumed).items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)


def _one_line_error(config, state, mesh, *needles):
    with pytest.raises(init_from.InitError) as err:
        init_from.apply(config, state, mesh)
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_sources_give_one_line_errors(tmp_path, ism_checkpoint):
    config = sharded_config()
    state, mesh = fake_state(config)

    config.init.tirm_encoder = str(tmp_path / "missing.pth")
    _one_line_error(config, state, mesh, "init.tirm_encoder: no file at", "missing.pth")

    wide = ref.save(vit_state(dim=64), tmp_path / "wide.safetensors")
    config.init.update(tirm_encoder=wide, tirm_encoder_naming="timm")
    _one_line_error(config, state, mesh, "shape mismatch at params/tirm/encoder/", "(64",
                    "model (32")  # fmt: skip

    full_b0 = ref.save(ref.state_of(ref.TimmEfficientNetB0()), tmp_path / "b0.safetensors")
    config.init.update(tirm_encoder="", ism_encoder=full_b0, ism_encoder_naming="timm")
    _one_line_error(config, state, mesh, "init.ism_encoder", "conv_stem.weight", "(3, 3, 3, 32)",
                    "(3, 3, 3, 8)")  # fmt: skip

    config.init.update(ism_encoder=ism_checkpoint, ism_encoder_naming="tf")
    _one_line_error(config, state, mesh, "init.ism_encoder_naming='tf'")

    config.init.update(ism_encoder="", released=ism_checkpoint, workdir=str(tmp_path))
    _one_line_error(config, state, mesh, "init.released and init.workdir")

    config.init.update(released="")
    _one_line_error(config, state, mesh, "init.workdir: no checkpoints folder")
