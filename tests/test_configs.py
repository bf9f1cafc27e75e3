"""Config files build, and an unknown key fails with one clear line naming it."""

import glob
import importlib
import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo
from dfrec_jax import configlib, inference, sweep

CONFIG_FILES = sorted(
    os.path.relpath(p, configlib.REPO_ROOT)
    for p in glob.glob(os.path.join(configlib.REPO_ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)
ARGS = {
    "configs/demo.py": ["dtype=bfloat16", "fusion=sequence", "variant=official"],
    "configs/official.py": ["exact=released", "exact=released_learned_threshold"],
}
GROUPS = ("data", "loss", "mesh", "model", "optim", "seed", "train")


def _module(path):
    return importlib.import_module(path[: -len(".py")].replace(os.sep, "."))


def test_there_are_config_files():
    assert {"configs/default.py", "configs/demo.py", "configs/official.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_builds(path):
    module = _module(path)
    for arg in [None, *ARGS.get(path, [])]:
        config = module.get_config(arg)
        assert set(GROUPS) <= set(config.keys()), (path, arg)
        model = inference.build_model(config)  # every model hyperparameter is a known field
        assert model.image_size == config.model.image_size
        assert config.data.batch_size > 0 and config.train.steps > 0


@pytest.mark.parametrize("path", CONFIG_FILES)
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_any_mask_ratio_builds_every_config(path, ratio):
    """--config.model.mask_ratio alone is enough: the SIRM's identity rows follow it (channel
    fusion: one per visible patch; sequence fusion keeps its own count)."""
    for arg in [None, *ARGS.get(path, [])]:
        config = sweep.apply_overrides(_module(path).get_config(arg), {"model.mask_ratio": ratio})
        model = inference.build_model(config)
        patches = (config.model.image_size // config.model.patch_size) ** 2
        visible = patches - int(patches * ratio)
        shapes = inference.abstract_variables(model)  # traces the whole forward pass
        if config.model.tirm.fusion == "channel":
            assert model.sirm.identity_tokens == visible, (path, arg)
        else:
            assert model.sirm.identity_tokens == config.model.sirm.identity_tokens > 0
        head = shapes["params"]["sirm"]["identity_head"]  # its convs output the identity rows
        widths = {leaf.shape[-1] for leaf in jax.tree.leaves(head)}
        assert model.sirm.identity_tokens in widths, (path, arg, widths)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_unknown_config_arg_names_the_key(path):
    with pytest.raises(ValueError, match="unknown config arg 'bogus'"):
        _module(path).get_config("bogus=1")


def test_official_exact_released_sets_every_released_behaviour():
    from configs import default, official

    plain, exact = official.get_config(), official.get_config("exact=released")
    released = {("ism", "encoder_padding"): "tf_same", ("ism", "encoder_dilation_start"): "smp",
                ("ism", "align_corners"): True, ("tirm", "token_indexing"): "released"}  # fmt: skip
    for (block, key), value in released.items():
        assert exact.model[block][key] == value != plain.model[block][key], key
        assert default.get_config().model[block][key] == plain.model[block][key]  # off
    assert exact.model.masking_threshold == plain.model.masking_threshold == "fixed"
    learned = official.get_config("exact=released_learned_threshold")
    assert learned.model.masking_threshold == "learned"
    # Nothing else differs: the same architecture and weights layout as plain official.py.
    for config in (exact, learned):
        for block in ("ism", "tirm"):
            for key in config.model[block]:
                if (block, key) not in released:
                    assert config.model[block][key] == plain.model[block][key], (block, key)
    with pytest.raises(ValueError, match="exact='yes'"):
        official.get_config("exact=yes")


def test_locked_config_rejects_a_new_key_by_name():
    config = demo.get_config()
    config.lock()  # as `--config` gives it (config_flags locks the config it loads)
    with pytest.raises(AttributeError, match=r'"stepz" does not exist.*Did you mean "steps"'):
        config.train.stepz = 3
    config.train.steps = 5  # existing keys stay writable
    assert config.train.steps == 5


def test_override_of_an_unknown_key_names_it():
    config = demo.get_config()
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz'.*did you mean 'steps'"):
        sweep.apply_overrides(config, {"train.stepz": 3})
    assert sweep.config_key_error(config, "train.steps") is None
    message = sweep.config_key_error(config, "optim.lr")
    assert "unknown config key 'optim.lr'" in message and "learning_rate" in message
    # ml_collections' own flag parser refuses it too (the CLI turns this into one line).
    argv = ["prog", "--config", "configs/demo.py", "--config.train.stepz=3"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "c", flag_values=values, sys_argv=argv)
    cwd = os.getcwd()
    os.chdir(configlib.REPO_ROOT)
    try:
        with pytest.raises((AttributeError, KeyError), match="stepz"):
            values(argv)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.train.stepz=3", "unknown config key 'train.stepz'"),
        ("--config.trian.steps=3", "unknown config key 'trian'"),
    ],
)
def test_cli_unknown_key_is_one_clear_line(override, expected):
    run = subprocess.run(
        [sys.executable, "-m", "dfrec_jax", "bench", "--what", "forward",
         "--config", "configs/demo.py", override],
        cwd=configlib.REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and override in errors[0] and expected in errors[0], run.stderr
    assert "did you mean" in errors[0]
