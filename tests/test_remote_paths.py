"""Remote workdirs (gs://...): kept as URLs and written through one file layer.

A fake Cloud Storage: etils.epath's backends are mocked so that gs://bucket/... lands in a
temporary folder. Anything that turned the URL into a local path (os.path.abspath gives
"<cwd>/gs:/bucket/...") or bypassed epath would write under the current folder instead, which
the tests check stays empty. Orbax's array writes go through tensorstore's own GCS driver and
are not faked here; the trainer hands it the URL unchanged (checked below).
"""

import json
import os
import re

import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing
from PIL import Image

from dfrec_jax import images, paths, trained
from dfrec_jax.run import checkpoints
from dfrec_jax.run import workdir as workdir_lib
from dfrec_jax.train import trainer
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """(bucket root on disk, empty cwd): gs://x/y is <root>/x/y while the fixture is active."""
    root = tmp_path / "gcs"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(path):
        path = os.fspath(path)
        assert path.startswith("gs://") or path.startswith(str(tmp_path)), path
        return str(root / path[len("gs://"):]) if path.startswith("gs://") else path

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    def listing(original, path):
        return [name.rsplit("/", 1)[-1] for name in original(local(path))]

    # epath picks TensorFlow's gfile for gs:// whenever TensorFlow is installed; the fake
    # replaces the backend table, so that choice must fall through to the table.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    fns = dict.fromkeys(("exists", "isdir", "makedirs", "mkdir", "open", "remove", "stat"), one)
    fns.update(rename=two, replace=two, listdir=listing)
    with epath_testing.mock_epath(**fns):
        yield root, cwd


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
    assert paths.resolve("run") == str(tmp_path / "run")
    assert paths.join("gs://bucket/run", "checkpoints", "7") == "gs://bucket/run/checkpoints/7"
    assert paths.is_remote("s3://b/x") and not paths.is_remote("/data/run")


def test_run_metadata_lands_in_the_bucket(fake_gcs):
    root, cwd = fake_gcs
    config = tiny.tiny_config()
    digest = workdir_lib.save_run_metadata("gs://bucket/run", config)
    run = root / "bucket" / "run"
    assert json.loads((run / "config.json").read_text()) == workdir_lib.config_to_dict(config)
    assert (run / "config_hash.txt").read_text().strip() == digest
    assert "jax" in json.loads((run / "versions.json").read_text())
    # A resume with another config keeps the old one beside the new, in the bucket too.
    config.train.log_every = config.train.log_every + 1
    workdir_lib.save_run_metadata("gs://bucket/run", config, resumed=True)
    assert len(list(run.glob("config.*Z.json"))) == 1
    workdir_lib.save_json("gs://bucket/run/init.json", {"step": 0})
    assert json.loads((run / "init.json").read_text()) == {"step": 0}
    assert not any(cwd.iterdir()), "a gs:// path was written as a local folder"


def test_inference_finds_a_remote_run(fake_gcs):
    root, cwd = fake_gcs
    config = tiny.tiny_config()
    workdir_lib.save_run_metadata("gs://bucket/run", config)
    (root / "bucket" / "run" / "checkpoints" / "12").mkdir(parents=True)
    ckpt_dir, config_path = trained._locate("gs://bucket/run", None)
    assert (ckpt_dir, config_path) == ("gs://bucket/run/checkpoints", "gs://bucket/run/config.json")
    assert trained._locate(None, "gs://bucket/run/checkpoints/") == (ckpt_dir, config_path)
    assert trained.read_config(config_path).to_dict() == workdir_lib.config_to_dict(config)
    assert trainer._has_checkpoint(ckpt_dir)
    assert not trainer._has_checkpoint("gs://bucket/other/checkpoints")
    with pytest.raises(FileNotFoundError, match="gs://bucket/missing"):
        trained._locate("gs://bucket/missing", None)
    assert not any(cwd.iterdir())


def test_checkpointer_keeps_the_url(fake_gcs):
    _, cwd = fake_gcs
    with pytest.raises(FileNotFoundError, match="gs://bucket/none/checkpoints"):
        checkpoints.Checkpointer(
            "gs://bucket/none/checkpoints", save_every=1, keep=1, read_only=True
        )
    assert not any(cwd.iterdir())


def test_panels_are_written_as_bytes(fake_gcs):
    root, _ = fake_gcs
    grid = np.linspace(0, 1, 8 * 6 * 3, dtype=np.float32).reshape(8, 6, 3)
    paths.makedirs("gs://bucket/run/panels")
    paths.write_atomic("gs://bucket/run/panels/step_0000001.png", images.png_bytes(grid))
    with Image.open(root / "bucket" / "run" / "panels" / "step_0000001.png") as png:
        back = np.asarray(png.convert("RGB"), np.float32) / 255.0
    np.testing.assert_allclose(back, grid, atol=0.5 / 255)
    assert [p.name for p in (root / "bucket" / "run" / "panels").iterdir()] == [
        "step_0000001.png"
    ]


# Modules that read or write a workdir; local-only calls there would break gs:// workdirs.
_WORKDIR_MODULES = (
    "dfrec_jax/train/trainer.py",
    "dfrec_jax/run/checkpoints.py",
    "dfrec_jax/run/workdir.py",
    "dfrec_jax/train/init_from.py",
    "dfrec_jax/trained.py",
    "dfrec_jax/eval/runner.py",
)
_LOCAL_ONLY = re.compile(
    r"os\.path\.(abspath|exists|isdir|isfile)|os\.(makedirs|listdir|rename|replace|walk)\b"
    r"|(?<![.\w])open\("
)


@pytest.mark.parametrize("module", _WORKDIR_MODULES)
def test_workdir_code_uses_the_remote_safe_layer(module):
    with open(os.path.join(REPO, module)) as f:
        found = [
            f"{module}:{n}: {line.strip()}"
            for n, line in enumerate(f, 1)
            if _LOCAL_ONLY.search(line.split("#", 1)[0])
        ]
    assert not found, "local-only file calls (use dfrec_jax.paths):\n" + "\n".join(found)
