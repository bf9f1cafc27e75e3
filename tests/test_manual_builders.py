"""faceforensics, celeba_megafs and ffhq_e4s built end to end from tiny manual_dir trees.

The trees (tests/fixtures_manual.py) follow each builder's documented layout and hold real LFW
faces: FF++ as short mp4 videos with swapped inner faces, a mask video, the split jsons and a
corrupt video; MegaFS / E4S as originals plus swaps and bad files. One MTCNN and one landmark
net serve every build (paired_images caches them per process).
"""

import glob
import json
import logging
import os
import threading
import time

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import alignment, detections, features, resume, skips, splits, threads
from data_pipelines.builders import celeba_megafs, faceforensics, ffhq_e4s, paired_images
from tests import fixtures_manual

LANDMARK_BATCH = 16  # small padded batches: the fixtures have a few dozen faces


def prepare(builder_cls, config, data_dir, manual_dir):
    builder = builder_cls(data_dir=str(data_dir), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def load(builder) -> dict[str, list[dict]]:
    return {
        split: list(tfds.as_numpy(builder.as_dataset(split=split)))
        for split in sorted(builder.info.splits)
    }


def iou(a, b) -> float:
    a, b = np.squeeze(np.asarray(a)) > 0, np.squeeze(np.asarray(b)) > 0
    assert a.shape == b.shape
    return float((a & b).sum() / max((a | b).sum(), 1))


def check_example(ex: dict, size: int = 224) -> None:
    """The features contract: pristine = its own source (mask 255 everywhere, alpha 0);
    forgery = target outside the mask, alpha -1 (learned swappers: unknown)."""
    assert ex["image"].shape == ex["source"].shape == ex["target"].shape == (size, size, 3)
    assert ex["mask"].shape == ex["face_mask"].shape == (size, size, 1)
    assert set(np.unique(ex["mask"])) <= {0, 255}
    assert ex["alpha"].dtype == np.float32 and ex["alpha"].shape == ()
    assert ex["face_mask"].mean() > 0.15 * 255  # the landmark hull of a face filling the crop
    assert np.isfinite(ex["landmarks"]).all()
    assert (ex["landmarks"] > -0.1 * size).all() and (ex["landmarks"] < 1.1 * size).all()
    if ex["label"] == 0:
        assert ex["method"] == b"pristine"
        assert (ex["mask"] == 255).all() and ex["alpha"] == 0.0
        np.testing.assert_array_equal(ex["source"], ex["image"])
        np.testing.assert_array_equal(ex["target"], ex["image"])
        assert ex["source_id"] == ex["target_id"]
        assert ex["mask_source"] == b"pristine"
        return
    assert ex["label"] == 1 and ex["method"] != b"pristine"
    assert ex["mask_source"] in (b"dataset", b"derived")
    assert ex["alpha"] == -1.0
    assert ex["source_id"] != ex["target_id"]
    mask = ex["mask"][..., 0] > 0
    assert 0.1 < mask.mean() < 0.6
    diff = np.abs(ex["image"].astype(np.int16) - ex["target"]).max(-1)
    assert diff[mask].mean() > 20  # the source's face is inside the mask
    # Outside the (slightly dilated) mask the forgery is the target, up to compression noise.
    dilated = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    assert diff[~dilated].mean() < 2.0
    assert (diff[~dilated] > 20).mean() < 0.005


def same_image_in(image, candidates) -> bool:
    return any(np.array_equal(image, c) for c in candidates)


# ---------------------------------------------------------------------------------------------
# FaceForensics++


@pytest.fixture(scope="module")
def ff(tmp_path_factory):
    root = tmp_path_factory.mktemp("ff")
    info = fixtures_manual.write_faceforensics(str(root / "manual"))
    config = faceforensics.make_config(frames_per_video=3, landmark_batch=LANDMARK_BATCH)
    builder = prepare(faceforensics.FaceForensics, config, root / "tfds", root / "manual")
    return builder, load(builder), info, config, root


def test_faceforensics_builds_every_split_with_consistent_examples(ff):
    builder, data, info, _, _ = ff
    # train: Deepfakes 000_001 + 001_000 (3 frames each) + pristine 000, 001; validation:
    # FaceSwap 002_003 + pristine 002, 003; test: pristine 004 (004_005 has no source video).
    assert {s: len(v) for s, v in data.items()} == {"test": 3, "train": 12, "validation": 9}
    assert builder.info.metadata["methods"] == ["Deepfakes", "FaceSwap"]
    assert builder.info.metadata["missing_methods"] == ["FaceShifter"]  # identity swaps only
    assert builder.info.metadata["identity_source"] == "video id"  # no identity file
    assert builder.info.metadata["moved_by_person"] == {}
    # 000_001 ships a mask video (3 frames), 001_000 and 002_003 derive theirs.
    sources = builder.info.metadata["mask_source"]
    assert sources == {"train": {"dataset": 3, "derived": 3}, "validation": {"derived": 3},
                       "test": {}}  # fmt: skip
    # Stored per example too: 000_001's frames say "dataset", the others "derived".
    per_example = {(ex["target_id"], ex["source_id"], ex["mask_source"])
                   for x in data.values() for ex in x if ex["label"]}  # fmt: skip
    assert per_example == {(b"000", b"001", b"dataset"), (b"001", b"000", b"derived"),
                           (b"002", b"003", b"derived")}  # fmt: skip
    for examples in data.values():
        for ex in examples:
            check_example(ex)
    methods = {ex["method"] for ex in data["train"] + data["validation"] if ex["label"]}
    assert methods == {b"Deepfakes", b"FaceSwap"}


def test_faceforensics_pairs_fakes_with_their_true_faces_and_masks(ff):
    _, data, info, _, _ = ff
    truth = fixtures_manual.face_ellipse(224)
    for examples in data.values():
        pristine = {}
        for ex in examples:
            if ex["label"] == 0:
                pristine.setdefault(ex["target_id"], []).append(ex["image"])
        for ex in (e for e in examples if e["label"]):
            # Same frame index, same detection: the crops are the pristine frames bit for bit.
            assert same_image_in(ex["target"], pristine[ex["target_id"]])
            assert same_image_in(ex["source"], pristine[ex["source_id"]])
            derived = paired_images.derive_mask(ex["image"], ex["target"])
            # 000_001 has a mask video, the others derive theirs: both find the pasted ellipse.
            assert iou(ex["mask"], truth) > 0.85
            assert iou(ex["mask"], derived) > 0.9
    fakes = {(e["target_id"], e["source_id"]) for x in data.values() for e in x if e["label"]}
    assert fakes == {(b"000", b"001"), (b"001", b"000"), (b"002", b"003")}


def test_faceforensics_splits_follow_the_official_json(ff):
    _, data, info, _, _ = ff
    seen = {}
    for split, examples in data.items():
        ids = {i.decode() for ex in examples for i in (ex["source_id"], ex["target_id"])}
        assert ids <= info["split_ids"][split]
        seen[split] = ids
    assert not (seen["train"] & seen["validation"] or seen["train"] & seen["test"])
    assert not seen["validation"] & seen["test"]


def test_faceforensics_skips_are_counted_and_persisted(ff):
    builder, _, info, config, root = ff
    assert builder.skip_summary() == info["skips"]
    # A fresh builder reads them back from metadata.json.
    again = faceforensics.FaceForensics(data_dir=str(root / "tfds"), config=config)
    assert again.skip_summary() == info["skips"]
    with open(os.path.join(builder.data_dir, "metadata.json")) as f:
        assert json.load(f)["skipped"] == info["skips"]


def test_faceforensics_frames_and_videos():
    assert faceforensics.evenly_spaced(10, 3) == [0, 4, 9]
    assert faceforensics.evenly_spaced(2, 8) == [0, 1]
    assert faceforensics.evenly_spaced(0, 8) == []


def test_faceforensics_reports_missing_split_files(tmp_path):
    videos = tmp_path / "original_sequences" / "youtube" / "c23" / "videos"
    videos.mkdir(parents=True)
    (videos / "000.mp4").write_bytes(b"x")
    builder = faceforensics.FaceForensics(data_dir=str(tmp_path / "tfds"))
    config = tfds.download.DownloadConfig(manual_dir=str(tmp_path))
    with pytest.raises(splits.DatasetLayoutError, match="splits"):
        builder.download_and_prepare(download_config=config)
    (tmp_path / "splits").mkdir()
    with pytest.raises(splits.DatasetLayoutError, match="train.json"):
        builder.download_and_prepare(download_config=config)


# ---------------------------------------------------------------------------------------------
# CelebA-MegaFS and FFHQ-E4S


@pytest.fixture(scope="module")
def megafs(tmp_path_factory):
    root = tmp_path_factory.mktemp("megafs")
    info = fixtures_manual.write_celeba_megafs(str(root / "manual"))
    config = celeba_megafs.make_config(landmark_batch=LANDMARK_BATCH)
    builder = prepare(celeba_megafs.CelebaMegafs, config, root / "tfds", root / "manual")
    return builder, load(builder), info


@pytest.fixture(scope="module")
def e4s(tmp_path_factory):
    root = tmp_path_factory.mktemp("e4s")
    info = fixtures_manual.write_ffhq_e4s(str(root / "manual"))
    info["manual"] = root / "manual"
    config = ffhq_e4s.make_config(landmark_batch=LANDMARK_BATCH)
    builder = prepare(ffhq_e4s.FfhqE4s, config, root / "tfds", root / "manual")
    return builder, load(builder), info


def check_paired(data: dict, sizes: dict) -> None:
    assert {s: len(v) for s, v in data.items()} == sizes
    truth = fixtures_manual.face_ellipse(224)
    for examples in data.values():
        originals = [ex["image"] for ex in examples if ex["label"] == 0]
        for ex in examples:
            check_example(ex)
            if ex["label"]:
                assert iou(ex["mask"], truth) > 0.85
                assert same_image_in(ex["target"], originals)  # each target is also pristine


def test_celeba_megafs_end_to_end(megafs):
    builder, data, info = megafs
    check_paired(data, info["sizes"])
    assert builder.skip_summary() == info["skips"]
    assert builder.info.metadata["missing_methods"] == info["missing_methods"]
    assert builder.info.metadata["identity_source"] == "file"
    forged = {s: sum(int(ex["label"]) for ex in x) for s, x in data.items()}
    assert builder.info.metadata["mask_source"] == {
        s: ({"derived": n} if n else {}) for s, n in forged.items()}  # fmt: skip
    methods = {ex["method"] for x in data.values() for ex in x if ex["label"]}
    assert methods == {b"FTM", b"IDInjection"}


def test_celeba_megafs_splits_are_person_disjoint(megafs):
    _, data, info = megafs
    people = {}
    for split, examples in data.items():
        people[split] = {p.decode() for ex in examples for p in (ex["source_id"], ex["target_id"])}
        # ids are the persons of identity_CelebA-HQ.txt, each in its identity split
        assert all(splits.identity_split(p) == split for p in people[split])
    assert set(people["train"]).isdisjoint(people["validation"] | people["test"])
    assert people["validation"].isdisjoint(people["test"])
    # The two photos of a train person are two pristine examples of one identity.
    first = sorted(info["person_of"].values())
    twice = {p for p in first if first.count(p) == 2}
    counts = {p: 0 for p in twice}
    for ex in data["train"]:
        if ex["label"] == 0 and ex["target_id"].decode() in counts:
            counts[ex["target_id"].decode()] += 1
    assert sum(counts.values()) == 4


def test_ffhq_e4s_end_to_end(e4s):
    builder, data, info = e4s
    check_paired(data, info["sizes"])
    assert builder.skip_summary() == info["skips"]
    assert builder.info.metadata["identity_source"] == "image id"
    for split, examples in data.items():
        ids = {int(i) for ex in examples for i in (ex["source_id"], ex["target_id"])}
        assert ids <= set(info["ids"][split])  # image ids, each in its identity split
    pairs = {
        (int(e["target_id"]), int(e["source_id"])) for x in data.values() for e in x if e["label"]
    }
    assert pairs == set(info["pairs"])


def test_builds_are_deterministic(e4s, tmp_path):
    builder, data, info = e4s
    again = load(prepare(ffhq_e4s.FfhqE4s, builder.builder_config, tmp_path, info["manual"]))
    assert again.keys() == data.keys()
    for split in data:
        assert len(again[split]) == len(data[split])
        for a, b in zip(again[split], data[split]):  # same order, same bytes
            for name in ("image", "source", "target", "mask", "face_mask", "landmarks"):
                np.testing.assert_array_equal(a[name], b[name])
            assert (a["source_id"], a["target_id"]) == (b["source_id"], b["target_id"])


# ---------------------------------------------------------------------------------------------
# Errors, configs, masks


BUILDERS = [faceforensics.FaceForensics, celeba_megafs.CelebaMegafs, ffhq_e4s.FfhqE4s]


@pytest.mark.parametrize("builder_cls", BUILDERS, ids=lambda c: c.name)
def test_missing_manual_dir_is_one_clear_error(builder_cls, tmp_path):
    builder = builder_cls(data_dir=str(tmp_path / "tfds"))
    missing = tmp_path / "no_such_folder"
    with pytest.raises(splits.DatasetLayoutError, match="no_such_folder") as error:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(missing))
        )
    assert "expected layout" in str(error.value) and "\n" not in str(error.value)
    # An existing folder without the dataset's originals folder names that folder.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "unrelated.txt").write_text("x")
    with pytest.raises(splits.DatasetLayoutError, match="expected layout"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "empty"))
        )


def test_paired_builders_need_at_least_one_method_folder(tmp_path):
    fixtures_manual.write_png(
        str(tmp_path / "e4s_root" / "ffhq" / "00001.png"), np.zeros((8, 8, 3), np.uint8)
    )
    builder = ffhq_e4s.FfhqE4s(data_dir=str(tmp_path / "tfds"))
    with pytest.raises(splits.DatasetLayoutError, match="none of the method folders"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "e4s_root"))
        )


def test_make_config_names_follow_content():
    assert celeba_megafs.make_config() is celeba_megafs.DEFAULT_CONFIG
    small = celeba_megafs.make_config(image_size=112)
    assert small.name == "image_size-112" and small.image_size == 112
    assert ffhq_e4s.make_config(image_size=224).name == "default"
    named = faceforensics.make_config(methods=["Deepfakes"], frames_per_video=2)
    assert named.methods == ("Deepfakes",) and named.name.startswith("frames_per_video-2+methods-")
    with pytest.raises(ValueError, match="unknown"):
        faceforensics.make_config(no_such_field=1)


def test_derive_mask_finds_the_pasted_region_and_nothing_else():
    rng = np.random.default_rng(0)
    faces = fixtures_manual.lfw_people()
    people = sorted(faces)[:2]
    target, source = (cv2.resize(skips.read_rgb8(faces[p][0]), (224, 224)) for p in people)
    fake = fixtures_manual.swap(target, source)
    noisy = np.clip(fake + rng.normal(0, 2, fake.shape), 0, 255).astype(np.uint8)
    mask = paired_images.derive_mask(noisy, target)
    assert mask.shape == (224, 224, 1) and mask.dtype == np.uint8
    assert iou(mask, fixtures_manual.face_ellipse(224)) > 0.9
    assert not paired_images.derive_mask(target, target).any()


def test_faceforensics_reads_the_lossless_raw_folder(tmp_path):
    """The download script's `-c raw` tree: compression="raw" reads it; the default c23 names
    the folder it did not find, in one line."""
    fixtures_manual.write_faceforensics(str(tmp_path / "manual"), compression="raw")
    config = faceforensics.make_config(
        compression="raw", frames_per_video=1, methods=("Deepfakes",), landmark_batch=LANDMARK_BATCH
    )
    builder = prepare(faceforensics.FaceForensics, config, tmp_path / "tfds", tmp_path / "manual")
    data = load(builder)
    fakes = {(e["target_id"], e["source_id"]) for x in data.values() for e in x if e["label"]}
    assert fakes == {(b"000", b"001"), (b"001", b"000")}  # Deepfakes' two readable pairs
    with pytest.raises(splits.DatasetLayoutError, match="youtube/c23/videos"):
        prepare(faceforensics.FaceForensics, faceforensics.make_config(), tmp_path / "tfds2",
                tmp_path / "manual")  # fmt: skip


def test_faceforensics_reads_lcr_swaps_as_frame_folders(tmp_path):
    """LCR (not in the FF++ download) as frame images named by their target-video index:
    the frames are the target video's at those indices (the crops equal the pristine ones),
    a frame that is not an image is counted, and a pair given both ways is read from its video."""
    fixtures_manual.write_faceforensics(str(tmp_path / "manual"), compression="c40", lcr=True)
    config = faceforensics.make_config(  # the c40 tree (`-c c40` of the download script)
        compression="c40", methods=("LCR",), frames_per_video=2, landmark_batch=LANDMARK_BATCH
    )
    builder = prepare(faceforensics.FaceForensics, config, tmp_path / "tfds", tmp_path / "manual")
    data = load(builder)
    fakes = {s: sorted((e["target_id"], e["source_id"]) for e in x if e["label"])
             for s, x in data.items()}  # fmt: skip
    # Frames 0 and 9 of 000_001 (9 is not an image) and the video 002_003; 0 and 18 of
    # 001_000 (the target video has no frame 18).
    assert fakes == {"train": [(b"000", b"001"), (b"001", b"000")],
                     "validation": [(b"002", b"003")] * 2, "test": []}  # fmt: skip
    assert builder.info.metadata["methods"] == ["LCR"]
    skipped = builder.skip_summary()
    assert skipped["train"] == {"frame image: not an image": 1,
                                "frame index past the target video": 1}  # fmt: skip
    assert skipped["unsplit"] == {"pair also given as a video": 1}
    truth = fixtures_manual.face_ellipse(224)
    for examples in data.values():
        pristine = [e["image"] for e in examples if e["label"] == 0]
        for ex in (e for e in examples if e["label"]):
            check_example(ex)
            assert ex["method"] == b"LCR"
            assert same_image_in(ex["target"], pristine)
            assert iou(ex["mask"], truth) > 0.85  # derived: LCR ships no masks
    assert builder.info.metadata["mask_source"]["train"] == {"derived": 2}
    with pytest.raises(ValueError, match="LCR"):
        faceforensics.make_config(methods=("LRC",))


def test_a_changed_manual_dir_is_rebuilt(tmp_path):
    """datasets.prepare compares the manual_dir's fingerprint with the build's, as lfw_swap's
    folder: unchanged, the build is reused; one file less, it is rebuilt (the old one kept
    aside); with no manual_dir configured, the prepared build is reused as it is."""
    from configs import default
    from data_pipelines import datasets

    manual = tmp_path / "manual"
    fixtures_manual.write_ffhq_e4s(str(manual))
    data = default.get_config("dataset=ffhq_e4s").data
    data.update(manual_dir=str(manual), data_dir=str(tmp_path / "tfds"), image_size=64,
                landmark_batch=LANDMARK_BATCH)  # fmt: skip
    first = datasets.prepare(data)
    built = first.info.metadata["source_fingerprint"]
    assert built == splits.tree_fingerprint(str(manual))
    assert datasets.prepare(data).data_dir == first.data_dir
    assert not glob.glob(f"{first.data_dir}.stale-*")
    os.remove(sorted(glob.glob(str(manual / "e4s" / "*.png")))[0])
    rebuilt = datasets.prepare(data)
    assert rebuilt.data_dir == first.data_dir and len(glob.glob(f"{first.data_dir}.stale-*")) == 1
    assert rebuilt.info.metadata["source_fingerprint"] == splits.tree_fingerprint(str(manual))
    assert rebuilt.info.metadata["source_fingerprint"] != built
    data.manual_dir = ""
    assert datasets.prepare(data).data_dir == first.data_dir  # nothing to compare: reused
    assert len(glob.glob(f"{first.data_dir}.stale-*")) == 1


def test_ordered_map_works_ahead_on_threads_and_keeps_the_order():
    """One worker, one ahead (how faceforensics reads its videos): b is read while a is
    consumed; two workers: results still in order; errors at their item's turn."""

    names, started, b_started = set(), [], threading.Event()

    def read(item):
        names.add(threading.current_thread().name)
        started.append(item)
        if item == "b":
            b_started.set()
        if item == "bad":
            raise ValueError("unreadable")
        return item.upper()

    consumed = []
    for item, result in threads.ordered_map(read, ["a", "b", "c"], workers=1, ahead=1):
        assert result == item.upper()
        consumed.append(item)
        if item == "a":  # b is read while a is consumed (the generator waits at its yield)
            assert b_started.wait(timeout=10)
    assert consumed == ["a", "b", "c"] and started == ["a", "b", "c"]
    assert len(names) == 1 and threading.current_thread().name not in names
    assert list(threads.ordered_map(read, [], workers=1, ahead=1)) == []
    with pytest.raises(ValueError, match="unreadable"):
        list(threads.ordered_map(read, ["a", "bad", "c"], workers=1, ahead=1))
    def slow_first(i):  # later items finish first: the order must come from the map
        time.sleep(0.02 * (10 - i % 10))
        return -i

    assert list(threads.ordered_map(slow_first, range(20), workers=4)) == [
        (i, -i) for i in range(20)
    ]


def test_merge_people_moves_each_person_to_their_most_held_out_split():
    split_of = {"000": "train", "001": "train", "002": "validation", "003": "test",
                "004": "train", "005": "validation"}  # fmt: skip
    person_of = {"000": "a", "002": "a", "001": "b", "003": "b", "005": "b"}
    merged, moved = faceforensics.merge_people(split_of, person_of)
    assert merged == {"000": "validation", "001": "test", "002": "validation", "003": "test",
                      "004": "train", "005": "test"}  # fmt: skip
    assert moved == {"train->test": 1, "train->validation": 1, "validation->test": 1}
    assert faceforensics.merge_people(split_of, {}) == (split_of, {})


def test_faceforensics_identity_file_merges_the_official_splits_per_person(tmp_path):
    """Video 001 (train) and 002 (validation) are one person: 001 moves to validation, and the
    two Deepfakes pairs of 000 (train) and 001 become cross-split pairs, skipped and counted."""
    manual = tmp_path / "manual"
    fixtures_manual.write_faceforensics(str(manual))
    (manual / "splits" / "identities.txt").write_text("video person\n001 p7\n002 p7\n")
    config = faceforensics.make_config(frames_per_video=1, landmark_batch=LANDMARK_BATCH)
    builder = prepare(faceforensics.FaceForensics, config, tmp_path / "tfds", manual)
    data = load(builder)
    assert builder.info.metadata["identity_source"] == "file"
    assert builder.info.metadata["moved_by_person"] == {"train->validation": 1}
    pristine = {s: sorted(e["target_id"] for e in x if not e["label"]) for s, x in data.items()}
    assert pristine == {"train": [b"000"], "validation": [b"001", b"002", b"003"],
                        "test": [b"004"]}  # fmt: skip
    fakes = {(e["target_id"], e["source_id"]) for x in data.values() for e in x if e["label"]}
    assert fakes == {(b"002", b"003")}
    skipped = builder.skip_summary()
    assert skipped["train"]["cross-split pair"] == 1  # 000_001
    assert skipped["validation"]["cross-split pair"] == 1  # 001_000


def test_megafs_split_by_target_keeps_cross_split_pairs_and_finds_nested_identities(
    megafs, tmp_path, caplog
):
    """The same tree with CelebAMask-HQ's mapping file and CelebA's identity file in their own
    sub-folders instead of identity_CelebA-HQ.txt, and split_by="target": the persons come
    from the mapping, the cross-split swap 0_6 is kept in its target's split and reported; the
    default build dropped and reported it."""
    builder, data, info = megafs
    assert builder.info.metadata["split_by"] == "pair"
    assert builder.info.metadata["cross_split_pairs"] == {"train": 1, "validation": 0, "test": 0}
    manual = tmp_path / "manual"
    fixtures_manual.write_celeba_megafs(str(manual))
    os.makedirs(manual / "CelebAMask-HQ")
    os.remove(manual / "identity_CelebA-HQ.txt")
    os.makedirs(manual / "CelebA" / "Anno")
    with open(manual / "CelebAMask-HQ" / celeba_megafs.CELEBA_MAPPING, "w") as f:
        f.write("idx orig_idx orig_file\n")
        f.writelines(f"{i} {5000 + int(i)} {5001 + int(i):06d}.jpg\n" for i in info["person_of"])
    with open(manual / "CelebA" / "Anno" / celeba_megafs.CELEBA_IDENTITY, "w") as f:
        f.writelines(f"{5001 + int(i):06d}.jpg {p}\n" for i, p in info["person_of"].items())
    config = celeba_megafs.make_config(landmark_batch=LANDMARK_BATCH, split_by="target")
    with caplog.at_level("WARNING"):
        kept = prepare(celeba_megafs.CelebaMegafs, config, tmp_path / "tfds", manual)
    assert kept.info.metadata["identity_source"] == "file"
    assert kept.info.metadata["cross_split_pairs"] == {"train": 1, "validation": 0, "test": 0}
    assert "train: 1 of 9 swaps have their source person in another split: kept" in caplog.text
    sizes = {s: n + (s == "train") for s, n in info["sizes"].items()}  # + the swap 0_6
    assert {s: len(v) for s, v in load(kept).items()} == sizes
    assert "cross-split pair" not in kept.skip_summary()["train"]
    persons = {e["target_id"].decode() for x in load(kept).values() for e in x}
    assert persons <= set(info["person_of"].values())  # persons, not image ids


def test_masks_over_most_of_the_crop_are_implausible():
    """A "swap" compared with the wrong original (another person's photo, as a wrong
    originals folder gives) differs everywhere: its mask is refused, a real swap's is not."""
    from tests import lfw

    faces = (lfw.real_faces(4, 224) * 255).round().astype(np.uint8)
    limit = paired_images.PairedImageConfig(name="x").max_mask_fraction
    for a, b in ((0, 1), (2, 3)):
        wrong = paired_images.derive_mask(faces[a], faces[b])
        reason = paired_images.implausible_mask(wrong, limit)
        assert reason == "implausible mask (over 85% of the image)"
    real = paired_images.derive_mask(fixtures_manual.swap(faces[0], faces[1]), faces[0])
    assert paired_images.implausible_mask(real, limit) is None
    assert paired_images.implausible_mask(np.zeros_like(real), limit) == "empty mask"


def test_forgery_examples_name_where_their_mask_came_from():
    """`mask_source` is part of the features contract: a forgery's is one of the three
    sources, a pristine face's "pristine"; anything else is refused."""
    face = np.zeros((8, 8, 3), np.uint8)
    mask = np.full((8, 8), 255, np.uint8)
    args = dict(image=face, source=face, target=face, mask=mask, face_mask=mask,
                landmarks=np.zeros((68, 2)), method="x", source_id="a", target_id="b",
                alpha=-1.0)  # fmt: skip
    for source in ("dataset", "derived", "generated"):
        assert features.forgery_example(**args, mask_source=source)["mask_source"] == source
    for bad in ("pristine", "guessed"):
        with pytest.raises(ValueError, match="mask_source"):
            features.forgery_example(**args, mask_source=bad)
    assert features.pristine_example(face, mask, np.zeros((68, 2)), "a")["mask_source"] == (
        "pristine"
    )


# ---------------------------------------------------------------------------------------------
# Face detection on every core, stored so that a crashed build resumes (detections.py)


def assert_same_examples(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for split in a:
        assert len(a[split]) == len(b[split])
        for x, y in zip(a[split], b[split]):  # same order, same bytes, every feature
            assert x.keys() == y.keys()
            for name in x:
                np.testing.assert_array_equal(x[name], y[name])


def test_a_crashed_faceforensics_build_resumes_without_detecting_again(
    ff, tmp_path, monkeypatch, caplog
):
    """A build detecting its faces on 2 worker processes dies while writing the validation
    split; the next run, in this process, links the train split the dead one had finished
    (data_pipelines/resume.py), reads every face's keypoints from the store (detection is
    made to fail) and gives the fixture's examples and skip counts: so the workers' keypoints
    equal those detected in-process (the fixture's build), field for field."""
    builder, data, info, config, root = ff
    read_fake = faceforensics.FaceForensics._read_fake

    def crash_in_validation(self, fake):
        if fake.target == "002":
            raise RuntimeError("killed")
        return read_fake(self, fake)

    monkeypatch.setattr(faceforensics.FaceForensics, "_read_fake", crash_in_validation)
    monkeypatch.setattr(faceforensics.FaceForensics, "build_workers", 2)
    with caplog.at_level(logging.INFO, logger="data_pipelines.detections"):
        with pytest.raises(RuntimeError, match="killed"):
            prepare(faceforensics.FaceForensics, config, tmp_path, root / "manual")
    assert "detecting faces in 5 videos (0 already stored) on 2 process(es)" in caplog.text
    stored = glob.glob(str(tmp_path / "faceforensics" / ".detections" / "*" / "*.json"))
    assert sorted(os.path.basename(p) for p in stored) == [f"00{i}.json" for i in range(5)]
    monkeypatch.setattr(faceforensics.FaceForensics, "_read_fake", read_fake)
    monkeypatch.setattr(faceforensics.FaceForensics, "build_workers", 1)

    def detect(*args, **kwargs):
        raise AssertionError("a face was detected again")

    monkeypatch.setattr(alignment.FaceDetector, "detect", detect)
    kept = tmp_path / "faceforensics" / ".splits" / config.name
    assert sorted(os.listdir(next(kept.iterdir()))) == ["train"]  # what the dead build finished
    generated = []
    monkeypatch.setattr(faceforensics.FaceForensics, "_read_fake",
                        lambda self, fake: generated.append(fake.target) or read_fake(self, fake))
    with caplog.at_level(logging.INFO, logger="data_pipelines.builders.paired_images"):
        again = prepare(faceforensics.FaceForensics, config, tmp_path, root / "manual")
    assert "faceforensics/train: 12 examples kept from an earlier build" in caplog.text
    assert generated == ["002", "003"]  # validation's fakes; train's (000, 001) not made again
    assert_same_examples(load(again), data)
    assert again.skip_summary() == info["skips"]
    assert again.info.metadata["mask_source"] == builder.info.metadata["mask_source"]
    assert not kept.exists()  # removed once the build succeeded


def test_stored_detections_follow_their_video(tmp_path):
    """Keypoints merge per frame, survive a new Store, and are dropped when the video's file
    changes or the stored file is half-written."""
    video = tmp_path / "000.mp4"
    video.write_bytes(b"a video")
    store = detections.Store(str(tmp_path / "store"))
    points = np.arange(10, dtype=np.float32).reshape(5, 2) / 3
    store.put("000", str(video), {0: points})
    store.put("000", str(video), {4: "no face"})
    got = detections.Store(str(tmp_path / "store")).get("000", str(video))
    assert got.keys() == {0, 4} and got[4] == "no face"
    np.testing.assert_array_equal(got[0], points)  # float32 values round-trip exactly
    assert got[0].dtype == np.float32
    video.write_bytes(b"another video")  # new size: detected again
    assert store.get("000", str(video)) == {}
    store.put("000", str(video), {1: "no face"})
    (tmp_path / "store" / "000.json").write_text('{"video": [1')  # a crash mid-write
    assert store.get("000", str(video)) == {}
    assert detections.workers_for(3) == 3 and detections.workers_for(0) >= 1


def test_kept_splits_are_reused_only_from_the_same_inputs(tmp_path):
    """resume.keep links a written split's files aside; restore links them to the new build's
    paths when the fingerprint matches, and refuses another input tree or a half-kept split."""
    written = []
    for i in range(2):
        path = tmp_path / "build" / f"x-train.tfrecord-0000{i}-of-00002"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"shard %d" % i)
        written.append(str(path))
    folder = str(tmp_path / ".splits" / "cfg" / "1.0.0" / "train")
    resume.keep(folder, written, {"fingerprint": ["tree", None], "shard_lengths": [3, 4]})
    new = tmp_path / "new"
    new.mkdir()

    def paths(n):
        return [str(new / f"x-train.tfrecord-0000{i}-of-0000{n}") for i in range(n)]

    assert resume.restore(folder, ["another tree", None], paths) is None
    assert not list(new.iterdir())  # nothing linked
    state = resume.restore(folder, ["tree", None], paths)
    assert state["shard_lengths"] == [3, 4]
    assert [open(p, "rb").read() for p in paths(2)] == [b"shard 0", b"shard 1"]
    os.remove(os.path.join(folder, resume.STATE))  # killed before the state was written
    assert resume.restore(folder, ["tree", None], paths) is None
    resume.discard(os.path.dirname(folder))
    assert not (tmp_path / ".splits").exists()
