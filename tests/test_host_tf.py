"""TensorFlow is kept off the accelerators by one module (dfrec_jax/host_tf.py), which every
project module that uses TensorFlow or TFDS imports."""

import os
import re
import types

import pytest

from dfrec_jax import configlib, host_tf

_TF_IMPORT = re.compile(r"^\s*(import tensorflow|from tensorflow)", re.MULTILINE)
# `from dfrec_jax.host_tf import tf`, or host_tf among `from dfrec_jax import ...` (one line or
# a parenthesised block).
_HOST_TF = re.compile(
    r"^\s*from dfrec_jax(\.host_tf import tf\b| import (\([^)]*|[^\n(]*)\bhost_tf\b)", re.MULTILINE
)


def _library_files():
    for package in ("dfrec_jax", "data_pipelines", "configs"):
        for folder, _, files in os.walk(os.path.join(configlib.REPO_ROOT, package)):
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_every_tensorflow_user_goes_through_host_tf():
    users, missing = [], []
    for path in _library_files():
        if path.endswith(os.path.join("dfrec_jax", "host_tf.py")):
            continue
        text = open(path).read()
        if _TF_IMPORT.search(text):
            users.append(path)
            if not _HOST_TF.search(text):
                missing.append(os.path.relpath(path, configlib.REPO_ROOT))
    assert len(users) >= 8  # the scan sees the pipeline, the builders and the workdir code
    assert not missing, f"import TensorFlow through dfrec_jax.host_tf in: {missing}"


class _FakeConfig:
    def __init__(self, error=None):
        self.calls, self.error = [], error

    def set_visible_devices(self, devices, device_type):
        self.calls.append((devices, device_type))
        if self.error:
            raise self.error


def test_hide_accelerators_hides_gpu_and_tpu_and_warns_when_too_late(caplog):
    config = _FakeConfig()
    host_tf.hide_accelerators(types.SimpleNamespace(config=config))
    assert config.calls == [([], "GPU"), ([], "TPU")]
    late = _FakeConfig(RuntimeError("Visible devices cannot be modified after being initialized"))
    with caplog.at_level("WARNING"):
        host_tf.hide_accelerators(types.SimpleNamespace(config=late))
    assert "already initialised" in caplog.text
    with pytest.raises(TypeError):  # anything else is not swallowed
        host_tf.hide_accelerators(types.SimpleNamespace(config=_FakeConfig(TypeError("x"))))
    # This process: TensorFlow sees no accelerator.
    assert host_tf.tf.config.get_visible_devices("GPU") == []
