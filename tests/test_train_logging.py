"""Training logs: TensorBoard scalars/images, the image grid, the console progress line and the
run metadata (config, hash, versions) in the workdir."""

import io
import json
import os
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dfrec_jax.run import progress
from dfrec_jax.run import workdir as workdir_lib
from dfrec_jax.train import metric_writer


def test_scalars_round_trip(tmp_path):
    with metric_writer.MetricWriter(str(tmp_path), enabled=True) as writer:
        writer.scalars(1, {"train/total": 1.5, "train/lr": jnp.float32(1e-4)})
        writer.scalars(2, {"train/total": np.float32(0.75), "train": {"lr": jnp.array([2e-4])}})
        writer.scalars(10, {"val/total": 0.5})
    (events,) = os.listdir(tmp_path / "tensorboard")  # one event file per writer
    assert events.startswith("events.out.tfevents.")
    scalars = metric_writer.read_scalars(str(tmp_path))
    assert set(scalars) == {"train/total", "train/lr", "val/total"}
    assert scalars["train/total"] == [(1, 1.5), (2, 0.75)]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2]
    np.testing.assert_allclose([v for _, v in scalars["train/lr"]], [1e-4, 2e-4], rtol=1e-6)
    assert scalars["val/total"] == [(10, 0.5)]


def test_resumed_run_appends_and_newest_value_wins(tmp_path):
    with metric_writer.MetricWriter(str(tmp_path), enabled=True) as writer:
        writer.scalars(1, {"loss": 3.0})
        writer.scalars(2, {"loss": 2.0})
    with metric_writer.MetricWriter(str(tmp_path), enabled=True) as writer:  # resumed at 1
        writer.scalars(2, {"loss": 2.5})
        writer.scalars(3, {"loss": 1.0})
    assert len(os.listdir(tmp_path / "tensorboard")) == 2
    assert metric_writer.read_scalars(str(tmp_path)) == {"loss": [(1, 3.0), (2, 2.5), (3, 1.0)]}


def test_scalars_reject_arrays(tmp_path):
    with metric_writer.MetricWriter(str(tmp_path), enabled=True) as writer:
        with pytest.raises(ValueError, match="'bad'"):
            writer.scalars(1, {"bad": np.zeros(3)})


def test_images_written_as_tensorboard_image_summaries(tmp_path):
    rng = np.random.default_rng(0)
    grid = rng.uniform(size=(10, 14, 3)).astype(np.float32)
    batch = rng.integers(0, 256, size=(2, 6, 5, 3), dtype=np.uint8)
    with metric_writer.MetricWriter(str(tmp_path), enabled=True) as writer:
        writer.images(100, {"panels": grid, "batch": batch})
    images = metric_writer.read_images(str(tmp_path))
    ((step, panels),) = images["panels"]
    assert step == 100 and panels.shape == (1, 10, 14, 3) and panels.dtype == np.uint8
    np.testing.assert_array_equal(panels[0], np.round(grid * 255).astype(np.uint8))
    ((step, stored),) = images["batch"]
    np.testing.assert_array_equal(stored, batch)
    # The form TensorBoard's image plugin reads: [width, height, png...] under plugin "images".
    import tensorflow as tf

    (path,) = tf.io.gfile.glob(str(tmp_path / "tensorboard" / "*"))
    values = [
        v for e in tf.compat.v1.train.summary_iterator(path) for v in e.summary.value
        if v.tag == "batch"
    ]  # fmt: skip
    assert values[0].metadata.plugin_data.plugin_name == "images"
    blobs = tf.make_ndarray(values[0].tensor)
    assert blobs[:2].tolist() == [b"5", b"6"] and len(blobs) == 4
    from PIL import Image

    assert Image.open(io.BytesIO(blobs[2])).format == "PNG"
    assert not metric_writer.read_scalars(str(tmp_path))


def test_tensorboards_own_reader_loads_scalars_and_images(tmp_path):
    """What `tensorboard --logdir W/tensorboard` shows: its event accumulator (the one its
    data provider uses, with the TF2 summaries migrated as TensorBoard does) finds every tag."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    grid = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    with metric_writer.MetricWriter(str(tmp_path), enabled=True) as writer:
        writer.scalars(1, {"loss": {"total": 2.0}, "lr": np.float32(1e-3)})
        writer.scalars(2, {"loss": {"total": 1.5}, "lr": np.float32(2e-3)})
        writer.images(2, {"panels": grid})
    accumulator = pea.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert set(accumulator.Tags()["tensors"]) == {"loss/total", "lr", "panels"}
    assert accumulator.SummaryMetadata("loss/total").plugin_data.plugin_name == "scalars"
    assert accumulator.SummaryMetadata("panels").plugin_data.plugin_name == "images"
    total = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
             for e in accumulator.Tensors("loss/total")]  # fmt: skip
    assert total == [(1, 2.0), (2, 1.5)]
    ((event,),) = [accumulator.Tensors("panels")]
    blobs = tensor_util.make_ndarray(event.tensor_proto)
    assert blobs[:2].tolist() == [b"5", b"6"] and len(blobs) == 4  # width, height, 2 PNGs
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(blobs[3]))), grid[1])


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metric_writer.MetricWriter(str(tmp_path), enabled=False)
    writer.scalars(1, {"loss": 1.0})
    writer.images(1, {"grid": np.zeros((4, 4, 3), np.float32)})
    writer.flush()
    writer.close()
    assert list(tmp_path.iterdir()) == []
    assert metric_writer.read_scalars(str(tmp_path)) == {}


def _fake_batch(b=5, h=6, w=4):
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8),
        "source": rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8),
        "target": rng.uniform(size=(b, h, w, 3)).astype(np.float32),
    }
    outputs = {
        "seg": rng.uniform(size=(b, h, w, 1)).astype(np.float32),
        "source": rng.uniform(size=(b, h, w, 3)).astype(np.float32),
        "target": rng.uniform(size=(b, h, w, 3)).astype(np.float32),
    }
    return batch, outputs


def test_image_grid_layout():
    batch, outputs = _fake_batch()
    grid = metric_writer.image_grid(batch, outputs, max_rows=3)
    h, w, s = 6, 4, 2
    assert grid.shape == (3 * h + 2 * s, 6 * w + 5 * s, 3) and grid.dtype == np.float32
    assert grid.min() >= 0.0 and grid.max() <= 1.0

    def block(r, c):
        return grid[r * (h + s) : r * (h + s) + h, c * (w + s) : c * (w + s) + w]

    np.testing.assert_allclose(block(0, 0), batch["image"][0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(block(0, 1), np.repeat(outputs["seg"][0], 3, -1), atol=1e-6)
    np.testing.assert_allclose(block(1, 2), batch["source"][1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(block(1, 3), outputs["source"][1], atol=1e-6)
    np.testing.assert_allclose(block(2, 4), batch["target"][2], atol=1e-6)
    np.testing.assert_allclose(block(2, 5), outputs["target"][2], atol=1e-6)
    assert np.all(grid[h : h + s] == 1.0) and np.all(grid[:, w : w + s] == 1.0)  # separators


def test_image_grid_true_mask_column_and_checks():
    batch, outputs = _fake_batch(b=2)
    batch["mask"] = (np.arange(2 * 6 * 4).reshape(2, 6, 4, 1) % 2).astype(np.float32)
    outputs["target"] = outputs["target"].copy()
    outputs["target"][0, 0, 0] = np.nan  # a diverged model still gets a picture
    grid = metric_writer.image_grid(batch, outputs)
    assert grid.shape == (2 * 6 + 2, 7 * 4 + 6 * 2, 3) and np.isfinite(grid).all()
    np.testing.assert_array_equal(grid[8:14, 36:40], np.repeat(batch["mask"][1], 3, -1))
    outputs["seg"] = outputs["seg"][:, :3]
    with pytest.raises(ValueError, match="seg"):
        metric_writer.image_grid(batch, outputs)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_line_every_n_steps_and_eta():
    clock, stream = FakeClock(), io.StringIO()
    bar = progress.Progress(300, 100, every=10, stream=stream, enabled=True, clock=clock)
    lines = {}
    for step in range(101, 301):
        clock.now += 30.0 if step == 101 else 2.0  # the first step compiles
        line = bar.update(step, {"total": 1.23456, "identity": 0.5}, images_per_step=8)
        if line is not None:
            lines[step] = line
    assert sorted(lines) == list(range(110, 301, 10))
    assert stream.getvalue().splitlines() == [lines[s] for s in sorted(lines)]
    pattern = (
        r"step (\d+)/300 \((\d+)%\) \| total 1\.235 identity 0\.5 \| ([\d.]+) s/step "
        r"([\d.]+) img/s \| ETA (\S+) \| elapsed (\S+)"
    )
    match = re.fullmatch(pattern, lines[120])
    assert match, lines[120]
    assert match.group(1, 2) == ("120", "40")
    assert float(match.group(3)) == 2.0  # compile step left out of the average
    assert float(match.group(4)) == 4.0
    assert match.group(5) == "6m00s"  # 180 steps left * 2 s
    assert match.group(6) == "1m08s"  # 30 + 19 * 2
    etas = [re.search(r"ETA (\d+)m(\d+)s|ETA (\d+)s", lines[s]) for s in sorted(lines)]
    seconds = [int(m[1] or 0) * 60 + int(m[2] or m[3]) for m in etas]
    assert seconds == sorted(seconds, reverse=True) and seconds[-1] == 0
    assert all(a - b == 20 for a, b in zip(seconds, seconds[1:]))  # 10 steps x 2 s each


def test_progress_speed_follows_recent_steps_and_sparse_calls():
    clock, stream = FakeClock(), io.StringIO()
    bar = progress.Progress(100, 0, every=10, stream=stream, enabled=True, clock=clock, window=20)
    for step in range(10, 101, 10):  # called only at report steps, like the training loop
        clock.now += 100.0 if step == 10 else (10.0 if step <= 50 else 5.0)
        line = bar.update(step)
        if step == 10:  # only the compile interval is known: it is used, not hidden
            assert "10 s/step" in line and "ETA 15m00s" in line
        if step == 80:  # the window (20 steps) only holds the faster recent steps
            assert bar.seconds_per_step == 0.5 and "ETA 10s" in line
    assert "img/s" not in stream.getvalue()
    assert stream.getvalue().splitlines()[-1].startswith("step 100/100 (100%)")


def test_progress_last_step_and_disabled():
    clock, stream = FakeClock(), io.StringIO()
    bar = progress.Progress(25, every=10, stream=stream, enabled=True, clock=clock)
    printed = [s for s in range(1, 26) if bar.update(s) is not None]
    assert printed == [10, 20, 25]
    quiet = progress.Progress(25, every=10, stream=stream, enabled=False, clock=clock)
    before = stream.getvalue()
    assert all(quiet.update(s) is None for s in range(1, 26))
    assert stream.getvalue() == before
    assert progress.format_duration(3725) == "1h02m05s"


def test_library_versions_keys():
    versions = workdir_lib.library_versions()
    keys = {
        "python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml-collections",
        "numpy", "tensorflow", "tensorflow-datasets", "dm-pix", "opencv", "platform", "devices",
    }  # fmt: skip
    assert keys <= set(versions)
    assert all(isinstance(v, str) and v for v in versions.values())
    import jax

    assert versions["jax"] == jax.__version__
    assert versions["tensorflow"] != "not installed"
    assert versions["devices"].startswith(f"{jax.device_count()} x ")


def _config(**train):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.train = ml_collections.ConfigDict(dict(steps=300, log_every=10, sizes=(1, 2)))
    config.train.update(train)
    return config


def test_config_hash_stable_and_sensitive():
    digest = workdir_lib.config_hash(_config())
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert workdir_lib.config_hash(_config()) == digest
    reordered = ml_collections.ConfigDict()
    reordered.train = _config().train
    reordered.seed = 0
    assert workdir_lib.config_hash(reordered) == digest
    assert workdir_lib.config_hash(_config().to_dict()) == digest
    assert workdir_lib.config_hash(_config(log_every=11)) != digest
    assert workdir_lib.config_hash(_config(sizes=(1, 3))) != digest


def test_save_run_metadata_and_changed_config(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    digest = workdir_lib.save_run_metadata(workdir, _config())
    assert digest == workdir_lib.config_hash(_config())
    names = {"config.json", "config_hash.txt", "versions.json"}
    assert set(os.listdir(workdir)) == names
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved == {"seed": 0, "train": {"steps": 300, "log_every": 10, "sizes": [1, 2]}}
    with open(os.path.join(workdir, "config_hash.txt")) as f:
        assert f.read().strip() == digest
    with open(os.path.join(workdir, "versions.json")) as f:
        assert json.load(f)["numpy"] == np.__version__

    # Same config again (a plain resume): nothing new, no warning.
    with caplog.at_level("WARNING"):
        assert workdir_lib.save_run_metadata(workdir, _config()) == digest
    assert set(os.listdir(workdir)) == names and not caplog.records

    # Resumed with another log interval: config.json is the new config (what later commands
    # read), the previous one kept beside it, with a warning.
    changed = _config(log_every=50)
    with caplog.at_level("WARNING"):
        new_digest = workdir_lib.save_run_metadata(workdir, changed, resumed=True)
    assert new_digest == workdir_lib.config_hash(changed) != digest
    extra = sorted(set(os.listdir(workdir)) - names)
    assert len(extra) == 1 and re.fullmatch(r"config\.\d{8}T\d{6}\.\d{6}Z\.json", extra[0])
    with open(os.path.join(workdir, extra[0])) as f:
        assert json.load(f)["train"]["log_every"] == 10
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["log_every"] == 50
    with open(os.path.join(workdir, "config_hash.txt")) as f:
        assert f.read().strip() == new_digest
    assert any(new_digest in r.getMessage() and digest in r.getMessage() for r in caplog.records)
    # The changed config again: already config.json, no second copy.
    workdir_lib.save_run_metadata(workdir, changed, resumed=True)
    assert sorted(set(os.listdir(workdir)) - names) == extra
    # A fresh run (no checkpoint: an earlier attempt failed) replaces config.json outright.
    workdir_lib.save_run_metadata(workdir, _config(log_every=7))
    assert sorted(set(os.listdir(workdir)) - names) == extra
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["log_every"] == 7
