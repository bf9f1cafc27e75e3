"""The data entry points: identity splits, strict image reading, the dataset factory and the
`build_data` command (split sizes and skip counts printed as JSON)."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import demo
from data_pipelines import datasets, skips, splits
from dfrec_jax import configlib


def test_identity_split_is_stable_and_proportional():
    people = sorted(splits.scan_lfw(configlib.lfw_dir()))
    first = [splits.identity_split(p) for p in people]
    assert first == [splits.identity_split(p) for p in people]
    share = {name: first.count(name) / len(first) for name in splits.SPLITS}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["test"] - 0.1) < 0.02
    assert splits.identity_split("x", salt="a") in splits.SPLITS
    with pytest.raises(ValueError, match="sum"):
        splits.identity_split("x", fractions=(0.5, 0.5, 0.5))


def test_read_rgb8_rejects_everything_but_8bit_rgb(tmp_path):
    face = np.full((8, 8, 3), 200, np.uint8)
    Image.fromarray(face).save(tmp_path / "ok.png")
    assert np.array_equal(skips.read_rgb8(str(tmp_path / "ok.png")), face)
    cv2.imwrite(str(tmp_path / "rgb16.png"), face.astype(np.uint16) * 257)
    Image.fromarray(face[..., 0]).save(tmp_path / "gray.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    expected = {
        "rgb16.png": "16-bit PNG",
        "gray.png": "mode L",
        "empty.jpg": "empty file",
        "text.jpg": "not an image",
        "absent.jpg": "missing file",
    }
    counter = skips.SkipCounter("t")
    for name, reason in expected.items():
        with pytest.raises(skips.BadImage, match=reason):
            skips.read_rgb8(str(tmp_path / name))
        assert skips.try_read_rgb8(str(tmp_path / name), counter) is None
    assert counter.total == len(expected)
    assert "5 skipped" in str(counter)


def test_factory_errors_are_one_line():
    data = demo.get_config().data
    data.dataset = "nope"
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        datasets.get_builder(data)
    data.dataset = "celeba_megafs"
    data.methods = ("FTM", "XYZ")
    with pytest.raises(ValueError, match="unknown methods"):
        datasets.get_builder(data)
    data.methods = ()
    data.manual_dir = "/no/such/download"
    with pytest.raises(splits.DatasetLayoutError, match="/no/such/download.*expected layout"):
        datasets.prepare(data)


def test_factory_maps_config_fields():
    data = ml_collections.ConfigDict(demo.get_config().data)
    data.update(dataset="celeba_megafs", methods=("lcr",), image_size=64)
    config = datasets.get_builder(data).builder_config
    assert config.image_size == 64 and [m for m, _ in config.method_dirs] == ["LCR"]
    data.update(dataset="lfw_swap", max_people=3, seed=5, methods=())
    config = datasets.get_builder(data).builder_config
    assert (config.max_people, config.seed, config.image_size) == (3, 5, 64)
    assert (config.morph_fraction, config.morph_alpha) == (0.6, (0.6, 0.8))  # the defaults
    data.update(morph_fraction=0.8, morph_alpha=(0.5, 0.7))
    config = datasets.get_builder(data).builder_config
    assert (config.morph_fraction, config.morph_alpha) == (0.8, (0.5, 0.7))


def test_build_data_command_prints_split_sizes_and_skips(tmp_path):
    """`python -m dfrec_jax build_data` on a 4-person LFW tree with one corrupt file."""
    source = configlib.lfw_dir()
    people = [p for p, paths in splits.scan_lfw(source).items() if len(paths) >= 2]
    train = [p for p in people if splits.identity_split(p) == "train"][:3]
    test = [p for p in people if splits.identity_split(p) == "test"][:2]
    lfw = tmp_path / "lfw"
    for person in train + test:
        os.makedirs(lfw / person)
        for path in splits.scan_lfw(source)[person][:2]:
            shutil.copy(path, lfw / person)
    (lfw / train[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff junk")
    command = [
        sys.executable, "-m", "dfrec_jax", "build_data", "--config", "configs/demo.py",
        f"--config.data.lfw_dir={lfw}", f"--config.data.data_dir={tmp_path / 'tfds'}",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=configlib.REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # 6 train images -> 6 pristine + 6 forgeries; 4 test images -> 4 + 4; no validation people.
    assert report["splits"] == {"train": 12, "test": 8}
    assert report["skipped"]["train"] == {"not an image": 1}
    assert report["dataset"].startswith("lfw_swap/res112")
    # Not a terminal: no progress-bar line per update (TFDS's tqdm bars are off).
    assert "examples/s" not in done.stderr and len(done.stderr.splitlines()) < 20, done.stderr


def test_dataset_and_method_config_args_select_the_data():
    from configs import default, official

    for module in (default, official):
        config = module.get_config("dataset=celeba_megafs,method=FTM")
        assert config.data.dataset == "celeba_megafs" and tuple(config.data.methods) == ("FTM",)
        builder_config = datasets.get_builder(config.data).builder_config
        assert [m for m, _ in builder_config.method_dirs] == ["FTM"]
    assert tuple(default.get_config().data.methods) == ()
    with pytest.raises(ValueError, match="unknown methods"):
        datasets.get_builder(default.get_config("dataset=ffhq_e4s,method=FTM").data)


@pytest.mark.parametrize("dataset", ["faceforensics", "celeba_megafs", "ffhq_e4s", "lfw_swap"])
def test_every_builder_option_is_a_config_key_with_the_builders_default(dataset):
    """configs/default.py builder_options mirrors each builder's config (without importing the
    builders: configs load where TensorFlow is absent); only FF++ frames_per_video differs."""
    from configs import default

    data = default.get_config(f"dataset={dataset}").data
    module = datasets._builder_module(dataset)
    names = datasets.option_names(dataset)
    if dataset == "lfw_swap":  # its options are config.data's common keys
        assert set(names) <= set(data.keys()), set(names) - set(data.keys())
        return
    assert sorted(default.builder_options(dataset)) == sorted(names)
    for name in names:
        want = getattr(module.DEFAULT_CONFIG, name)
        if (dataset, name) == ("faceforensics", "frames_per_video"):
            assert (want, data[name]) == (8, default.PAPER_FRAMES_PER_VIDEO)  # paper scale
            continue
        assert tuple(data[name]) == tuple(want) if isinstance(want, tuple) else data[name] == want


def test_builder_options_reach_the_builder_from_the_command_line():
    from configs import default

    config = default.get_config("dataset=faceforensics")
    builder = datasets.get_builder(config.data).builder_config
    assert (builder.compression, builder.frames_per_video) == ("c23", 140)
    assert builder.methods == ("Deepfakes", "FaceShifter", "FaceSwap")  # identity swaps only
    config.data.update(compression="c40", frames_per_video=30, mask_dilate=2)
    builder = datasets.get_builder(config.data).builder_config
    assert (builder.compression, builder.frames_per_video, builder.mask_dilate) == ("c40", 30, 2)
    megafs = default.get_config("dataset=celeba_megafs").data
    megafs.update(split_fractions=(0.7, 0.1, 0.2), identity_files=("ids.txt",))
    builder = datasets.get_builder(megafs).builder_config
    assert builder.split_fractions == (0.7, 0.1, 0.2) and builder.identity_files == ("ids.txt",)


def test_faceforensics_compression_and_methods_are_checked(caplog):
    from data_pipelines.builders import faceforensics

    assert faceforensics.make_config(compression="raw").compression == "raw"
    with pytest.raises(ValueError, match="lossless folder is `raw`"):
        faceforensics.make_config(compression="c0")
    with pytest.raises(ValueError, match="non-empty subset"):
        faceforensics.make_config(methods=("Deepfakes", "DeepFakeDetection"))
    with caplog.at_level("WARNING"):
        config = faceforensics.make_config(methods=("Deepfakes", "Face2Face"))
    assert config.methods == ("Deepfakes", "Face2Face")
    assert "Face2Face reenact expressions" in caplog.text


def test_build_data_fails_only_on_the_missing_download():
    """The issue's command line: every option is accepted; the one error is the folder."""
    command = [
        sys.executable, "-m", "dfrec_jax", "build_data",
        "--config", "configs/default.py:dataset=faceforensics",
        "--config.data.compression=c40", "--config.data.frames_per_video=140",
        "--config.data.manual_dir=MISSING",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=configlib.REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("error: faceforensics: folder not found: 'MISSING'"), errors


def test_pair_split_measurement_accounts_for_every_swap():
    from data_pipelines import measure_pair_splits

    rows = measure_pair_splits.measure(images=3000, people=600)
    assert sum(r["targets"] for r in rows) == 3000  # every swap in exactly one split
    for r in rows:
        assert r["pair_keeps"] + r["pair_drops"] == r["targets"] == r["target_keeps"]
    held_out = [r for r in rows if r["split"] != "train"]
    assert all(r["pair_keeps"] < 0.25 * r["targets"] for r in held_out)  # ~f: 10% kept
