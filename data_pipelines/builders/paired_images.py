"""Shared machinery of the builders that read a user's `manual_dir` (FF++, MegaFS, E4S).

- `ManualBuilder`: the TFDS base (feature dict, metadata, skip counts per split kept in
  `info.metadata["skipped"]` and so in metadata.json, `skip_summary()`, manual_dir checks).
- `PairedImageBuilder`: a dataset of still swaps next to the originals they were made from
  (`celeba_megafs`, `ffhq_e4s`): each swap file names its target and source originals.
- `derive_mask`: the source-carrying region of a swap when the dataset ships no mask.
- `Annotator`: 68 landmarks (face-api net) and the landmark-hull face mask, batched.

Derived masks (datasets without ground truth): the per-pixel difference between the swap and
its target, both already at the output size, `d = max_c |fake - target|`, is smoothed with a
5x5 Gaussian (video and JPEG noise is per pixel; a swapped face differs over whole regions),
thresholded at `diff_threshold` (of 255), closed with an elliptic kernel of `mask_close * S`
pixels (joins the face parts the swap left almost unchanged, e.g. flat cheeks), its holes
filled (eyes, mouth of a swapped face are source pixels too), regions smaller than
`min_region * S^2` dropped (isolated compression blocks) and, optionally, dilated by
`mask_dilate` pixels. Outside the result the smoothed difference is at most `diff_threshold`
except in the dropped specks; an empty result (a "swap" identical to its target) is skipped.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import re
import threading

import cv2
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import split_builder as split_builder_lib
from tensorflow_datasets.core import splits as splits_lib

from data_pipelines import alignment, features, landmarks, resume, skips, splits, threads
from dfrec_jax import host_tf  # noqa: F401  (TensorFlow kept off the accelerators)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
UNSPLIT = "unsplit"  # skip-count bucket for files that belong to no split


class EmptySplitError(ValueError):
    """Every candidate of a split was skipped: the folder is unusable as it is."""


# ---------------------------------------------------------------------------------------------
# Models shared by every builder in a process (each loads/compiles once).


@functools.lru_cache(maxsize=None)
def face_detector(min_confidence: float = 0.9, min_face_size: int = 20):
    return alignment.FaceDetector(min_confidence=min_confidence, min_face_size=min_face_size)


@functools.lru_cache(maxsize=None)
def landmark_detector(batch_size: int = 64):
    return landmarks.LandmarkDetector(batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# Image helpers.


def resize_square(image: np.ndarray, size: int) -> np.ndarray | None:
    """uint8 [size,size,3] of a square image (area-averaged when shrinking); None if not square."""
    height, width = image.shape[:2]
    if height != width:
        return None
    if height == size:
        return image
    interpolation = cv2.INTER_AREA if height > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """bool [H,W]: `mask` plus every background pixel not connected to the image border."""
    mask = mask.astype(np.uint8)
    padded = np.pad(mask, 1)
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8), (0, 0), 1)
    return (padded | (1 - flood)).astype(bool)[1:-1, 1:-1]


def derive_mask(
    fake: np.ndarray,
    target: np.ndarray,
    diff_threshold: float = 20.0,
    mask_close: float = 0.04,
    min_region: float = 0.002,
    mask_dilate: int = 0,
) -> np.ndarray:
    """uint8 [S,S,1] (255 = source-carrying) from a swap and its target (module docstring)."""
    size = fake.shape[0]
    diff = np.abs(fake.astype(np.int16) - target.astype(np.int16)).max(-1).astype(np.float32)
    diff = cv2.GaussianBlur(diff, (5, 5), 0)
    mask = (diff > diff_threshold).astype(np.uint8)
    k = max(int(round(mask_close * size)) | 1, 3)
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    )
    mask = fill_holes(mask).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_region * size * size
    mask = keep[labels].astype(np.uint8)
    if mask_dilate > 0:
        d = 2 * mask_dilate + 1
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d)))
    return (mask * 255)[..., None]


def implausible_mask(mask: np.ndarray, max_fraction: float) -> str | None:
    """Why a forgery mask cannot be a face swap's region, or None: empty, or covering more
    than `max_fraction` of the aligned crop (a face fills about half of it; a mask over
    nearly everything means the swap and its "target" are not the same frame, e.g. a wrong
    originals folder)."""
    share = float(np.mean(mask > 0))
    if share == 0.0:
        return "empty mask"
    if share > max_fraction:
        return f"implausible mask (over {max_fraction:.0%} of the image)"
    return None


def derive_mask_with(config, fake: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`derive_mask` with the thresholds of a builder config (diff_threshold, mask_close,
    min_region, mask_dilate fields)."""
    return derive_mask(
        fake, target, config.diff_threshold, config.mask_close, config.min_region,
        config.mask_dilate,
    )  # fmt: skip


def binarise_mask(frame: np.ndarray, threshold: int = 127) -> np.ndarray:
    """uint8 [S,S,1] 255/0 of a (compressed, warped) mask image: any channel above threshold."""
    gray = frame.max(-1) if frame.ndim == 3 else frame
    return np.where(gray > threshold, 255, 0).astype(np.uint8)[..., None]


# ---------------------------------------------------------------------------------------------
# Small utilities.


class LRU:
    """A bounded mapping that forgets the least recently used entry."""

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 1)
        self._data = collections.OrderedDict()
        self._lock = threading.Lock()  # builders' worker threads share it (threads.py)

    def get(self, key, make):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()  # unlocked: two threads may make one key, with the same result
        with self._lock:
            self._data[key] = value
            if len(self._data) > self.capacity:
                self._data.popitem(last=False)
        return value


def image_key(stem: str) -> str:
    """Canonical image id: numeric names lose their zero padding ("00042" == "42")."""
    return str(int(stem)) if stem.isdigit() else stem


def _single_channel(path: str) -> bool:
    """True when an image file's header says one channel (a label map or mask, not a face);
    unreadable files are left to the decoder, which counts them."""
    try:
        with Image.open(path) as image:
            return image.mode in ("1", "L", "P", "I", "I;16", "F")
    except (OSError, ValueError):
        return False


def index_images(folder: str) -> dict[str, str]:
    """image_key(stem) -> path of every image file under `folder` (recursively, sorted).

    A sub-folder whose first image is single-channel is an auxiliary folder (E4S' FFHQ
    preparation writes BiSeNet label maps with the faces' names, e.g. `BiSeNet_mask/`): its
    files are not faces and are left out, with one line naming the folder."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        images = [
            n for n in sorted(filenames)
            if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and not n.startswith(".")
        ]  # fmt: skip
        if images and _single_channel(os.path.join(dirpath, images[0])):
            log.warning("%s: ignored %d single-channel images in %s (masks or label maps, not "
                        "faces)", folder, len(images), dirpath)  # fmt: skip
            continue
        for name in images:
            key = image_key(os.path.splitext(name)[0])
            if key in found:
                log.warning("%s: duplicate image id %s, using %s", folder, key, found[key])
                continue
            found[key] = os.path.join(dirpath, name)
    return found


def list_files(folder: str) -> list[str]:
    """Every file under `folder`, recursively, in sorted order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return out


def first_dir(root: str, candidates) -> str | None:
    for rel in candidates:
        path = os.path.join(root, rel)
        if os.path.isdir(path):
            return path
    return None


def find_file(root: str, rel: str) -> str | None:
    """`root/rel` if it exists, else the first file named like `rel` anywhere below `root`
    (sorted walk: e.g. CelebAMask-HQ unpacks its mapping file one folder down)."""
    if os.path.isfile(os.path.join(root, rel)):
        return os.path.join(root, rel)
    name = os.path.basename(rel)
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if name in files:
            return os.path.join(folder, name)
    return None


def read_identity_file(path: str) -> dict[str, str]:
    """{image_key: person} from `<image id> <person id>` lines (headers and blanks ignored)."""
    ids = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            stem = os.path.splitext(parts[0])[0]
            if not stem.isdigit() and not parts[1].isdigit():
                continue  # a header row such as "idx orig_idx orig_file"
            ids[image_key(stem)] = parts[1]
    return ids


def named_config(config_cls, base, **overrides):
    """A config like `base` with `overrides`, named after what differs ("image_size-112+...").

    Distinct options get distinct names, hence distinct prepared-data folders.
    """
    if not overrides:
        return base
    name = overrides.pop("name", None)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} fields: {sorted(unknown)}")
    parts = []
    for key in sorted(overrides):
        value = overrides[key]
        if value == getattr(base, key):
            continue
        if isinstance(value, (bool, int, float, str)) and re.fullmatch(r"[\w.]{1,24}", str(value)):
            parts.append(f"{key}-{value}")
        else:
            digest = hashlib.sha1(repr(value).encode()).hexdigest()[:8]
            parts.append(f"{key}-{digest}")
    if not parts and name is None:
        return base
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(config_cls)}
    kwargs.update(overrides)
    kwargs["name"] = name or "+".join(parts)  # tfds config names allow [\w+\-.]
    kwargs["description"] = f"{base.description or ''} ({', '.join(parts)})".strip()
    return config_cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Landmarks and face masks, batched.


class Annotator:
    """Collects half-made examples and completes them in landmark batches.

    `landmarks` are the TARGET face's (the features contract); `face_mask` is the hull of the
    landmarks of `image` (the face region blended forgeries paste into). A pristine face is its
    own target, so it costs one landmark image, a forgery two. Forgeries get alpha -1
    (unknown: these datasets are made by learned swappers), pristine faces mask 255 and alpha
    0 (`features.pristine_example`).
    """

    def __init__(self, detector, size: int):
        self.detector = detector
        self.size = size
        self.capacity = max(getattr(detector, "batch_size", 64), 2)
        self.pending = []
        self.images = 0

    def add(self, key: str, parts: dict) -> list:
        self.pending.append((key, parts))
        self.images += 1 if parts["label"] == 0 else 2
        return self.flush() if self.images >= self.capacity - 1 else []

    def flush(self) -> list:
        if not self.pending:
            return []
        crops = []
        for _, parts in self.pending:
            crops.append(parts["image"])
            if parts["label"]:
                crops.append(parts["target"])
        points = self.detector(np.stack(crops))
        done, i = [], 0
        for key, parts in self.pending:
            image_points = points[i]
            target_points = points[i + 1] if parts["label"] else image_points
            i += 2 if parts["label"] else 1
            face_mask = landmarks.hull_mask(image_points, self.size)
            if parts["label"]:
                example = features.forgery_example(
                    image=parts["image"],
                    source=parts["source"],
                    target=parts["target"],
                    mask=parts["mask"],
                    face_mask=face_mask,
                    landmarks=target_points,
                    method=parts["method"],
                    source_id=parts["source_id"],
                    target_id=parts["target_id"],
                    # Learned swappers: how much of the source's texture is in the face is
                    # not known.
                    alpha=features.ALPHA_UNKNOWN,
                    mask_source=parts["mask_source"],
                )
            else:
                example = features.pristine_example(
                    parts["image"], face_mask, image_points, parts["target_id"]
                )
            done.append((key, example))
        self.pending, self.images = [], 0
        return done


def pristine_parts(image: np.ndarray, identity: str) -> dict:
    return {"label": 0, "image": image, "target_id": identity}


def forgery_parts(image, source, target, mask, method, source_id, target_id,
                  mask_source) -> dict:  # fmt: skip
    return {
        "mask_source": mask_source,
        "label": 1,
        "image": image,
        "source": source,
        "target": target,
        "mask": mask,
        "method": method,
        "source_id": source_id,
        "target_id": target_id,
    }


# ---------------------------------------------------------------------------------------------
# TFDS base.


# Shared by faceforensics, celeba_megafs and ffhq_e4s (their features change together).
RELEASE_NOTES = {
    "1.0.0": "First release.",
    "2.0.0": "Pristine faces carry mask 255 everywhere (a real face is its own source; was 0). "
    "New feature `alpha` (float32): 0 for pristine faces, -1 (unknown) for these datasets' "
    "forgeries.",
    "3.0.0": 'New feature `mask_source` per example (features.py): "dataset" or "derived" for '
    'forgeries, "pristine" for real faces.',
}


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the manual_dir builders: features, metadata, skip accounting."""

    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = RELEASE_NOTES
    LAYOUT = ""  # one-paragraph expected tree (the DatasetLayoutError text)
    HOMEPAGE = ""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip().split("\n")[0],
            features=features.features_dict(self.builder_config.image_size),
            homepage=self.HOMEPAGE or None,
            metadata=tfds.core.MetadataDict(),
        )

    def skip_summary(self) -> dict[str, dict[str, int]]:
        """{split: {reason: count}} of the inputs skipped while building (from metadata.json)."""
        skipped = self.info.metadata.get("skipped", {}) if self.info.metadata else {}
        return {split: dict(reasons) for split, reasons in skipped.items()}

    # The manual_dir `datasets.get_builder` was given: what source_fingerprint reads, so that
    # `datasets.prepare` rebuilds when the downloaded tree changes (as lfw_swap's folder).
    manual_dir: str | None = None
    # Processes that detect faces (faceforensics; detections.py): 1 = this process only, 0 =
    # one per core. Not a builder option: it does not change the data. config.data.build_workers
    # (default 0) sets it through `datasets.get_builder`.
    build_workers: int = 1

    def source_fingerprint(self) -> str | None:
        """The manual_dir's listing fingerprint (splits.tree_fingerprint); None without one."""
        if not self.manual_dir or not os.path.isdir(self.manual_dir):
            return None
        return splits.tree_fingerprint(self.manual_dir)

    def _manual_root(self, dl_manager) -> str:
        """The manual_dir (its fingerprint recorded in the metadata), or DatasetLayoutError
        naming it and the expected tree."""
        try:
            path = dl_manager.manual_dir
        except AssertionError:  # tfds' own "does not exist or is empty"
            path = getattr(dl_manager, "_manual_dir", None)
            if path is not None and os.path.isdir(path):
                raise splits.DatasetLayoutError(
                    f"{self.name}: manual_dir is empty: {str(path)!r}; expected layout: "
                    + " ".join(self.LAYOUT.split())
                ) from None
        root = splits.require_dir(str(path) if path else "", self.name, self.LAYOUT)
        self.info.metadata["source_fingerprint"] = splits.tree_fingerprint(root)
        return root

    def _kept_splits(self) -> str:
        """Where finished splits are kept until the build succeeds (data_pipelines/resume.py)."""
        return os.path.join(self.data_dir_root, self.name, ".splits", self.builder_config.name,
                            str(self.version))  # fmt: skip

    def _generate_splits(self, dl_manager, download_config):
        """tfds' split generation, one split at a time, each kept as soon as it is written and
        reused by the next build when this one dies later (data_pipelines/resume.py). The
        planning (`_split_generators`) runs every time: skip counts and metadata stay whole."""
        writer = split_builder_lib.SplitBuilder(
            split_dict=self.info.splits,
            features=self.info.features,
            dataset_size=self.info.dataset_size,
            max_examples_per_split=download_config.max_examples_per_split,
            beam_options=None,  # these builders are plain generators
            beam_runner=None,
            shard_config=download_config.get_shard_config(),
            example_writer=self._example_writer(),
            ignore_duplicates=download_config.ignore_duplicates,
        )
        generators = self._split_generators(dl_manager)
        # What a kept split must have been built from: the input tree, every config value
        # (defaults included), the file format, and any cap on the examples.
        fingerprint = [
            self.info.metadata.get("source_fingerprint"),
            repr(self.builder_config),
            str(self.info.file_format),
            download_config.max_examples_per_split,
        ]
        infos = []
        for split, generator in generators.items():
            template = self._get_filename_template(split)
            folder = os.path.join(self._kept_splits(), split)
            kept = resume.restore(folder, fingerprint, lambda n, template=template: [
                str(p) for p in template.sharded_filepaths(n)])  # fmt: skip
            if kept is not None:
                self._counters[split].by_reason = collections.Counter(kept["skipped"])
                self._mask_sources[split] = collections.Counter(kept["mask_source"])
                self._record_skips()
                log.info("%s/%s: %d examples kept from an earlier build that did not finish",
                         self.name, split, sum(kept["shard_lengths"]))  # fmt: skip
                info = splits_lib.SplitInfo(name=split, shard_lengths=kept["shard_lengths"],
                                            num_bytes=kept["num_bytes"],
                                            filename_template=template)  # fmt: skip
            else:
                info = writer.submit_split_generation(
                    split_name=split,
                    generator=generator,
                    filename_template=template,
                    disable_shuffling=self.info.disable_shuffling,
                    nondeterministic_order=download_config.nondeterministic_order,
                ).result()
                files = [str(p) for p in template.sharded_filepaths(len(info.shard_lengths))]
                resume.keep(folder, files, {
                    "fingerprint": fingerprint,
                    "shard_lengths": list(info.shard_lengths),
                    "num_bytes": int(info.num_bytes),
                    "skipped": self._counters[split].summary(),
                    "mask_source": dict(self._mask_sources[split]),
                })  # fmt: skip
            infos.append(info)
        return infos

    def download_and_prepare(self, *args, **kwargs):
        super().download_and_prepare(*args, **kwargs)
        # Only now is the build in place (tfds writes its info and renames the folder after
        # the splits): the kept splits can go.
        resume.discard(self._kept_splits())

    def _new_counters(self) -> dict[str, skips.SkipCounter]:
        counters = {s: skips.SkipCounter(f"{self.name}/{s}") for s in splits.SPLITS}
        counters[UNSPLIT] = skips.SkipCounter(f"{self.name}/{UNSPLIT}")
        self._counters = counters
        # Forgeries' `mask_source` (features.py) counted per split as they are written.
        self._mask_sources = {s: collections.Counter() for s in splits.SPLITS}
        self._record_skips()
        return counters

    def _record_skips(self) -> None:
        """Skip counts and mask sources per split into the metadata (metadata.json)."""
        self.info.metadata["skipped"] = {
            split: counter.summary()
            for split, counter in self._counters.items()
            if split != UNSPLIT or counter.total
        }
        self.info.metadata["mask_source"] = {
            split: dict(sorted(counts.items())) for split, counts in self._mask_sources.items()
        }

    def _finish_split(self, split: str, yielded: int) -> None:
        counter = self._counters[split]
        self._record_skips()
        log.info("%s/%s: %d examples, %s", self.name, split, yielded, counter)
        if yielded == 0:
            raise EmptySplitError(
                f"{self.name}: every candidate of split {split!r} was skipped ({counter}); "
                "check the files against the layout in the builder's docstring"
            )

    def _annotated(self, split: str, parts_iter):
        """Yields (key, example) of (key, parts) items through an Annotator; counts the split."""
        annotator = Annotator(
            landmark_detector(self.builder_config.landmark_batch), self.builder_config.image_size
        )
        yielded = 0
        size = self.builder_config.image_size

        def encode(item):
            return item[0], features.encode_pngs(item[1], size)

        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="png") as pool:

            def written(items):
                nonlocal yielded
                # OpenCV releases the GIL: both cores. Counted as yielded (tfds may stop early).
                for key, example in pool.map(encode, items):
                    yielded += 1
                    if example["label"]:
                        self._mask_sources[split][example["mask_source"]] += 1
                    yield key, example

            for key, parts in parts_iter:
                yield from written(annotator.add(key, parts))
            yield from written(annotator.flush())
        self._finish_split(split, yielded)


# ---------------------------------------------------------------------------------------------
# Still-image swap datasets.


@dataclasses.dataclass(eq=False)
class SwapMaskConfig(tfds.core.BuilderConfig):
    """The mask options every swap builder shares (this module's and faceforensics.py's).

    max_mask_fraction: a forgery whose mask covers more of the image is skipped and counted
      as implausible (`implausible_mask`).
    diff_threshold, mask_close, min_region, mask_dilate: `derive_mask` (module docstring).
    landmark_batch: batch of the landmark net (one compiled program).
    """

    max_mask_fraction: float = 0.85
    diff_threshold: float = 20.0
    mask_close: float = 0.04
    min_region: float = 0.002
    mask_dilate: int = 0
    landmark_batch: int = 64


@dataclasses.dataclass(eq=False)
class PairedImageConfig(SwapMaskConfig):
    """Options of a swap-image dataset (see the builder docstrings for the folder layout).

    image_size: output side S (images are resized, not re-aligned).
    originals_dirs: candidate folders (relative to manual_dir) of the original images; the
      first that exists is indexed recursively by file stem ("00042.png" and "42.jpg" are id 42).
    method_dirs: (method, candidate folders) per swap method; missing ones are reported in
      metadata["missing_methods"] (an error only if every method is missing).
    swap_pattern: regex on a swap's file name with named groups `target` and `source`.
    identity_files: candidate `<image id> <person id>` files, looked for at manual_dir and then
      anywhere below it (first match by name); without one every image id is its own identity
      (a warning says so: two photos of one person may then land in different splits).
    include_pristine: the originals used as targets also become pristine examples.
    split_fractions, split_salt: `splits.identity_split` of the target's identity.
    split_by: "pair" (default) keeps a swap only when its source person is in the target's
      split, so every person is in one split, and reports the swaps this drops per split;
      "target" keeps every swap in its target's split (target persons stay disjoint, which
      is what target recovery is judged on) and reports how many sources come from another
      split. Random pairs lose 1 - sum(f^2) of the swaps to "pair" (34% at 0.8/0.1/0.1,
      and ~90% of validation and test): README "Data".
    cache_size: decoded originals kept in memory.
    The mask options (max_mask_fraction, derive_mask's, landmark_batch): SwapMaskConfig.
    """

    image_size: int = 224
    originals_dirs: tuple = ()
    method_dirs: tuple = ()
    swap_pattern: str = r"^(?P<target>\d+)_(?P<source>\d+)\.(?:jpe?g|png)$"
    identity_files: tuple = ()
    include_pristine: bool = True
    split_fractions: tuple = splits.DEFAULT_FRACTIONS
    split_salt: str = "dfrec"
    split_by: str = "pair"
    cache_size: int = 512


@dataclasses.dataclass(frozen=True)
class _Swap:
    key: str  # "<method>/<path under the method folder>": unique
    path: str
    method: str
    target: str  # image keys
    source: str


class PairedImageBuilder(ManualBuilder, skip_registration=True):
    """A folder of originals plus one folder of swaps per method (`<target>` and `<source>`
    image ids in each swap's file name). Subclasses set BUILDER_CONFIGS, LAYOUT, the docstring
    and MANUAL_DOWNLOAD_INSTRUCTIONS."""

    def _identities(self, root: str) -> dict[str, str]:
        """image key -> person id, from the first identity file found (`find_file`); {}
        without one."""
        for rel in self.builder_config.identity_files:
            path = find_file(root, rel)
            if path is not None:
                log.info("%s: identities from %s", self.name, path)
                return read_identity_file(path)
        return {}

    def _split_generators(self, dl_manager):
        config = self.builder_config
        root = self._manual_root(dl_manager)
        counters = self._new_counters()
        originals_dir = first_dir(root, config.originals_dirs)
        if originals_dir is None:
            splits.require_dir(os.path.join(root, config.originals_dirs[0]), self.name, self.LAYOUT)
        originals = index_images(originals_dir)
        identities = self._identities(root)
        if not identities:
            log.warning("%s: no identity file under %s: every image is its own identity, so "
                        "two photos of one person may land in different splits", self.name,
                        root)  # fmt: skip

        def identity(key):
            return identities.get(key, key)

        present, missing = {}, []
        for method, candidates in config.method_dirs:
            folder = first_dir(root, candidates)
            if folder is None:
                missing.append(method)
            else:
                present[method] = folder
        self.info.metadata["methods"] = sorted(present)
        self.info.metadata["missing_methods"] = missing
        self.info.metadata["originals_dir"] = os.path.relpath(originals_dir, root)
        self.info.metadata["identity_source"] = "file" if identities else "image id"
        if missing:
            log.warning("%s: method folders not found (skipped): %s", self.name, missing)
        if not present:
            wanted = ", ".join(c[0] for _, c in config.method_dirs)
            splits.require_dir(
                os.path.join(root, config.method_dirs[0][1][0]),
                self.name,
                f"{self.LAYOUT} (none of the method folders {wanted} exists)",
            )

        if config.split_by not in ("pair", "target"):
            raise ValueError(f"{self.name}: split_by must be 'pair' or 'target', got "
                             f"{config.split_by!r}")  # fmt: skip
        pattern = re.compile(config.swap_pattern)
        plans = {s: [] for s in splits.SPLITS}
        pristine = {s: set() for s in splits.SPLITS}
        crossing = {s: 0 for s in splits.SPLITS}  # swaps whose source person is elsewhere
        for method, folder in sorted(present.items()):
            for path in list_files(folder):
                match = pattern.match(os.path.basename(path))
                if not match:
                    counters[UNSPLIT].skip(path, "unrecognised file name")
                    continue
                target = image_key(match.group("target"))
                source = image_key(match.group("source"))
                split = splits.identity_split(
                    identity(target), config.split_fractions, config.split_salt
                )
                source_split = splits.identity_split(
                    identity(source), config.split_fractions, config.split_salt
                )
                if target not in originals:
                    counters[split].skip(path, "missing target original")
                elif source not in originals:
                    counters[split].skip(path, "missing source original")
                elif source_split != split and config.split_by == "pair":
                    counters[split].skip(path, "cross-split pair")
                    crossing[split] += 1
                else:
                    crossing[split] += source_split != split
                    key = f"{method}/{os.path.relpath(path, folder)}"
                    plans[split].append(_Swap(key, path, method, target, source))
                    pristine[split].add(target)
        self.info.metadata["split_by"] = config.split_by
        self.info.metadata["cross_split_pairs"] = crossing
        for split, n in crossing.items():
            if n:
                total = len(plans[split]) + (n if config.split_by == "pair" else 0)
                what = ("dropped (split_by='pair'; split_by='target' keeps them)"
                        if config.split_by == "pair" else "kept with a source person from "
                        "another split (split_by='target')")  # fmt: skip
                log.warning("%s: %s: %d of %d swaps have their source person in another "
                            "split: %s", self.name, split, n, total, what)  # fmt: skip
        self._record_skips()
        self._originals = originals
        self._identity = identity
        self._cache = LRU(config.cache_size)
        generators = {}
        for split in splits.SPLITS:
            targets = sorted(pristine[split]) if config.include_pristine else []
            if plans[split] or targets:
                generators[split] = self._generate_examples(split, plans[split], targets)
            else:
                log.warning("%s: no examples planned for split %s", self.name, split)
        if not generators:
            raise EmptySplitError(f"{self.name}: no usable swap in {root!r} ({counters[UNSPLIT]})")
        return generators

    def _original(self, key: str):
        """Decoded, resized original (uint8 [S,S,3]) or the reason it cannot be used."""

        def load():  # the caller counts a failure in its split, once per use
            try:
                image = skips.read_rgb8(self._originals[key])
            except skips.BadImage as e:
                return str(e)
            resized = resize_square(image, self.builder_config.image_size)
            return "not square" if resized is None else resized

        return self._cache.get(key, load)

    def _generate_examples(self, split: str, plan: list, targets: list):
        return self._annotated(split, self._parts(split, plan, targets))

    def _swap_parts(self, swap: _Swap) -> dict | str:
        """A swap's forgery parts, or why it cannot be used (on a worker thread: threads.py)."""
        config = self.builder_config
        try:
            fake = skips.read_rgb8(swap.path)
        except skips.BadImage as e:
            return str(e)
        fake = resize_square(fake, config.image_size)
        if fake is None:
            return "not square"
        target = self._original(swap.target)
        if isinstance(target, str):
            return f"target original: {target}"
        source = self._original(swap.source)
        if isinstance(source, str):
            return f"source original: {source}"
        mask = derive_mask_with(config, fake, target)
        reason = implausible_mask(mask, config.max_mask_fraction)
        if reason is not None:
            return reason if mask.any() else "empty mask (swap equals its target)"
        source_id, target_id = self._identity(swap.source), self._identity(swap.target)
        return forgery_parts(fake, source, target, mask, swap.method, source_id, target_id,
                             "derived")  # fmt: skip

    def _parts(self, split: str, plan: list, targets: list):
        counter = self._counters[split]
        # Two threads decode, resize and mask while this one annotates and writes.
        for swap, parts in threads.ordered_map(self._swap_parts, plan, workers=2):
            if isinstance(parts, str):
                counter.skip(swap.path, parts)
                continue
            yield swap.key, parts
        for key, image in threads.ordered_map(self._original, targets, workers=2):
            if isinstance(image, str):
                counter.skip(self._originals[key], image)
                continue
            yield f"pristine/{key}", pristine_parts(image, self._identity(key))
