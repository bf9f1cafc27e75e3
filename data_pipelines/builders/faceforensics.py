"""`faceforensics`: FaceForensics++ face swaps as aligned frames, from manual_dir.

Expected tree (what FaceForensics++' download script writes with `-c <c> -t videos`, and
`-t masks` for the masks; `<c>` = the `compression` config field: raw, c23 (default) or c40):

    <manual_dir>/
      original_sequences/youtube/<c>/videos/NNN.mp4          the 1000 real videos, 000..999
      manipulated_sequences/<Method>/<c>/videos/TTT_SSS.mp4  frames of target video TTT with
                                                             the face of source video SSS
      manipulated_sequences/<Method>/masks/videos/TTT_SSS.mp4   optional manipulation masks
      manipulated_sequences/LCR/<c>/frames/TTT_SSS/NNNN.png  LCR swaps as frames (below)
      splits/{train,val,test}.json                           the official splits: lists of
                                                             ["TTT", "SSS"] id pairs

Methods read (config `methods`): by default the identity swaps Deepfakes, FaceShifter and
FaceSwap (the paper's FF++ rows are DeepFake, FaceShifter and LCR); the expression reenactment
methods Face2Face and NeuralTextures only when asked, with a warning: they keep the target's
identity, so their `source` and masks mean nothing for identity recovery. Only methods whose
folder exists are read, the others are listed in metadata["missing_methods"] (an error only if
none exists). DeepFakeDetection (actors' videos, other naming) is not read.
LCR (MegaFS's swapper, the paper's third FF++ row) is not part of the FF++ download: it is
read when asked for (`methods=("LCR",)` or `dataset=faceforensics,method=LCR`) from
`manipulated_sequences/LCR/<c>/`, either as videos named like the others or as frame images,
`frames/TTT_SSS/NNNN.png` (or .jpg): target video TTT's frame NNNN (its index in the original
video, from 0: e.g. `ffmpeg -i TTT.mp4 -start_number 0 %04d.png`) with source SSS's face swapped
in by MegaFS LCR. Any method's folder may hold frame folders; a pair present as both a video
and a frame folder is read from the video.
Compression (config `compression`): raw | c23 | c40, the download script's folder names
(`-c raw` is the lossless one; there is no `c0` folder).

Sources: github.com/ondyari/FaceForensics, dataset/README.md (folder structure, download
script options `-d <method> -c <c0|c23|c40> -t <videos|masks>`, `<target>_<source>` naming)
and dataset/splits/{train,val,test}.json (the official splits, pairs of 3-digit ids); the
`masks/videos` location matches the widely used download script and preprocessing code.
The split json files live in that repository, not in the download: copy them to `splits/`.

Faces are detected first, for every original frame the examples will use, on
`build_workers` processes (config.data.build_workers, 0 = one per core), and stored as each
video finishes under `<data_dir>/faceforensics/.detections/` (data_pipelines/detections.py):
a build that crashes or is killed later resumes without detecting them again, and with the
splits it had finished (every manual_dir builder keeps them: data_pipelines/resume.py).

Per example (`frames_per_video` frames per video, evenly spaced: round(linspace(0, n-1, k))):
- the face is detected (MTCNN, `alignment.FaceDetector`) on the TARGET's original frame with
  the same index and aligned (5 points, ArcFace template) to `image_size`; the fake frame and
  the mask frame are warped with that same matrix, so image, target and mask align pixel for
  pixel (the fake's own detection would drift with the swapped face);
- `source` is the aligned face of the source's original video at the same frame index
  (clipped to its length), with its own detection;
- `mask` is the mask video's frame (any channel > `mask_threshold`) when the method ships
  masks, else derived from |fake - target| (paired_images.derive_mask);
- landmarks (face-api 68 points) of the target crop; face_mask = hull of the fake's landmarks.
- `alpha` is -1.0 (unknown: a learned or graphics swapper, the texture share is not known).
Pristine examples (`include_pristine`): the original videos' aligned frames, label 0, mask
255 everywhere (a real face is its own source; `features.py`), alpha 0.

Splits: the official json; a video pair's two ids share a split, and every fake goes to the
split of its ids ("validation" for val.json). The official splits are video-disjoint, not
person-disjoint (one person can appear in several of the 1000 videos). An identity file
(config `identity_file`, default `splits/identities.txt` under manual_dir or an absolute path;
`<video id> <person id>` lines, e.g. from clustering the pristine faces) merges them per
person: all of a person's videos go to the most held-out split among them (test, then
validation, then train), so no validation or test person is trained on; the moves are counted
in metadata["moved_by_person"], and fakes whose pair the move separates are skipped as
cross-split pairs. Without the file a warning says the splits are video-disjoint only
(metadata["identity_source"] = "video id"). Skipped and counted per split
(`builder.skip_summary()`, metadata.json): unreadable/corrupt/empty videos, missing target or
source originals, frames without a detectable face, empty masks, frame-size mismatches,
truncated videos; files outside the official splits or with unparseable names are counted
under "unsplit".
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re

import cv2
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import alignment, detections, skips, splits, threads
from data_pipelines.builders import paired_images
from dfrec_jax import host_tf  # noqa: F401  (TensorFlow kept off the accelerators)

log = logging.getLogger(__name__)

IDENTITY_SWAPS = ("Deepfakes", "FaceShifter", "FaceSwap")
LCR = "LCR"  # MegaFS swaps of FF++ frames, made by the user (module docstring)
REENACTMENT = ("Face2Face", "NeuralTextures")  # the target's identity stays: not identity swaps
DEFAULT_METHODS = IDENTITY_SWAPS
KNOWN_METHODS = IDENTITY_SWAPS + (LCR,) + REENACTMENT
COMPRESSIONS = ("raw", "c23", "c40")
SPLIT_FILES = {"train": "train.json", "validation": "val.json", "test": "test.json"}
_FAKE_NAME = re.compile(r"^(?P<target>\d+)_(?P<source>\d+)(?P<video>\.mp4)?$")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")

# The docstring's expected tree (tfds prints it when manual_dir is missing).
MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__.split("\n\n", 1)[1].split("\nMethods read")[0]

LAYOUT = (
    "<manual_dir>/original_sequences/youtube/<raw|c23|c40>/videos/NNN.mp4, "
    "<manual_dir>/manipulated_sequences/<Method>/<raw|c23|c40>/videos/TTT_SSS.mp4, optional "
    "<manual_dir>/manipulated_sequences/<Method>/masks/videos/TTT_SSS.mp4, "
    "<manual_dir>/splits/{train,val,test}.json (FaceForensics++ download script + official splits)"
)


@dataclasses.dataclass(eq=False)
class FaceForensicsConfig(paired_images.SwapMaskConfig):
    """Options (see the module docstring).

    image_size: side of the aligned crops. compression: raw / c23 / c40 folder.
    methods: manipulation folders to read. frames_per_video: evenly spaced frames per video.
    include_pristine: original videos' frames as label-0 examples.
    min_face_confidence, min_face_size: MTCNN settings. Keep min_face_size at 20: mtcnn 1.0.0
      sizes its image pyramid as if it were 20, so a larger value makes its smallest levels
      too small and it finds no face at all (seen on 256x256 frames).
    detect_max_side: frames are downscaled to at most this side for detection only (FF++ faces
      are large; HD frames would make MTCNN slow); the alignment uses the full frame.
    mask_threshold: binarisation of mask-video frames (0..255).
    cache_videos: original videos whose crops are kept.
    identity_file: `<video id> <person id>` lines (relative to manual_dir, or absolute) that
      merge the official splits per person (module docstring); optional.
    The mask options (max_mask_fraction, derived masks' settings, landmark_batch):
      paired_images.SwapMaskConfig.
    """

    image_size: int = 224
    compression: str = "c23"
    methods: tuple = DEFAULT_METHODS
    frames_per_video: int = 8
    include_pristine: bool = True
    min_face_confidence: float = 0.9
    min_face_size: int = 20
    detect_max_side: int = 640
    mask_threshold: int = 127
    cache_videos: int = 64
    identity_file: str = "splits/identities.txt"


DEFAULT_CONFIG = FaceForensicsConfig(name="default", description="FaceForensics++ c23, 224x224")


def make_config(**overrides) -> FaceForensicsConfig:
    """The default config with `overrides` (any FaceForensicsConfig field), named accordingly;
    compression and methods checked (module docstring)."""
    compression = overrides.get("compression", DEFAULT_CONFIG.compression)
    if compression not in COMPRESSIONS:
        hint = " (the download script's lossless folder is `raw`)" if compression == "c0" else ""
        raise ValueError(f"faceforensics compression must be one of {', '.join(COMPRESSIONS)}, "
                         f"got {compression!r}{hint}")  # fmt: skip
    methods = tuple(overrides.get("methods", DEFAULT_METHODS))
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown or not methods:
        raise ValueError(f"faceforensics methods must be a non-empty subset of "
                         f"{KNOWN_METHODS}, got {methods}")  # fmt: skip
    reenactment = [m for m in methods if m in REENACTMENT]
    if reenactment:
        log.warning("faceforensics: %s reenact expressions (the identity stays the target's): "
                    "their source and masks mean nothing for identity recovery",
                    ", ".join(reenactment))  # fmt: skip
    return paired_images.named_config(FaceForensicsConfig, DEFAULT_CONFIG, **overrides)


def merge_people(split_of: dict, person_of: dict) -> tuple[dict, dict]:
    """`split_of` (video id -> split) with each person's videos in one split: the most held-out
    of their splits (test, then validation, then train). `person_of`: video id -> person
    (videos without an entry are their own person). Returns the merged map and the moves
    counted as {"train->test": n, ...}."""
    rank = {split: i for i, split in enumerate(splits.SPLITS)}  # train < validation < test
    people = {}
    for video_id in split_of:
        people.setdefault(person_of.get(video_id, ("video", video_id)), []).append(video_id)
    merged, moved = dict(split_of), {}
    for videos in people.values():
        held_out = max((split_of[v] for v in videos), key=rank.__getitem__)
        for video_id in videos:
            if split_of[video_id] != held_out:
                key = f"{split_of[video_id]}->{held_out}"
                moved[key] = moved.get(key, 0) + 1
                merged[video_id] = held_out
    return merged, dict(sorted(moved.items()))


# ---------------------------------------------------------------------------------------------
# Video reading.


class BadVideo(ValueError):
    """Why a video cannot be used (a short reason, the skip counter's key)."""


def evenly_spaced(count: int, k: int) -> list[int]:
    """k frame indices spread over [0, count-1] (all frames if there are fewer)."""
    if count <= 0 or k <= 0:
        return []
    if k >= count:
        return list(range(count))
    return sorted(set(np.round(np.linspace(0, count - 1, k)).astype(int).tolist()))


def _open(path: str):
    if not os.path.isfile(path):
        raise BadVideo("missing file")
    if os.path.getsize(path) == 0:
        raise BadVideo("empty video file")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise BadVideo("unreadable video")
    return capture


def frame_count(path: str) -> int:
    """Frames in a video (the container's count, or counted by decoding when it has none)."""
    capture = _open(path)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if count <= 0:
            count = 0
            while capture.grab():
                count += 1
    finally:
        capture.release()
    if count <= 0:
        raise BadVideo("unreadable video")
    return count


def decoded_frames(path: str, wanted: set):
    """(index, uint8 RGB frame) of the `wanted` indices that decode, in order, one frame at a
    time (a sequential read: grabbing is cheaper than seeking); BadVideo if the file cannot
    be opened (raised at the first frame asked for)."""
    if not wanted:
        return
    capture = _open(path)
    try:
        for i in range(max(wanted) + 1):
            if not capture.grab():
                break
            if i in wanted:
                ok, frame = capture.retrieve()
                if ok and frame is not None and frame.ndim == 3:
                    yield i, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def read_frames(path: str, indices) -> dict[int, np.ndarray]:
    """{index: uint8 RGB frame} for the requested indices that decode (sequential read)."""
    wanted = set(int(i) for i in indices)
    frames = dict(decoded_frames(path, wanted))
    if wanted and not frames:
        raise BadVideo("unreadable video")
    return frames


def frame_files(folder: str) -> dict[int, str]:
    """{frame index: path} of a frame folder's images (named by their index), in order."""
    if not os.path.isdir(folder):
        raise BadVideo("missing frame folder")
    files = {}
    for name in os.listdir(folder):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() in FRAME_SUFFIXES and stem.isdigit():
            files[int(stem)] = os.path.join(folder, name)
    if not files:
        raise BadVideo("empty frame folder")
    return dict(sorted(files.items()))


def fake_indices(path: str, k: int) -> list[int]:
    """The k evenly spaced frames a fake's examples use, as indices in the target video;
    `path` is a video, or a folder of frame images named by that index (module docstring)."""
    if not os.path.isdir(path):
        return evenly_spaced(frame_count(path), k)
    return _chosen_files(frame_files(path), k)


def _chosen_files(files: dict, k: int) -> list[int]:
    available = list(files)
    return [available[j] for j in evenly_spaced(len(available), k)]


def fake_frames(path: str, k: int) -> tuple[list[int], dict[int, np.ndarray], dict[int, str]]:
    """A fake's `fake_indices`, its frames there ({index: uint8 RGB}) and why any is missing
    ({index: reason})."""
    if not os.path.isdir(path):
        indices = fake_indices(path, k)
        return indices, read_frames(path, indices), {}
    files = frame_files(path)  # listed once for the indices and the reads
    indices = _chosen_files(files, k)
    frames, reasons = {}, {}
    for i in indices:
        try:
            frames[i] = skips.read_rgb8(files[i])
        except skips.BadImage as e:
            reasons[i] = f"frame image: {e}"
    if not frames:
        raise BadVideo(f"no readable frame image ({reasons[indices[0]]})")
    return indices, frames, reasons


@dataclasses.dataclass(frozen=True)
class FrameKeypoints:
    """`(path, indices) -> {index: float32 [5,2] keypoints of the frame's best face, or why
    there are none}`, decoding the video once and keeping no frame. Picklable (the detection
    worker processes get one; its model loads there). Detection runs on a copy downscaled to
    `detect_max_side` (FF++ faces are large; HD frames would make MTCNN slow)."""

    detector: alignment.FaceDetector
    detect_max_side: int

    def keypoints(self, frame: np.ndarray) -> np.ndarray | None:
        scale = min(1.0, self.detect_max_side / max(frame.shape[:2]))
        small = frame
        if scale < 1.0:
            small_size = (round(frame.shape[1] * scale), round(frame.shape[0] * scale))
            small = cv2.resize(frame, small_size, interpolation=cv2.INTER_AREA)
        face = self.detector.largest(small)
        if face is None:
            return None
        # Pixel centres at integer coordinates: x_full + 0.5 = (x_small + 0.5) / scale.
        return (face.keypoints + 0.5) / scale - 0.5

    def __call__(self, path: str, indices) -> dict:
        wanted, found = set(int(i) for i in indices), {}
        try:
            for i, frame in decoded_frames(path, wanted):
                points = self.keypoints(frame)
                found[i] = "no face" if points is None else points
        except BadVideo as e:
            log.warning("%s: %s", path, e)
        return {i: found.get(i, "truncated video") for i in wanted}


class _Original:
    """One original video: its frame count and its aligned faces, from the keypoints
    `keypoints(video id, path, indices)` returns (stored by the detection pass)."""

    def __init__(self, video_id: str, path: str, size: int, keypoints):
        self.video_id, self.path, self.size = video_id, path, size
        self.keypoints = keypoints
        self.faces = {}  # index -> (crop, matrix, frame shape) or a skip reason
        try:
            self.count = frame_count(path)
            self.error = None
        except BadVideo as e:
            self.count, self.error = 0, str(e)

    def clip(self, index: int) -> int:
        return min(index, self.count - 1)

    def faces_at(self, indices) -> dict:
        need = sorted({i for i in indices if i not in self.faces})
        if need:
            points = self.keypoints(self.video_id, self.path, need)
            found = [i for i in need if not isinstance(points[i], str)]
            try:
                frames = read_frames(self.path, found) if found else {}
            except BadVideo as e:
                frames = {}
                log.warning("%s: %s", self.path, e)
            for i in need:
                if isinstance(points[i], str):
                    self.faces[i] = points[i]
                elif i not in frames:
                    self.faces[i] = "truncated video"
                else:
                    crop, matrix = alignment.align(frames[i], points[i], self.size)
                    self.faces[i] = (crop, matrix, frames[i].shape)
        return {i: self.faces[i] for i in indices}


@dataclasses.dataclass(frozen=True)
class _Fake:
    path: str
    method: str
    target: str
    source: str
    mask_path: str | None


@dataclasses.dataclass(frozen=True)
class _Skip:
    item: str
    reason: str


# ---------------------------------------------------------------------------------------------


class FaceForensics(paired_images.ManualBuilder):
    """FaceForensics++ fake frames aligned with their true target and source faces."""

    name = "faceforensics"
    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {
        **paired_images.RELEASE_NOTES,
        "2.1.0": "The official splits merged per person when an identity file exists "
        "(config identity_file, default splits/identities.txt); metadata identity_source and "
        "moved_by_person.",
        "3.0.0": paired_images.RELEASE_NOTES["3.0.0"] + " LCR swaps read from frame folders.",
    }
    BUILDER_CONFIGS = [DEFAULT_CONFIG]
    DEFAULT_BUILDER_CONFIG_NAME = "default"
    LAYOUT = LAYOUT
    HOMEPAGE = "https://github.com/ondyari/FaceForensics"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _official_splits(self, root: str) -> dict[str, str]:
        """video id -> split name, from splits/{train,val,test}.json."""
        folder = splits.require_dir(os.path.join(root, "splits"), self.name, self.LAYOUT)
        split_of = {}
        for split, filename in SPLIT_FILES.items():
            path = os.path.join(folder, filename)
            try:
                with open(path) as f:
                    pairs = json.load(f)
                ids = [str(i) for pair in pairs for i in pair]
            except FileNotFoundError:
                raise splits.DatasetLayoutError(
                    f"{self.name}: split file not found: {path!r}; expected layout: {self.LAYOUT}"
                ) from None
            except (ValueError, TypeError) as e:
                raise splits.DatasetLayoutError(
                    f"{self.name}: {path!r} is not a json list of id pairs ({e})"
                ) from None
            for video_id in ids:
                if split_of.setdefault(video_id, split) != split:
                    log.warning("%s: id %s in two split files", self.name, video_id)
        return split_of

    def _person_merged(self, root: str, split_of: dict) -> dict:
        """The official splits merged per person when the identity file exists (module
        docstring); unchanged, with a warning, when it does not."""
        path = os.path.join(root, self.builder_config.identity_file)
        if not os.path.isfile(path):
            log.warning("%s: no identity file %r: the official splits are video-disjoint, not "
                        "person-disjoint (the same person can be in several splits)",
                        self.name, path)  # fmt: skip
            self.info.metadata["identity_source"] = "video id"
            self.info.metadata["moved_by_person"] = {}
            return split_of
        keyed = paired_images.read_identity_file(path)  # keys lose zero padding ("007" -> "7")
        person_of = {v: keyed[paired_images.image_key(v)] for v in split_of
                     if paired_images.image_key(v) in keyed}  # fmt: skip
        merged, moved = merge_people(split_of, person_of)
        log.info("%s: identities from %s (%d of %d videos): moved %s", self.name, path,
                 len(person_of), len(split_of), moved or "none")  # fmt: skip
        self.info.metadata["identity_source"] = "file"
        self.info.metadata["moved_by_person"] = moved
        return merged

    def _split_generators(self, dl_manager):
        config = self.builder_config
        root = self._manual_root(dl_manager)
        counters = self._new_counters()
        originals_dir = splits.require_dir(
            os.path.join(root, "original_sequences", "youtube", config.compression, "videos"),
            self.name,
            self.LAYOUT,
        )
        originals = {
            os.path.splitext(f)[0]: os.path.join(originals_dir, f)
            for f in sorted(os.listdir(originals_dir))
            if f.endswith(".mp4")
        }
        split_of = self._person_merged(root, self._official_splits(root))

        manipulated = os.path.join(root, "manipulated_sequences")
        present, missing = {}, []
        for method in config.methods:
            folders = [os.path.join(manipulated, method, config.compression, kind)
                       for kind in ("videos", "frames")]  # fmt: skip
            if any(os.path.isdir(f) for f in folders):
                present[method] = [f for f in folders if os.path.isdir(f)]
            else:
                missing.append(method)
        self.info.metadata["methods"] = sorted(present)
        self.info.metadata["missing_methods"] = missing
        if missing:
            log.warning("%s: method folders not found (skipped): %s", self.name, missing)
        if not present:
            splits.require_dir(
                os.path.join(manipulated, config.methods[0], config.compression, "videos"),
                self.name,
                f"{self.LAYOUT} (none of the method folders {', '.join(config.methods)} exists)",
            )

        fakes = {s: [] for s in splits.SPLITS}
        for method, folders in present.items():
            mask_dir = os.path.join(manipulated, method, "masks", "videos")
            videos = set()
            for path in (os.path.join(f, name) for f in folders for name in sorted(os.listdir(f))):
                # videos/TTT_SSS.mp4 files, frames/TTT_SSS folders (module docstring)
                match = _FAKE_NAME.match(os.path.basename(path))
                is_video = os.path.basename(os.path.dirname(path)) == "videos"
                if not match or bool(match.group("video")) != is_video:
                    counters[paired_images.UNSPLIT].skip(path, "unrecognised file name")
                    continue
                target, source = match.group("target"), match.group("source")
                if is_video:
                    videos.add((target, source))
                elif (target, source) in videos:
                    counters[paired_images.UNSPLIT].skip(path, "pair also given as a video")
                    continue
                split, source_split = split_of.get(target), split_of.get(source)
                if split is None or source_split is None:
                    counters[paired_images.UNSPLIT].skip(path, "not in official splits")
                elif split != source_split:
                    counters[split].skip(path, "cross-split pair")
                elif target not in originals:
                    counters[split].skip(path, "missing target original")
                elif source not in originals:
                    counters[split].skip(path, "missing source original")
                else:
                    mask_path = os.path.join(mask_dir, f"{target}_{source}.mp4")
                    mask_path = mask_path if os.path.isfile(mask_path) else None
                    fakes[split].append(_Fake(path, method, target, source, mask_path))
        pristine = {s: [] for s in splits.SPLITS}
        if config.include_pristine:
            for video_id, split in sorted(split_of.items()):
                if video_id in originals:
                    pristine[split].append(video_id)
                else:
                    counters[split].skip(video_id, "missing original video")
        self._record_skips()

        keypoints = self._detect_faces(root, originals, fakes, pristine)
        self._videos = paired_images.LRU(config.cache_videos)
        self._original = lambda video_id: self._videos.get(
            video_id,
            lambda: _Original(video_id, originals[video_id], config.image_size, keypoints),
        )
        generators = {}
        for split in splits.SPLITS:
            plan = sorted(fakes[split], key=lambda f: (f.target, f.method, f.source))
            if plan or pristine[split]:
                generators[split] = self._generate_examples(split, plan, pristine[split])
            else:
                log.warning("%s: no examples planned for split %s", self.name, split)
        if not generators:
            raise paired_images.EmptySplitError(f"{self.name}: no usable video in {root!r}")
        return generators

    def _detections_folder(self, root: str) -> str:
        """Where the keypoints of this manual_dir's videos are kept (detections.Store), named
        by what they depend on: the videos' folder and the detector's settings."""
        config = self.builder_config
        settings = [os.path.abspath(root), config.compression, config.min_face_confidence,
                    config.min_face_size, config.detect_max_side,
                    importlib.metadata.version("mtcnn")]  # fmt: skip
        digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
        return os.path.join(self.data_dir_root, self.name, ".detections", digest)

    def _detect_faces(self, root: str, originals: dict, fakes: dict, pristine: dict):
        """Detects, before any example is made, the faces of every original frame the
        examples will use, on `build_workers` processes, stored as they come (a crashed build
        resumes without detecting them again; detections.py). Returns the generation's
        `keypoints(video id, path, indices)`, which reads the store (and detects in this
        process whatever the plan missed)."""
        config = self.builder_config
        k = config.frames_per_video
        counts = {}

        def count(video_id):
            if video_id not in counts:
                try:
                    counts[video_id] = frame_count(originals[video_id])
                except BadVideo:
                    counts[video_id] = 0  # skipped, and counted, when its examples are made
            return counts[video_id]

        jobs = {}

        def need(video_id, indices):
            if count(video_id):
                frames = jobs.setdefault(video_id, (originals[video_id], set()))[1]
                frames.update(min(i, count(video_id) - 1) for i in indices)

        for split in splits.SPLITS:
            for fake in fakes[split]:
                try:
                    indices = fake_indices(fake.path, k)
                except BadVideo:
                    continue  # counted when its examples are made
                need(fake.target, indices)
                need(fake.source, indices)
            for video_id in pristine[split]:
                need(video_id, evenly_spaced(count(video_id), k))
        detect = FrameKeypoints(
            paired_images.face_detector(config.min_face_confidence, config.min_face_size),
            config.detect_max_side,
        )
        store = detections.Store(self._detections_folder(root))
        done = detections.detect_all(
            store, jobs, detect, detections.workers_for(self.build_workers)
        )
        log.info("%s: faces of %d videos detected, %d read from %s", self.name, done["videos"],
                 done["reused"], store.folder)  # fmt: skip

        def keypoints(video_id: str, path: str, indices) -> dict:
            stored = store.get(video_id, path)
            missing = [i for i in indices if i not in stored]
            if missing:
                found = detect(path, missing)
                store.put(video_id, path, found)
                stored.update(found)
            return stored

        return keypoints

    def _read_fake(self, fake: _Fake):
        """Everything a fake's examples need from its videos, decoded and detected: (target,
        source, frame indices, fake frames, why frames are missing, mask frames, target faces,
        source faces), or a
        _Skip. Runs one fake ahead of the example writing, on its own thread (one: fakes in a row
        share their target video, whose faces `_Original` keeps)."""
        config = self.builder_config
        target = self._original(fake.target)
        source = self._original(fake.source)
        if target.error or source.error:
            which, error = ("target", target.error) if target.error else ("source", source.error)
            return _Skip(fake.path, f"{which} original: {error}")
        try:
            indices, frames, missing = fake_frames(fake.path, config.frames_per_video)
        except BadVideo as e:
            return _Skip(fake.path, str(e))
        masks = {}
        if fake.mask_path:
            try:
                masks = read_frames(fake.mask_path, indices)
            except BadVideo as e:  # fall back to derived masks, say so
                log.warning("%s: %s; deriving masks instead", fake.mask_path, e)
        # One sequential read per video: all the frames this fake needs, at once.
        targets = target.faces_at([target.clip(i) for i in indices])
        sources = source.faces_at([source.clip(i) for i in indices])
        return target, source, indices, frames, missing, masks, targets, sources

    def _generate_examples(self, split: str, plan: list, pristine: list):
        return self._annotated(split, self._parts(split, plan, pristine))

    def _parts(self, split: str, plan: list, pristine: list):
        config = self.builder_config
        size = config.image_size
        counter = self._counters[split]
        for fake, read in threads.ordered_map(self._read_fake, plan, workers=1, ahead=1):
            if isinstance(read, _Skip):
                counter.skip(read.item, read.reason)
                continue
            target, source, indices, frames, missing, masks, targets, sources = read
            frame_folder = os.path.isdir(fake.path)
            for i in indices:
                item = f"{fake.path}#{i}"
                if frame_folder and i >= target.count:  # a frame image names a frame the
                    counter.skip(item, "frame index past the target video")  # video lacks
                    continue
                entry = targets[target.clip(i)]
                if i not in frames:
                    counter.skip(item, missing.get(i, "truncated video"))
                    continue
                if isinstance(entry, str):
                    counter.skip(item, entry)
                    continue
                target_crop, matrix, shape = entry
                if frames[i].shape != shape:
                    counter.skip(item, "frame size mismatch")
                    continue
                image = alignment.warp_like(frames[i], matrix, size)
                if i in masks and masks[i].shape == shape:
                    mask = paired_images.binarise_mask(
                        alignment.warp_like(masks[i], matrix, size), config.mask_threshold
                    )
                    mask_source = "dataset"
                else:
                    mask = paired_images.derive_mask_with(config, image, target_crop)
                    mask_source = "derived"
                reason = paired_images.implausible_mask(mask, config.max_mask_fraction)
                if reason is not None:
                    counter.skip(item, reason)
                    continue
                source_entry = sources[source.clip(i)]
                if isinstance(source_entry, str):
                    counter.skip(item, f"source: {source_entry}")
                    continue
                key = f"{fake.method}/{fake.target}_{fake.source}/{i:06d}"
                yield (
                    key,
                    paired_images.forgery_parts(
                        image,
                        source_entry[0],
                        target_crop,
                        mask,
                        fake.method,
                        fake.source,
                        fake.target,
                        mask_source,
                    ),
                )
        for video_id in pristine:
            video = self._original(video_id)
            if video.error:
                counter.skip(video.path, video.error)
                continue
            indices = evenly_spaced(video.count, config.frames_per_video)
            for i, entry in video.faces_at(indices).items():
                if isinstance(entry, str):
                    counter.skip(f"{video.path}#{i}", entry)
                    continue
                yield (
                    f"pristine/{video_id}/{i:06d}",
                    paired_images.pristine_parts(entry[0], video_id),
                )


BUILDER = FaceForensics
