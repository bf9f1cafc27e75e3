"""The lfw_swap TFDS builder end to end on a tiny LFW-layout tree of real faces plus bad files:
splits, mask/label consistency of every example, determinism, skip counts, 224, errors."""

import glob
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import samples, skips, splits, swap
from data_pipelines.builders import lfw_swap
from dfrec_jax import configlib

# A person folder holding only bad files, named so that it falls in the train split.
ONLY_BAD_PERSON = next(
    name for name in (f"Zz_Only_Bad_{i}" for i in range(100))
    if splits.identity_split(name) == "train"
)  # fmt: skip


def _pick_people(root):
    """People by split: train 3 with several images + 2 singles, validation 1 + 1, test 1."""
    want = {
        ("train", True): 3,
        ("train", False): 2,
        ("validation", True): 1,
        ("validation", False): 1,
        ("test", False): 1,
    }
    picked = {}
    for person, paths in splits.scan_lfw(root).items():
        slot = (splits.identity_split(person), len(paths) > 1)
        if want.get(slot, 0) > 0:
            want[slot] -= 1
            picked[person] = paths[:2]
        if not any(want.values()):
            return picked
    raise AssertionError(f"not enough people in {root} for the fixture: {want}")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A small LFW tree: 13 real images of 8 people, and every kind of bad file."""
    root = configlib.lfw_dir()
    assert os.path.isdir(root), f"real LFW faces needed at {root} (or set DFREC_LFW_DIR)"
    out = tmp_path_factory.mktemp("lfw")
    people = _pick_people(root)
    for person, paths in people.items():
        os.makedirs(out / person)
        for path in paths:
            shutil.copy(path, out / person)
    host = next(p for p, paths in people.items() if splits.identity_split(p) == "train")
    face = Image.open(people[host][0])
    raw = open(people[host][0], "rb").read()
    bad = out / host
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (bad / "text.jpg").write_text("not a picture\n")
    face.convert("L").save(bad / "gray.jpg")
    face.convert("CMYK").save(bad / "cmyk.jpg")
    Image.fromarray(np.asarray(face.convert("L")).astype(np.uint16) * 257).save(bad / "deep.png")
    # 16-bit RGB: Pillow opens it as mode "RGB" (dropping the low byte); it must still be caught.
    cv2.imwrite(str(bad / "deep_rgb.png"), np.asarray(face).astype(np.uint16) * 257)
    face.resize((100, 100)).save(bad / "small.jpg")
    Image.new("RGB", (112, 112), (128, 128, 128)).save(bad / "flat.jpg")  # no face in it
    os.makedirs(out / ONLY_BAD_PERSON)
    (out / ONLY_BAD_PERSON / "a.jpg").write_bytes(b"")
    (out / ONLY_BAD_PERSON / "b.jpg").write_text("nope")
    return {"root": str(out), "people": people}


def _build(tree, data_dir, **kwargs):
    config = lfw_swap.make_config(lfw_dir=tree["root"], **kwargs)
    builder = lfw_swap.LfwSwap(config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def _examples(builder):
    return {
        split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        for split in builder.info.splits
    }


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    builder = _build(tree, tmp_path_factory.mktemp("tfds"))
    return builder, _examples(builder)


def test_split_sizes_and_identity_disjoint(tree, built):
    builder, examples = built
    assert set(examples) == {"train", "validation", "test"}
    images = {s: sum(len(p) for n, p in tree["people"].items() if splits.identity_split(n) == s)
              for s in splits.SPLITS}  # fmt: skip
    # A pristine example and a forgery per usable image; the lone test person has no partner.
    assert len(examples["train"]) == 2 * images["train"]
    assert len(examples["validation"]) == 2 * images["validation"]
    assert len(examples["test"]) == images["test"] == 1
    ids = {}
    for split, items in examples.items():
        ids[split] = {_text(e[k]) for e in items for k in ("source_id", "target_id")}
        assert ids[split] <= {p for p in tree["people"] if splits.identity_split(p) == split}
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]


def test_every_example_is_consistent(tree, built):
    _, examples = built
    methods = set()
    for items in examples.values():
        for e in items:
            assert e["image"].shape == (112, 112, 3) and e["mask"].shape == (112, 112, 1)
            assert e["face_mask"].any() and e["landmarks"].shape == (68, 2)
            assert e["alpha"].dtype == np.float32 and e["alpha"].shape == ()
            if e["label"] == 0:
                assert _text(e["method"]) == "pristine"
                assert (e["mask"] == 255).all()  # its own source: every pixel carries it
                assert e["alpha"] == 0.0
                np.testing.assert_array_equal(e["source"], e["image"])
                np.testing.assert_array_equal(e["target"], e["image"])
                assert e["source_id"] == e["target_id"]
                assert _text(e["mask_source"]) == "pristine"
            else:
                methods.add(_text(e["method"]))
                assert _text(e["mask_source"]) == "generated"  # the builder made the swap
                outside = e["mask"][..., 0] == 0
                assert (~outside).sum() > 500
                np.testing.assert_array_equal(e["image"][outside], e["target"][outside])
                inside = e["mask"][..., 0] >= 128
                assert np.abs(e["image"].astype(int) - e["target"])[inside].mean() > 4
                assert e["source_id"] != e["target_id"]
                assert not np.array_equal(e["source"], e["target"])
                if _text(e["method"]) in swap.MORPH_METHODS:
                    assert swap.MORPH_ALPHA[0] <= e["alpha"] <= swap.MORPH_ALPHA[1]
                else:
                    assert e["alpha"] == 1.0
    assert methods <= set(swap.METHODS)
    assert methods & set(swap.MORPH_METHODS) and methods & set(swap.SPLICE_METHODS)  # both kinds


def test_images_are_the_lfw_files_bit_for_bit(tree, built):
    """PNG round trip and colour order: every pristine image is one of its person's files."""
    _, examples = built
    for items in examples.values():
        for e in items:
            if e["label"] == 0:
                files = [skips.read_rgb8(p) for p in tree["people"][_text(e["target_id"])]]
                assert any(np.array_equal(e["image"], f) for f in files)


def test_skips_are_counted_with_reasons(tree, built):
    builder, _ = built
    summary = builder.skip_summary()
    assert set(summary) == {"train", "validation", "test"}
    assert summary["test"] == {"missing partner": 1}
    assert summary["validation"] == {}
    total = {}
    for reasons in summary.values():
        for reason, n in reasons.items():
            total[reason] = total.get(reason, 0) + n
    assert total == {
        "empty file": 2,
        "not an image": 2,
        "corrupt or truncated (OSError)": 1,
        "not 8-bit RGB (mode L)": 1,
        "not 8-bit RGB (mode CMYK)": 1,
        "not 8-bit RGB (mode I;16)": 1,
        "not 8-bit RGB (16-bit PNG)": 1,
        "unexpected size (not 112x112)": 1,
        "no face found": 1,
        "missing partner": 1,
    }
    # Persisted with the dataset: a fresh builder (another lfw_dir path, same content) reads it.
    again = lfw_swap.LfwSwap(
        config=lfw_swap.make_config(lfw_dir="/elsewhere"), data_dir=builder.data_dir_root
    )
    assert again.is_prepared() and again.skip_summary() == summary


def test_deterministic_for_a_seed(tree, built, tmp_path):
    _, examples = built
    again = _examples(_build(tree, tmp_path / "same"))
    for split, items in examples.items():
        assert len(again[split]) == len(items)
        for a, b in zip(items, again[split]):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    other = _examples(_build(tree, tmp_path / "other", seed=1))
    forged = [e for e in examples["train"] if e["label"] == 1]
    forged_other = [e for e in other["train"] if e["label"] == 1]
    assert len(forged) == len(forged_other)
    key = lambda e: e["target"].tobytes()  # noqa: E731
    pairs = zip(sorted(forged, key=key), sorted(forged_other, key=key))
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in pairs)


def test_224_resizes_and_stays_exact(tree, tmp_path):
    builder = _build(tree, tmp_path, image_size=224)
    assert builder.builder_config.name == "res224"
    items = _examples(builder)["train"]
    assert len(items) > 0
    for e in items:
        assert e["image"].shape == (224, 224, 3) and e["mask"].shape == (224, 224, 1)
        assert e["landmarks"].max() > 150  # scaled to the 224 frame
        outside = e["mask"][..., 0] == 0
        np.testing.assert_array_equal(e["image"][outside], e["target"][outside])
        assert (e["label"] == 0) == (e["mask"] == 255).all()


def test_missing_folder_is_one_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_lfw")
    builder = lfw_swap.LfwSwap(
        config=lfw_swap.make_config(lfw_dir=missing), data_dir=str(tmp_path / "d")
    )
    with pytest.raises(splits.DatasetLayoutError, match="no_such_lfw.*expected layout"):
        builder.download_and_prepare()


def test_config_names_follow_content_not_path():
    assert lfw_swap.make_config().name == "res112"
    assert lfw_swap.make_config(224, lfw_dir="/a").name == "res224"
    assert lfw_swap.make_config(lfw_dir="/b").name == "res112"
    names = {
        lfw_swap.make_config(seed=1).name,
        lfw_swap.make_config(max_people=200).name,
        lfw_swap.make_config(forgeries_per_image=2).name,
        lfw_swap.make_config(methods=("hull_blend",)).name,
        lfw_swap.make_config(methods=tuple(reversed(swap.METHODS))).name,
        lfw_swap.make_config(morph_fraction=0.5).name,
        lfw_swap.make_config(morph_alpha=(0.5, 0.7)).name,
    }
    assert len(names) == 7 and all(n.startswith("res112-") and len(n) == 15 for n in names)
    # Equal content, equal name: floats and lists are normalised.
    assert lfw_swap.make_config(morph_alpha=[0.6, 0.8], morph_fraction=0.6).name == "res112"
    for bad in ({"morph_fraction": 1.5}, {"morph_alpha": (0.0, 0.5)}, {"morph_alpha": (0.9, 0.2)}):
        with pytest.raises(ValueError, match="morph"):
            lfw_swap.make_config(**bad)
    assert lfw_swap.make_config(seed=1).name == lfw_swap.make_config(seed=1, lfw_dir="/x").name
    with pytest.raises(ValueError, match="methods"):
        lfw_swap.make_config(methods=("nope",))
    with pytest.raises(ValueError, match="make_config"):
        lfw_swap.LfwSwap(config=lfw_swap.LfwSwapConfig(name="res112", seed=3), data_dir="/tmp")


def test_default_forgeries_are_mostly_morphs():
    """pick_method: a morph with probability morph_fraction when both kinds are listed."""
    config = lfw_swap.make_config()
    assert config.methods == swap.METHODS and set(swap.MORPH_METHODS) <= set(config.methods)
    picks = [lfw_swap.pick_method(config.methods, config.morph_fraction,
                                  np.random.default_rng([0, k])) for k in range(2000)]  # fmt: skip
    share = np.mean([m in swap.MORPH_METHODS for m in picks])
    assert config.morph_fraction == 0.6 and abs(share - 0.6) < 0.04
    assert set(picks) == set(swap.METHODS)  # every splice still occurs
    splices_only = {lfw_swap.pick_method(swap.SPLICE_METHODS, 0.6, np.random.default_rng(k))
                    for k in range(50)}  # fmt: skip
    assert splices_only == set(swap.SPLICE_METHODS)
    assert lfw_swap.pick_method(("morph_blend",), 0.0, np.random.default_rng(0)) == "morph_blend"


def test_plausibility_rejects_non_faces(built):
    _, examples = built
    real = [e["landmarks"] for e in examples["train"] if e["label"] == 0]
    assert all(lfw_swap.plausible_landmarks(points) for points in real)
    mean_face = np.mean(real, axis=0)
    assert not lfw_swap.plausible_landmarks(mean_face * 0.3)  # too small
    assert not lfw_swap.plausible_landmarks(mean_face + 40)  # off the alignment / the image
    assert not lfw_swap.plausible_landmarks(112 - mean_face)  # upside down
    assert not lfw_swap.plausible_landmarks(np.full((68, 2), np.nan))


def test_samples_for_recover_are_the_stored_examples(built, tmp_path):
    builder, examples = built
    split = max(examples, key=lambda s: len(examples[s]))
    forged = sum(int(ex["label"]) == 1 for ex in examples[split])
    records = samples.write_samples(builder, split, str(tmp_path), num_forged=2, num_pristine=1)
    labels = [r["label"] for r in records]
    assert labels.count("forgery") == min(2, forged) and labels.count("pristine") <= 1
    for record in records:
        ex = examples[split][record["index"]]
        assert record["method"] == (_text(ex["method"]) or "pristine")
        assert record["source_id"] == _text(ex["source_id"])
        stem = os.path.splitext(os.path.basename(record["input"]))[0]
        stored = np.asarray(Image.open(tmp_path / record["input"]))
        np.testing.assert_array_equal(stored, ex["image"])  # PNG: lossless
        for key in ("source", "target"):
            truth = np.asarray(Image.open(tmp_path / "truth" / f"{stem}_{key}.png"))
            np.testing.assert_array_equal(truth, ex[key])
    listed = json.loads((tmp_path / "samples.json").read_text())["samples"]
    assert listed == records
    with pytest.raises(ValueError, match="no split 'nope'"):
        samples.write_samples(builder, "nope", str(tmp_path))


def test_raw_lfw_is_refused_before_anything_is_cached(tree, tmp_path):
    """Raw 250x250 LFW (or any folder without one usable face): one line, and no empty dataset
    left prepared for the next run to reuse."""
    raw = tmp_path / "raw_lfw"
    for person, paths in list(tree["people"].items())[:3]:
        os.makedirs(raw / person)
        Image.open(paths[0]).resize((250, 250)).save(raw / person / os.path.basename(paths[0]))
    data_dir = tmp_path / "tfds"
    with pytest.raises(splits.DatasetLayoutError) as err:
        _build({"root": str(raw)}, data_dir)
    message = str(err.value)
    assert "\n" not in message and "no usable face" in message and "250x250" in message
    assert "3 unexpected size (not 112x112)" in message
    again = lfw_swap.LfwSwap(config=lfw_swap.make_config(lfw_dir=str(raw)), data_dir=str(data_dir))
    assert not again.is_prepared()


def test_a_changed_folder_is_rebuilt(tree, tmp_path):
    """datasets.prepare compares the folder's fingerprint with the build's: the same files
    elsewhere reuse the build, a changed folder rebuilds it (the old one kept aside)."""
    from configs import demo
    from data_pipelines import datasets

    folder = tmp_path / "lfw"
    shutil.copytree(tree["root"], folder)
    data = demo.get_config().data
    data.update(lfw_dir=str(folder), data_dir=str(tmp_path / "tfds"), image_size=112)
    first = datasets.prepare(data)
    sizes = {s: i.num_examples for s, i in first.info.splits.items()}
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    data.lfw_dir = str(moved)
    assert datasets.prepare(data).data_dir == first.data_dir  # same files: reused
    assert not glob.glob(f"{first.data_dir}.stale-*")
    person = next(p for p in tree["people"] if splits.identity_split(p) == "train")
    shutil.rmtree(moved / person)  # the folder changes
    rebuilt = datasets.prepare(data)
    assert rebuilt.data_dir == first.data_dir and len(glob.glob(f"{first.data_dir}.stale-*")) == 1
    assert rebuilt.info.splits["train"].num_examples < sizes["train"]
