"""Tiny manual_dir trees in the documented layouts of faceforensics, celeba_megafs and ffhq_e4s.

Content is real LFW faces (112x112, ArcFace-aligned). A "swap" replaces the inner-face ellipse
of the target with the source's pixels at the same place (both faces share one alignment), so
the true mask of every fixture forgery is that ellipse. Each writer returns a dict describing
what it wrote (ids per split, the ellipse, the bad files and the skips they must cause).
"""

import os

import cv2
import numpy as np
from PIL import Image

from data_pipelines import skips, splits
from dfrec_jax import configlib

# FF++ frames: the face (112 -> FACE) pasted at (FACE_X + shift, FACE_Y) in a FRAME x FRAME frame.
FRAME, FACE, FACE_X, FACE_Y, FRAMES = 256, 168, 44, 40, 10


def lfw_people(min_images: int = 1) -> dict[str, list[str]]:
    people = splits.scan_lfw(configlib.lfw_dir())
    return {p: paths for p, paths in people.items() if len(paths) >= min_images}


def people_in_splits(counts: dict[str, int], min_images: int = 1, salt: str = "dfrec") -> dict:
    """{split: [person, ...]}: the first LFW people (sorted) whose identity split is `split`."""
    chosen = {s: [] for s in counts}
    for person in sorted(lfw_people(min_images)):
        split = splits.identity_split(person, salt=salt)
        if split in chosen and len(chosen[split]) < counts[split]:
            chosen[split].append(person)
        if all(len(chosen[s]) == counts[s] for s in counts):
            return chosen
    raise AssertionError(f"not enough LFW people for {counts}")


def ids_in_splits(counts: dict[str, int], start: int = 0, salt: str = "dfrec") -> dict:
    """{split: [int id, ...]}: the first integers whose identity split (of str(id)) is `split`."""
    chosen = {s: [] for s in counts}
    n = start
    while not all(len(chosen[s]) == counts[s] for s in counts):
        split = splits.identity_split(str(n), salt=salt)
        if split in chosen and len(chosen[split]) < counts[split]:
            chosen[split].append(n)
        n += 1
    return chosen


def face_ellipse(size: int, dtype=bool) -> np.ndarray:
    """[size,size] inner-face ellipse (eyes, nose, mouth) of an ArcFace-aligned face crop."""
    mask = np.zeros((size, size), np.uint8)
    s = size / 112.0
    cv2.ellipse(
        mask, (round(56 * s), round(66 * s)), (round(33 * s), round(40 * s)), 0, 0, 360, 1, -1
    )
    return mask.astype(dtype)


def swap(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The target with the source's inner face pasted in (both aligned the same way)."""
    region = face_ellipse(target.shape[0])[..., None]
    return np.where(region, source, target)


# ---------------------------------------------------------------------------------------------
# Still images.


def write_jpeg(path: str, image: np.ndarray, mode: str = "RGB", quality: int = 95) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).convert(mode).save(path, quality=quality)


def write_png(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)


def write_bad_images(folder: str, names: dict[str, str], like: np.ndarray) -> dict[str, str]:
    """Writes one bad file per kind under `folder`; returns {file name: expected skip reason}."""
    os.makedirs(folder, exist_ok=True)
    expected = {}
    for kind, name in names.items():
        path = os.path.join(folder, name)
        if kind == "empty":
            open(path, "wb").close()
            expected[name] = "empty file"
        elif kind == "text":
            with open(path, "w") as f:
                f.write("this is not an image\n")
            expected[name] = "not an image"
        elif kind == "grayscale":
            write_jpeg(path, like, "L")
            expected[name] = "not 8-bit RGB (mode L)"
        elif kind == "cmyk":
            write_jpeg(path, like, "CMYK")
            expected[name] = "not 8-bit RGB (mode CMYK)"
        elif kind == "16bit":
            gray16 = (like.mean(-1).astype(np.uint16) * 257).astype(np.uint16)
            Image.fromarray(gray16).save(path)  # PNG, mode I;16
            expected[name] = f"not 8-bit RGB (mode {Image.open(path).mode})"
        elif kind == "truncated":
            write_png(path, like)
            data = open(path, "rb").read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            expected[name] = skips_reason(path)
        else:
            raise ValueError(kind)
    return expected


def skips_reason(path: str) -> str:
    try:
        skips.read_rgb8(path)
    except skips.BadImage as e:
        return str(e)
    raise AssertionError(f"{path} reads fine")


def _face(path: str, size: int) -> np.ndarray:
    image = skips.read_rgb8(path)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)


def write_celeba_megafs(root: str, size: int = 256) -> dict:
    """CelebA-HQ-img/<id>.jpg + FTM/, IDInjection/ swaps named <target>_<source>.jpg.

    People: 2 train people with 2 photos each (ids 0-3), 2 validation and 2 test people with one
    photo each (ids 4-7); identity_CelebA-HQ.txt maps ids to people. LCR/ is left out.
    """
    people = people_in_splits({"train": 2, "validation": 2, "test": 2}, min_images=2)
    lfw = lfw_people(2)
    photos, person_of = {}, {}
    plan = [(people["train"][0], 0), (people["train"][0], 1)]
    plan += [(people["train"][1], 0), (people["train"][1], 1)]
    plan += [(p, 0) for p in people["validation"] + people["test"]]
    for image_id, (person, k) in enumerate(plan):
        photos[image_id] = _face(lfw[person][k], size)
        person_of[image_id] = person
        write_jpeg(os.path.join(root, "CelebA-HQ-img", f"{image_id}.jpg"), photos[image_id])
    with open(os.path.join(root, "identity_CelebA-HQ.txt"), "w") as f:
        f.write("image_id person_id\n")  # a header line, ignored
        f.writelines(f"{i} {p}\n" for i, p in person_of.items())
    split_of_id = {i: splits.identity_split(p) for i, p in person_of.items()}

    # A missing source id whose own (image-id) identity lands in train, so the skip is
    # "missing source original" rather than "cross-split pair".
    missing = next(n for n in range(100, 10_000) if splits.identity_split(str(n)) == "train")
    swaps = {"FTM": [(0, 2), (3, 1), (4, 5), (6, 7)], "IDInjection": [(1, 3), (5, 4)]}
    for method, pairs in swaps.items():
        for t, s in pairs:
            fake = swap(photos[t], photos[s])
            write_jpeg(os.path.join(root, method, f"{t}_{s}.jpg"), fake)
    write_jpeg(os.path.join(root, "FTM", "0_6.jpg"), swap(photos[0], photos[6]))  # cross-split
    write_jpeg(os.path.join(root, "FTM", f"1_{missing}.jpg"), photos[1])  # missing source
    bad = write_bad_images(
        os.path.join(root, "FTM"),
        {
            "empty": "2_0.jpg",
            "text": "3_0.jpg",
            "grayscale": "1_2.jpg",
            "cmyk": "2_1.jpg",
            "16bit": "3_2.png",
        },
        photos[0],
    )
    with open(os.path.join(root, "FTM", "readme.txt"), "w") as f:
        f.write("not a swap\n")
    train_skips = {reason: 1 for reason in bad.values()}
    train_skips.update({"cross-split pair": 1, "missing source original": 1})
    return {
        "person_of": {str(i): p for i, p in person_of.items()},
        "split_of_id": split_of_id,
        "swaps": swaps,
        "skips": {
            "train": train_skips,
            "validation": {},
            "test": {},
            "unsplit": {"unrecognised file name": 1},
        },
        "sizes": {"train": 3 + 4, "validation": 2 + 2, "test": 1 + 1},
        "missing_methods": ["LCR"],
    }


def write_ffhq_e4s(root: str, size: int = 256) -> dict:
    """ffhq/images1024x1024/<thousands>/<NNNNN>.png + e4s/swap_<source>_to_<target>.png, and
    ffhq/BiSeNet_mask/<NNNNN>.png single-channel label maps with the faces' names (as E4S'
    FFHQ preparation writes them; indexed first if taken for faces).

    No identity file: every image id is its own identity; ids are picked so that 3 land in
    train, 2 in validation and 2 in test.
    """
    ids = ids_in_splits({"train": 3, "validation": 2, "test": 2})
    people = sorted(lfw_people())[:7]
    lfw = lfw_people()
    all_ids = ids["train"] + ids["validation"] + ids["test"]
    photos = {}
    for n, person in zip(all_ids, people):
        photos[n] = _face(lfw[person][0], size)
        folder = os.path.join(root, "ffhq", "images1024x1024", f"{n // 1000 * 1000:05d}")
        write_png(os.path.join(folder, f"{n:05d}.png"), photos[n])
        labels = (face_ellipse(size) * 7).astype(np.uint8)  # BiSeNet classes, one channel
        masks = os.path.join(root, "ffhq", "BiSeNet_mask")
        os.makedirs(masks, exist_ok=True)
        Image.fromarray(labels, "L").save(os.path.join(masks, f"{n:05d}.png"))
    tr, va, te = ids["train"], ids["validation"], ids["test"]
    pairs = [(tr[0], tr[1]), (tr[2], tr[0]), (va[0], va[1]), (te[1], te[0])]  # (target, source)
    e4s = os.path.join(root, "e4s")
    for t, s in pairs:
        write_png(os.path.join(e4s, f"swap_{s:05d}_to_{t:05d}.png"), swap(photos[t], photos[s]))
    missing = ids_in_splits({"train": 1}, start=90_000)["train"][0]
    write_png(os.path.join(e4s, f"swap_{missing:05d}_to_{tr[1]:05d}.png"), photos[tr[1]])
    bad = write_bad_images(
        e4s,
        {
            "truncated": f"swap_{tr[1]:05d}_to_{tr[2]:05d}.png",
            "empty": f"swap_{va[0]:05d}_to_{va[1]:05d}.png",
        },
        photos[tr[0]],
    )
    return {
        "ids": ids,
        "pairs": pairs,
        "skips": {
            "train": {"missing source original": 1, bad[f"swap_{tr[1]:05d}_to_{tr[2]:05d}.png"]: 1},
            "validation": {"empty file": 1},
            "test": {},
        },
        # forgeries + pristine originals: every original a planned swap file names as its
        # target (a bad swap file's target included; a pair skipped while planning adds none)
        "sizes": {"train": 2 + 2, "validation": 1 + 2, "test": 1 + 1},
    }


# ---------------------------------------------------------------------------------------------
# FaceForensics++ videos.


def _frame(face: np.ndarray, t: int, background: int) -> np.ndarray:
    """One 256x256 RGB frame: a soft gradient background and the face, shifted by t."""
    y, x = np.mgrid[0:FRAME, 0:FRAME]
    frame = np.stack([background + x // 8, background + y // 8, background + (x + y) // 16], -1)
    frame = frame.astype(np.uint8)
    dx = t % 5 - 2
    face = cv2.resize(face, (FACE, FACE), interpolation=cv2.INTER_CUBIC)
    frame[FACE_Y : FACE_Y + FACE, FACE_X + dx : FACE_X + dx + FACE] = face
    return frame


def frame_ellipse(t: int) -> np.ndarray:
    """bool [FRAME,FRAME]: the swapped region of frame t."""
    mask = np.zeros((FRAME, FRAME), bool)
    dx = t % 5 - 2
    mask[FACE_Y : FACE_Y + FACE, FACE_X + dx : FACE_X + dx + FACE] = face_ellipse(FACE)
    return mask


def write_video(path: str, frames) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 25, (FRAME, FRAME))
    assert writer.isOpened(), f"cannot write {path}"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def _decoded(path: str) -> list[np.ndarray]:
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def write_faceforensics(root: str, compression: str = "c23", lcr: bool = False) -> dict:
    """Originals 000-004 (005 listed in the splits but absent), Deepfakes 000_001 (with a mask
    video) and 001_000, FaceSwap 002_003 and 004_005 (source missing), a corrupt Deepfakes
    003_002, a file outside the splits, and the three split jsons. `lcr`: also LCR swaps as
    frame folders (the builder's docstring) 000_001 (frame 9 not an image) and 001_000
    (frames 0-9 and a frame 18 the 10-frame target video lacks), 002_003 as a video and as a
    frame folder (read from the video)."""
    lfw = lfw_people()
    people = sorted(lfw)[10:15]
    faces = {f"{i:03d}": skips.read_rgb8(lfw[p][0]) for i, p in enumerate(people)}
    frames = {
        vid: [_frame(face, t, 60 + 10 * i) for t in range(FRAMES)]
        for i, (vid, face) in enumerate(faces.items())
    }
    originals = os.path.join(root, "original_sequences", "youtube", compression, "videos")
    for vid, video in frames.items():
        write_video(os.path.join(originals, f"{vid}.mp4"), video)

    def fake(target, source):
        return [
            np.where(frame_ellipse(t)[..., None], frames[source][t], frames[target][t])
            for t in range(FRAMES)
        ]

    manipulated = os.path.join(root, "manipulated_sequences")
    fakes = {"Deepfakes": [("000", "001"), ("001", "000")], "FaceSwap": [("002", "003")]}
    for method, pairs in fakes.items():
        for t, s in pairs:
            write_video(
                os.path.join(manipulated, method, compression, "videos", f"{t}_{s}.mp4"), fake(t, s)
            )
    masks = [np.repeat(frame_ellipse(t)[..., None] * np.uint8(255), 3, -1) for t in range(FRAMES)]
    write_video(os.path.join(manipulated, "Deepfakes", "masks", "videos", "000_001.mp4"), masks)
    # 004_005: its source video 005 does not exist.
    write_video(
        os.path.join(manipulated, "FaceSwap", compression, "videos", "004_005.mp4"), frames["004"]
    )
    # A corrupt video (a header and noise) in validation, and a pair outside the splits.
    rng = np.random.default_rng(0)
    with open(
        os.path.join(manipulated, "Deepfakes", compression, "videos", "003_002.mp4"), "wb"
    ) as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + rng.integers(0, 256, 4096, np.uint8).tobytes())
    write_video(
        os.path.join(manipulated, "Deepfakes", compression, "videos", "000_777.mp4"),
        frames["000"][:2],
    )

    if lcr:
        # Made, as a user would, from the originals' decoded frames.
        decoded = {vid: _decoded(os.path.join(originals, f"{vid}.mp4")) for vid in frames}
        lcr_dir = os.path.join(manipulated, "LCR", compression)
        for t, s in [("000", "001"), ("001", "000"), ("002", "003")]:
            swapped = [np.where(frame_ellipse(i)[..., None], decoded[s][i], decoded[t][i])
                       for i in range(FRAMES)]  # fmt: skip
            for i, frame in enumerate(swapped):
                write_png(os.path.join(lcr_dir, "frames", f"{t}_{s}", f"{i:04d}.png"), frame)
        with open(os.path.join(lcr_dir, "frames", "000_001", "0009.png"), "wb") as f:
            f.write(b"not a png")
        # A frame the 10-frame target video does not have.
        write_png(os.path.join(lcr_dir, "frames", "001_000", "0018.png"), swapped[0])
        write_video(os.path.join(lcr_dir, "videos", "002_003.mp4"), fake("002", "003"))

    split_pairs = {"train": [["000", "001"]], "val": [["002", "003"]], "test": [["004", "005"]]}
    os.makedirs(os.path.join(root, "splits"), exist_ok=True)
    import json

    for name, pairs in split_pairs.items():
        with open(os.path.join(root, "splits", f"{name}.json"), "w") as f:
            json.dump(pairs, f)
    return {
        "people": dict(zip(faces, people)),
        "split_ids": {
            "train": {"000", "001"},
            "validation": {"002", "003"},
            "test": {"004", "005"},
        },
        "fakes": fakes,
        "frame_ellipse": frame_ellipse,
        "skips": {
            "train": {},
            "validation": {"unreadable video": 1},
            "test": {"missing source original": 1, "missing original video": 1},
            "unsplit": {"not in official splits": 1},
        },
    }
