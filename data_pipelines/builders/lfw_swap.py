"""`lfw_swap`: real LFW faces plus deterministic synthetic face swaps (offline TFDS builder).

Input: an LFW-layout folder of aligned 112x112 faces, `<root>/<Person>/<Person>_NNNN.jpg`
(default `dfrec_jax.configlib.lfw_dir()`, i.e. $DFREC_LFW_DIR or ../shared/data/lfw112).

Build, per split (people are assigned by `splits.identity_split`, so no identity is in two
splits; `max_people` > 0 keeps the first people in name order):
1. Read every image of the split's people (`skips.try_read_rgb8`); files that are not 8-bit RGB
   112x112 are skipped and counted ("unexpected size" for other sizes).
2. 68 landmarks for all of the split's images in one batched call of one `LandmarkDetector`
   (created once per process). Implausible landmarks are skipped as "no face found"
   (`plausible_landmarks`: points inside the image, a hull of 10-95% of it, the 5 keypoints
   within 15% of the side of ArcFace's template, as the folder holds ArcFace-aligned crops).
3. For each usable image: one pristine example (mask 255 everywhere, alpha 0:
   `features.pristine_example`), and `forgeries_per_image` forgeries with
   rng = np.random.default_rng([seed, sha256("<Person>/<file>") as int, j]) drawing the
   partner person uniformly among the split's other people, then one of their images
   uniformly, then the method (`pick_method`: when `methods` holds both kinds, a morph with
   probability `morph_fraction`, else a splice, then uniformly among that kind's methods in
   `methods`; with one kind only, uniformly from `methods`), then the swap's own randomness
   (`data_pipelines.swap`, morph alpha ~ U[morph_alpha]). No other person in the split =>
   "missing partner"; a swap whose mask is empty => "empty mask". Each forgery stores its
   `alpha` (1.0 for splices, the drawn alpha for morphs).
4. Sizes other than 112 (224 for the paper): images resized bicubically (cv2.INTER_CUBIC),
   landmarks scaled, and the swap synthesised at the final size, so `image == target` exactly
   where `mask == 0` holds at every size.

Skip counts per split are stored in the dataset's metadata
(`<data_dir>/lfw_swap/<config>/3.0.0/metadata.json`: `{"skipped": {split: {reason: n}},
"lfw_dir": path}`) and returned by `LfwSwap.skip_summary()`. A split left with no usable face
is left out of the dataset (tfds cannot write an empty split); its skips are still recorded.

Defaults: methods = every `swap.METHODS` (4 splices + `morph_blend`), morph_fraction 0.6,
morph_alpha `swap.MORPH_ALPHA` = (0.6, 0.8): about 60% of the forgeries are morphs, which keep
part of the target's identity (the alpha-blend splices keep little, `hull_poisson` more:
measurements in `swap`'s docstring).

Config names: `res{size}` for the default content, `res{size}-<8 hex>` otherwise (a hash of the
non-default content fields: seed, max_people, forgeries_per_image, methods, morph_fraction,
morph_alpha), so different content never shares a data_dir folder. `lfw_dir` is deliberately
not in the name: the same faces at another path are the same dataset (a folder with different
faces at the same config is the user's responsibility; the path used is recorded in the
metadata as `lfw_dir`).
"""

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os

import cv2
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import features, landmarks, skips, splits, swap
from dfrec_jax import (
    configlib,
    host_tf,  # noqa: F401  (TensorFlow kept off the accelerators)
)

log = logging.getLogger(__name__)

NATIVE_SIZE = 112
LAYOUT = splits.LFW_LAYOUT
MIN_HULL_FRACTION, MAX_HULL_FRACTION = 0.10, 0.95
MAX_OUTSIDE = 0.10  # landmarks may lie this fraction of the side outside the image
MAX_KEYPOINT_DEVIATION = 0.15  # of the side, from ArcFace's 5-point template
MORPH_FRACTION = 0.6  # share of forgeries that are morphs (when methods holds both kinds)


@dataclasses.dataclass(eq=False)
class LfwSwapConfig(tfds.core.BuilderConfig):
    """Content of an lfw_swap build; create it with `make_config` (which names it)."""

    image_size: int = NATIVE_SIZE
    lfw_dir: str | None = None  # None: configlib.lfw_dir() when building
    seed: int = 0
    max_people: int = 0  # 0 = all
    forgeries_per_image: int = 1
    methods: tuple[str, ...] = swap.METHODS
    morph_fraction: float = MORPH_FRACTION
    morph_alpha: tuple[float, float] = swap.MORPH_ALPHA


_CONTENT_DEFAULTS = {
    "seed": 0,
    "max_people": 0,
    "forgeries_per_image": 1,
    "methods": swap.METHODS,
    "morph_fraction": MORPH_FRACTION,
    "morph_alpha": swap.MORPH_ALPHA,
}


def _content_name(
    image_size: int, seed, max_people, forgeries_per_image, methods, morph_fraction, morph_alpha
) -> str:
    content = {
        "seed": seed,
        "max_people": max_people,
        "forgeries_per_image": forgeries_per_image,
        "methods": tuple(methods),
        "morph_fraction": float(morph_fraction),
        "morph_alpha": tuple(float(a) for a in morph_alpha),
    }
    changed = {k: v for k, v in content.items() if v != _CONTENT_DEFAULTS[k]}
    if not changed:
        return f"res{image_size}"
    text = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()},
                      sort_keys=True)  # fmt: skip
    return f"res{image_size}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def make_config(
    image_size: int = NATIVE_SIZE,
    lfw_dir: str | None = None,
    seed: int = 0,
    max_people: int = 0,
    forgeries_per_image: int = 1,
    methods: tuple[str, ...] | None = None,
    morph_fraction: float = MORPH_FRACTION,
    morph_alpha: tuple[float, float] | None = None,
) -> LfwSwapConfig:
    """A validated, content-named config (see the module docstring for the naming rule)."""
    methods = swap.METHODS if methods is None else tuple(methods)
    unknown = [m for m in methods if m not in swap.METHODS]
    if not methods or unknown:
        raise ValueError(f"lfw_swap methods must be a non-empty subset of {swap.METHODS}")
    morph_alpha = swap.check_alpha_range(swap.MORPH_ALPHA if morph_alpha is None else morph_alpha)
    morph_fraction = float(morph_fraction)
    if not 0.0 <= morph_fraction <= 1.0:
        raise ValueError(f"lfw_swap morph_fraction must be in [0, 1], got {morph_fraction}")
    if int(image_size) < 32:
        raise ValueError(f"lfw_swap image_size must be >= 32, got {image_size}")
    for name, value in (("seed", seed), ("max_people", max_people),
                        ("forgeries_per_image", forgeries_per_image)):  # fmt: skip
        if int(value) < 0:
            raise ValueError(f"lfw_swap {name} must be >= 0, got {value}")
    image_size, seed, max_people = int(image_size), int(seed), int(max_people)
    forgeries_per_image = int(forgeries_per_image)
    return LfwSwapConfig(
        name=_content_name(
            image_size, seed, max_people, forgeries_per_image, methods, morph_fraction, morph_alpha
        ),
        description=(
            f"{image_size}x{image_size}; seed {seed}; max_people {max_people or 'all'}; "
            f"{forgeries_per_image} forgeries per image; methods {', '.join(methods)}; "
            f"morph fraction {morph_fraction:g}, morph alpha {morph_alpha[0]:g}-{morph_alpha[1]:g}"
        ),
        image_size=image_size,
        lfw_dir=lfw_dir or None,
        seed=seed,
        max_people=max_people,
        forgeries_per_image=forgeries_per_image,
        methods=methods,
        morph_fraction=morph_fraction,
        morph_alpha=morph_alpha,
    )


def pick_method(methods: tuple[str, ...], morph_fraction: float, rng: np.random.Generator) -> str:
    """A morph with probability `morph_fraction` when `methods` holds both kinds (then uniform
    within the kind), else uniform over `methods`."""
    morphs = [m for m in methods if m in swap.MORPH_METHODS]
    splices = [m for m in methods if m not in swap.MORPH_METHODS]
    pool = list(methods)
    if morphs and splices:
        pool = morphs if rng.random() < morph_fraction else splices
    return pool[rng.integers(len(pool))]


@functools.lru_cache(maxsize=1)
def _landmark_detector():
    # Imported and built lazily: it loads face-api weights and compiles once per process.
    return landmarks.LandmarkDetector()


def plausible_landmarks(points: np.ndarray, size: int = NATIVE_SIZE) -> bool:
    """True when `points` [68,2] look like the face of an ArcFace-aligned `size` crop.

    The landmark net answers with a face shape for any input (flat grey, noise, a turned
    photo), so the checks are geometric: every point within 10% of the side of the image, a
    hull of 10-95% of the image, and the 5 keypoints (eye centres, nose tip, mouth corners)
    within 15% of the side of ArcFace's template positions. Real LFW112 faces deviate by
    3-9 px (of 112); non-faces by 29-60 px.
    """
    points = np.asarray(points, np.float32)
    if points.shape != (68, 2) or not np.all(np.isfinite(points)):
        return False
    margin = MAX_OUTSIDE * size
    if points.min() < -margin or points.max() > size + margin:
        return False
    area = cv2.contourArea(cv2.convexHull(points)) / float(size * size)
    if not MIN_HULL_FRACTION <= area <= MAX_HULL_FRACTION:
        return False
    template = swap.ARCFACE_5 * (size / swap.REFERENCE_SIZE)
    deviation = np.abs(swap.five_keypoints(points) - template).max()
    return bool(deviation <= MAX_KEYPOINT_DEVIATION * size)


def _stable_index(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


@dataclasses.dataclass
class _Face:
    person: str
    key: str  # "<Person>/<file name>": unique, stable
    image: np.ndarray  # uint8 [112,112,3]
    landmarks: np.ndarray | None = None  # float32 [68,2] at 112


class LfwSwap(tfds.core.GeneratorBasedBuilder):
    """Pristine LFW faces and synthetic swaps; see the module docstring."""

    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "2.0.0": "Identity morphs (`morph_blend`, about 60% of the forgeries by default: "
        "morph_fraction, morph_alpha); new feature `alpha` (share of source texture: 0 "
        "pristine, 1 splices, drawn for morphs); pristine faces carry mask 255 everywhere "
        "(a real face is its own source; was 0).",
        "3.0.0": 'New feature `mask_source` (features.py): "generated" for these forgeries, '
        '"pristine" for real faces.',
    }
    BUILDER_CONFIGS = [make_config(112), make_config(224)]

    def _create_builder_config(self, builder_config, version):
        # tfds refuses a config object that is not the registered instance of its name; ours
        # are named by content, so an equal-content config (e.g. another lfw_dir) is accepted.
        if isinstance(builder_config, LfwSwapConfig):
            c = builder_config
            expected = _content_name(
                c.image_size, c.seed, c.max_people, c.forgeries_per_image, c.methods,
                c.morph_fraction, c.morph_alpha,
            )  # fmt: skip
            if c.name != expected:
                raise ValueError(f"lfw_swap config named {c.name!r} has content of {expected!r}; "
                                 "create configs with make_config()")  # fmt: skip
            return c
        return super()._create_builder_config(builder_config, version)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[0],
            features=features.features_dict(self.builder_config.image_size),
            metadata=tfds.core.MetadataDict(),
        )

    @property
    def lfw_dir(self) -> str:
        return self.builder_config.lfw_dir or configlib.lfw_dir()

    def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
        """As tfds', but never looks for a prepared copy on GCS (nothing touches the network)."""
        config = download_config or tfds.download.DownloadConfig()
        config = dataclasses.replace(config, try_download_gcs=False)
        return super().download_and_prepare(
            download_dir=download_dir, download_config=config, **kwargs
        )

    def skip_summary(self) -> dict[str, dict[str, int]]:
        """{split: {reason: count}} of the inputs skipped while building (from the metadata)."""
        skipped = self.info.metadata.get("skipped", {}) if self.info.metadata else {}
        return {split: dict(reasons) for split, reasons in skipped.items()}

    def source_fingerprint(self) -> str | None:
        """The LFW folder's listing fingerprint (splits.folder_fingerprint); None when the
        folder is absent (a prepared copy is then used as it is)."""
        if not os.path.isdir(self.lfw_dir):
            return None
        return splits.folder_fingerprint(splits.scan_lfw(self.lfw_dir))

    def _split_generators(self, dl_manager):
        del dl_manager  # offline: everything comes from the LFW folder
        cfg = self.builder_config
        people = splits.scan_lfw(self.lfw_dir)
        self.info.metadata["source_fingerprint"] = splits.folder_fingerprint(people)
        if cfg.max_people:
            people = dict(list(people.items())[: cfg.max_people])
        by_split = {name: {} for name in splits.SPLITS}
        for person, paths in people.items():
            by_split[splits.identity_split(person)][person] = paths
        self.info.metadata["lfw_dir"] = os.path.abspath(self.lfw_dir)
        self.info.metadata["skipped"] = {}
        generators, reasons = {}, collections.Counter()
        for split, split_people in by_split.items():
            counter = skips.SkipCounter(f"lfw_swap/{cfg.name}/{split}")
            faces = self._usable_faces(split_people, counter)
            if faces:
                generators[split] = self._generate_examples(split, faces, counter)
            else:
                log.warning("lfw_swap: split %s has no usable faces; it is left out", split)
                self._record_skips(split, counter)
                reasons.update(counter.summary())
        if not generators:  # refused before anything is written: no empty dataset is cached
            why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "no images"
            raise splits.DatasetLayoutError(
                f"lfw_swap: no usable face in {self.lfw_dir!r} ({why}); it needs aligned "
                f"{NATIVE_SIZE}x{NATIVE_SIZE} LFW faces (README \"Data\"), not raw 250x250 LFW"
            )
        return generators

    def _usable_faces(self, people: dict[str, list[str]], counter) -> list[_Face]:
        """Faces of `people` that read as 112x112 RGB and have plausible landmarks."""
        faces = []
        for person, paths in people.items():
            for path in paths:
                image = skips.try_read_rgb8(path, counter)
                if image is None:
                    continue
                if image.shape[:2] != (NATIVE_SIZE, NATIVE_SIZE):
                    counter.skip(path, f"unexpected size (not {NATIVE_SIZE}x{NATIVE_SIZE})")
                    continue
                key = f"{person}/{os.path.basename(path)}"
                faces.append(_Face(person=person, key=key, image=image))
        if not faces:
            return []
        points = _landmark_detector()(np.stack([f.image for f in faces]))
        usable = []
        for face, lm in zip(faces, points):
            if plausible_landmarks(lm, NATIVE_SIZE):
                face.landmarks = lm
                usable.append(face)
            else:
                counter.skip(face.key, "no face found")
        return usable

    def _record_skips(self, split: str, counter: skips.SkipCounter) -> None:
        self.info.metadata.setdefault("skipped", {})[split] = counter.summary()
        log.info("lfw_swap %s/%s: %s", self.builder_config.name, split, counter)

    def _generate_examples(self, split, faces, counter):
        cfg = self.builder_config
        size = cfg.image_size
        scale = size / NATIVE_SIZE
        def at_size(face):
            if size == NATIVE_SIZE:
                return face.image, face.landmarks
            image = cv2.resize(face.image, (size, size), interpolation=cv2.INTER_CUBIC)
            return image, (face.landmarks * scale).astype(np.float32)

        by_person = {}
        for i, face in enumerate(faces):
            by_person.setdefault(face.person, []).append(i)
        people = list(by_person)

        for face in faces:
            image, lm = at_size(face)
            face_mask = landmarks.hull_mask(lm, size)
            pristine = features.pristine_example(image, face_mask, lm, face.person)
            yield f"{face.key}/pristine", features.encode_pngs(pristine, size)
            others = [p for p in people if p != face.person]
            for j in range(cfg.forgeries_per_image):
                key = f"{face.key}/forgery{j}"
                if not others:
                    counter.skip(key, "missing partner")
                    continue
                rng = np.random.default_rng([cfg.seed, _stable_index(face.key), j])
                partner = others[rng.integers(len(others))]
                source = faces[by_person[partner][rng.integers(len(by_person[partner]))]]
                method = pick_method(cfg.methods, cfg.morph_fraction, rng)
                source_image, source_lm = at_size(source)
                try:
                    result = swap.swap_faces(
                        image, source_image, lm, source_lm, method, rng, cfg.morph_alpha
                    )
                except swap.SwapError as e:
                    counter.skip(key, e.reason)
                    continue
                forgery = features.forgery_example(
                    image=result.image,
                    source=source_image,
                    target=image,
                    mask=result.mask,
                    face_mask=face_mask,
                    landmarks=lm,
                    method=method,
                    source_id=source.person,
                    target_id=face.person,
                    alpha=result.alpha,
                    mask_source="generated",
                )
                yield key, features.encode_pngs(forgery, size)
        self._record_skips(split, counter)


BUILDER = LfwSwap
