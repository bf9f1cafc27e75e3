"""`recover`: forensic recovery of face images into files and a JSON evidence record each.

    python -m dfrec_jax recover --workdir W --input FILE_OR_DIR [--input ...] --output DIR [--align]

Per input image, with `<stem>` its file name without extension:

    <stem>_source.png   recovered source face (the face swapped in)
    <stem>_target.png   recovered target face (the person originally in the image)
    <stem>_mask.png     the forgery segmentation map, 8-bit grey (255 = forged)
    <stem>_panel.png    input | mask overlay | source | target
    <stem>.json         the evidence record (written last: a record implies its images exist)
  with --align also
    <stem>_aligned.png  the aligned face crop the model saw
    <stem>_source_full.png, <stem>_target_full.png
                        the recovered faces pasted back into the original image

Inputs are files or folders (a folder's images, by suffix, not its sub-folders), taken in the
order given, folder contents sorted by name, each file once. Two inputs with the same stem
(`a/x.png`, `b/x.jpg`) must not overwrite each other: in that order the first keeps `x`, later
ones get `x-2`, `x-3`, ... (skipping any stem whose output names are already taken, compared
case-insensitively), and the record's `stem` says which. Stems are assigned before any file is
read, so they depend on the input list only, not on which files turn out to be unreadable.

Without --align an input must be exactly the model's size (config.model.image_size square) and
already aligned like the training faces; with --align the largest face is found by MTCNN
(TensorFlow is imported only then) and aligned to the 5-point template at the model's size.
A bad input (unreadable, not an image, wrong size, no face) gives one `skip: PATH: reason`
line on stderr and the others go on; the exit code is non-zero only when nothing was recovered.

Evidence records are reproducible: the same input and checkpoint give byte-identical JSON apart
from `created_utc` (the only time-dependent field): keys sorted, no absolute times or random
names elsewhere, and floats rounded to FLOAT_DECIMALS decimal places. Rounding keeps the
record about the evidence, not about float32 noise: the last bits of a float32 result may
change with the XLA version or CPU instruction set, and six decimals are far below anything a
verdict depends on (the threshold is 0.9) yet well within float32's ~7 significant digits.
The verdict is decided on the rounded similarity, so the record shows exactly what was compared.

Each image is recovered as if it were alone: the model runs vmapped over single images with
the run's fixed masking key, so the random tie-breaking of the semantic-guided masking does not
depend on where an image falls in a batch (a batched call draws a different noise row for each
batch position). The identity similarities are computed on the recovered target exactly as
written to `<stem>_target.png` (8-bit), so anyone can recompute them from the files.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import io
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import default
from data_pipelines import alignment
from dfrec_jax import images as image_io
from dfrec_jax import inference, losses
from dfrec_jax import trained as trained_lib
from dfrec_jax.eval import identity
from dfrec_jax.run import workdir as workdir_lib

FORMAT = "dfrec_jax recover evidence record, version 1"
FLOAT_DECIMALS = 6
# Output kind -> file name suffix after `<stem>`; trace.py finds recovered faces by these.
OUTPUTS = {
    "source": "_source.png",
    "target": "_target.png",
    "mask": "_mask.png",
    "panel": "_panel.png",
}
ALIGN_OUTPUTS = {
    "aligned": "_aligned.png",
    "source_full": "_source_full.png",
    "target_full": "_target_full.png",
}
RECORD_SUFFIX = ".json"
_OVERLAY_COLOUR = np.array([255.0, 0.0, 0.0])  # forged pixels tinted red in the panel
_OVERLAY_ALPHA = 0.5


def png_bytes(image_uint8: np.ndarray) -> bytes:
    """PNG encoding of a uint8 [H,W] or [H,W,3] image; Pillow writes no time or other
    varying metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomic(path: str, data: bytes) -> None:
    """Writes via a temporary name and a rename: no half-written evidence files."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def rounded(value: Any) -> Any:
    """`value` with every float rounded to FLOAT_DECIMALS places (nested dicts / lists)."""
    if isinstance(value, float):
        return round(value, FLOAT_DECIMALS)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def dumps(record: dict) -> str:
    """Canonical JSON text: rounded floats, sorted keys, fixed indentation, final newline."""
    return json.dumps(rounded(record), sort_keys=True, indent=2, allow_nan=False) + "\n"


def list_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image paths in processing order, (path, reason) for inputs that name nothing usable).

    Folders contribute their own image files (by suffix, sorted, not sub-folders); every other
    entry of a folder (sub-folder, other suffix, dangling link, device) is listed with its
    reason. Files are taken as given whatever their suffix (a non-image fails later, with a
    reason). A file reached twice (same real path) is processed once, at its first place.
    """
    paths, bad, seen = [], [], set()
    for given in inputs:
        if os.path.isdir(given):
            found, others = _folder_entries(given)
            bad += others
            if not found:
                bad.append((given, "folder has no image files (.jpg .jpeg .png .bmp .webp)"))
        elif os.path.exists(given):
            found = [given]
        elif os.path.islink(given):
            bad.append((given, "dangling symbolic link"))
            found = []
        else:
            bad.append((given, "no such file or folder"))
            found = []
        for path in found:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                paths.append(path)
    return paths, bad


def _folder_entries(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files, (path, reason) for every other entry): nothing in a folder is passed
    over in silence."""
    found, others = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            others.append((path, "sub-folder (not searched)"))
        elif not name.lower().endswith(image_io.IMAGE_SUFFIXES):
            others.append((path, "not an image file name (.jpg .jpeg .png .bmp .webp)"))
        elif os.path.isfile(path):
            found.append(path)
        elif os.path.islink(path) and not os.path.exists(path):
            others.append((path, "dangling symbolic link"))
        else:
            others.append((path, "not a regular file"))
    return found, others


def output_names(stem: str) -> list[str]:
    """Every file name `recover` may write for `stem`."""
    suffixes = [*OUTPUTS.values(), *ALIGN_OUTPUTS.values(), RECORD_SUFFIX]
    return [stem + suffix for suffix in suffixes]


def assign_stems(paths: list[str]) -> list[str]:
    """Output stems, unique in order: a repeated stem `x` becomes `x-2`, `x-3`, ...; a stem is
    taken only if none of its output names (case-folded) is already claimed."""
    claimed, stems = set(), []
    for path in paths:
        base = os.path.splitext(os.path.basename(path))[0]
        stem, n = base, 1
        while any(name.casefold() in claimed for name in output_names(stem)):
            n += 1
            stem = f"{base}-{n}"
        claimed.update(name.casefold() for name in output_names(stem))
        stems.append(stem)
    return stems


def _to_uint8(x: jax.Array) -> jax.Array:
    """[0,1] floats to 8 bits exactly as the PNGs store them (round half to even)."""
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def make_recover_fn(model, nets: identity.IdentityNets, seed: int):
    """jit(variables, uint8 images [B,S,S,3]) -> DFREC outputs and identity similarities,
    bound to the identity networks' weights (`losses.BoundToFrozen`).

    Returns uint8 seg [B,S,S,1], source and target [B,S,S,3], float32 forgery_logit [B] and
    {"facenet", "dlib"} cosines [B] of the input and the 8-bit recovered target; the model's
    outputs are `inference.apply_per_image`'s (each image alone, one masking key).
    """

    # The identity networks' weights are an argument, not ~110 MB of constants in the program.
    net_arrays, rebuild_nets = identity.split(nets)

    @jax.jit
    def recover_fn(variables, images, net_arrays):
        inputs = images.astype(jnp.float32) / 255.0
        out = inference.apply_per_image(model, variables, inputs, seed)
        result = {k: _to_uint8(out[k]) for k in ("seg", "source", "target")}
        result["forgery_logit"] = out["forgery_logit"]
        n = images.shape[0]
        both = jnp.concatenate([inputs, result["target"].astype(jnp.float32) / 255.0])
        embeddings = rebuild_nets(net_arrays).embed(both)
        result["similarity"] = {k: identity.cosine(e[:n], e[n:]) for k, e in embeddings.items()}
        return result

    return losses.BoundToFrozen(recover_fn, jax.device_put(net_arrays))


def panel(image: np.ndarray, seg: np.ndarray, source: np.ndarray, target: np.ndarray):
    """uint8 [S,4S,3]: input | input with forged pixels tinted red | source | target."""
    alpha = _OVERLAY_ALPHA * seg.astype(np.float64) / 255.0
    overlay = image * (1.0 - alpha) + _OVERLAY_COLOUR * alpha
    overlay = np.clip(np.rint(overlay), 0, 255).astype(np.uint8)
    return np.concatenate([image, overlay, source, target], axis=1)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Recoverer:
    """Holds the model, nets and run-wide record fields; batches prepared images."""

    def __init__(self, model: trained_lib.TrainedModel, nets, eval_config, eval_source, output_dir,
                 *, keep: bool = False):  # fmt: skip
        self.model, self.output_dir = model, output_dir
        self.nets = nets or identity.load(eval_config)
        self.recover_fn = make_recover_fn(model.model, self.nets, int(model.config.seed))
        self.batch_size = int(eval_config.batch_size)
        self.threshold = float(eval_config.recovery_threshold)
        self.common = {
            "format": FORMAT,
            "float_decimals": FLOAT_DECIMALS,
            "checkpoint": model.checkpoint_record(),  # + converted_from for `convert` runs
            "config": {"hash": model.config_hash, "eval_section": eval_source},
            "versions": workdir_lib.library_versions(),
            "identity_nets": describe_nets(eval_config) if nets is None else "supplied by caller",
            "verdict_threshold": self.threshold,
        }
        self.pending: list[dict] = []
        self.recovered = 0
        # keep=True: each item's record, model input and recovered faces (`recover --video`).
        self.keep, self.kept = keep, []

    def add(self, item: dict) -> None:
        self.pending.append(item)
        if len(self.pending) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        size = self.model.image_size
        images = np.zeros((self.batch_size, size, size, 3), np.uint8)  # padded: one compile
        images[: len(self.pending)] = [item["model_input"] for item in self.pending]
        out = jax.device_get(self.recover_fn(self.model.variables, images))
        for i, item in enumerate(self.pending):
            outputs = {k: v[i] for k, v in out.items() if k != "similarity"}
            self._save(item, outputs, {k: float(v[i]) for k, v in out["similarity"].items()})
        self.recovered += len(self.pending)
        self.pending = []

    def _save(self, item: dict, out: dict, similarity: dict) -> None:
        stem, image = item["stem"], item["model_input"]
        pictures = {
            "source": out["source"],
            "target": out["target"],
            "mask": out["seg"][..., 0],
            "panel": panel(image, out["seg"], out["source"], out["target"]),
        }
        if item["align"] is not None:
            original, matrix = item["original"], item["align"]["matrix"]
            pictures["aligned"] = image
            pictures["source_full"] = alignment.paste_back(original, out["source"], matrix)
            pictures["target_full"] = alignment.paste_back(original, out["target"], matrix)
        suffixes = {**OUTPUTS, **ALIGN_OUTPUTS}
        outputs = {}
        for kind, picture in pictures.items():
            name = stem + suffixes[kind]
            data = png_bytes(picture)
            write_atomic(os.path.join(self.output_dir, name), data)
            outputs[kind] = {"file": name, "sha256": sha256(data)}

        facenet = round(similarity["facenet"], FLOAT_DECIMALS)
        logit = float(out["forgery_logit"])
        record = {
            **self.common,
            "stem": stem,
            "input": {
                "path": item["path"],
                "absolute_path": os.path.abspath(item["path"]),
                "width": item["original"].shape[1],
                "height": item["original"].shape[0],
                # How the file's pixels became the 8-bit RGB the model saw (images.to_rgb8);
                # empty: stored as 8-bit RGB.
                "conversions": item["conversions"],
            },
            "input_sha256": item["sha256"],
            "model_input": {
                "size": self.model.image_size,
                "from": "aligned face crop (_aligned.png)" if item["align"] else "input as decoded",
            },
            "forgery_logit": logit,
            "forgery_probability": float(1.0 / (1.0 + np.exp(-np.float64(logit)))),
            "identity_similarity_input_target": facenet,
            "identity_similarity_input_target_dlib": similarity["dlib"],
            "verdict": "pristine" if facenet > self.threshold else "forgery",
            "verdict_rule": (
                f"pristine if identity_similarity_input_target (FaceNet cosine of the model "
                f"input and {outputs['target']['file']}) > {self.threshold}, else forgery"
            ),
            "outputs": outputs,
            "align": _align_record(item["align"]),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
        }
        write_atomic(os.path.join(self.output_dir, stem + RECORD_SUFFIX), dumps(record).encode())
        if self.keep:  # face-sized arrays only: a long clip must not pile up whole frames
            self.kept.append({"record": record, "source": out["source"], "target": out["target"],
                              "model_input": image, "frame_index": item.get("frame_index"),
                              "track": item.get("track")})  # fmt: skip


def _align_record(align: dict | None) -> dict | None:
    if align is None:
        return None
    face = align["face"]
    return {
        "detector": align["detector"],
        "face_box_xyxy": [float(v) for v in face.box],
        "face_score": float(face.score),
        "keypoint_names": list(alignment.KEYPOINT_NAMES),
        "keypoints_xy": [[float(x), float(y)] for x, y in face.keypoints],
        "template": f"ArcFace 5-point template scaled to {align['size']} px",
        "matrix_image_to_crop": [[float(v) for v in row] for row in align["matrix"]],
    }


def describe_nets(eval_config) -> dict:
    """Which identity networks (and weights) the eval config selects, for the records."""
    return {
        "facenet": eval_config.identity_net,
        "facenet_weights": eval_config.identity_weights or "package default",
        "dlib_weights": eval_config.dlib_weights or "package default",
    }


def describe_detector(detector) -> dict:
    description = {"class": f"{type(detector).__module__}.{type(detector).__qualname__}"}
    for attr in ("min_confidence", "min_face_size"):
        if hasattr(detector, attr):
            description[attr] = getattr(detector, attr)
    try:
        description["mtcnn_version"] = importlib.metadata.version("mtcnn")
    except importlib.metadata.PackageNotFoundError:
        pass
    return description


def _prepare(path: str, stem: str, size: int, detector, detector_info) -> dict:
    """The model input for one file (raises images.ImageError with the reason)."""
    data, rgb, conversions = image_io.read_rgb8(path)
    item = {"path": path, "stem": stem, "sha256": sha256(data), "original": rgb, "align": None,
            "conversions": conversions}  # fmt: skip
    if detector is None:
        if rgb.shape[:2] != (size, size):
            raise image_io.ImageError(
                f"{rgb.shape[1]}x{rgb.shape[0]} pixels; the model takes aligned {size}x{size} "
                "faces (use --align to detect and align faces in other images)"
            )
        item["model_input"] = rgb
        return item
    try:
        face = detector.largest(rgb)
    except Exception as e:  # noqa: BLE001 - a detector failure on one image is a skip
        raise image_io.ImageError(f"face detection failed ({type(e).__name__}: {e})") from None
    if face is None:
        raise image_io.ImageError("no face found (--align)")
    return aligned_item(item, face, size, detector_info)


def aligned_item(item: dict, face, size: int, detector_info: dict) -> dict:
    """`item` (its "original" RGB) with the model input aligned on `face` (--align)."""
    crop, matrix = alignment.align(item["original"], face.keypoints, size)
    item["model_input"] = crop
    item["align"] = {"face": face, "matrix": matrix, "size": size, "detector": detector_info}
    return item


def eval_section(config):
    """The run's eval config, or the defaults for runs made before it existed (said in the
    record)."""
    if "eval" in config:
        return config.eval, "run config.json"
    return default.eval_config(), "configs/default.py eval_config() (run config has no eval)"


def run(
    inputs: list[str],
    output_dir: str,
    *,
    workdir: str | None = None,
    checkpoint: str | None = None,
    step: int | None = None,
    align: bool = False,
    nets: identity.IdentityNets | None = None,
    detector=None,
) -> int:
    """Recovers every input image into `output_dir`; returns the exit code (1 if none was
    recovered). `nets` defaults to identity.load(eval config); `detector` (with --align) to
    data_pipelines.alignment.FaceDetector()."""
    paths, bad = list_inputs(inputs)
    for given, reason in bad:
        print(f"skip: {given}: {reason}", file=sys.stderr)
    if not paths:
        print(f"error: no input images found in {', '.join(inputs)}", file=sys.stderr)
        return 1
    model = trained_lib.load(workdir=workdir, checkpoint=checkpoint, step=step)
    eval_config, eval_source = eval_section(model.config)
    if not align:
        detector = None
    elif detector is None:
        detector = alignment.FaceDetector()
    detector_info = describe_detector(detector) if align else None
    os.makedirs(output_dir, exist_ok=True)
    recoverer = Recoverer(model, nets, eval_config, eval_source, output_dir)
    skipped = len(bad)
    for path, stem in zip(paths, assign_stems(paths)):
        try:
            item = _prepare(path, stem, model.image_size, detector, detector_info)
        except image_io.ImageError as e:
            print(f"skip: {path}: {e}", file=sys.stderr)
            skipped += 1
            continue
        recoverer.add(item)
    recoverer.flush()
    print(f"recovered {recoverer.recovered}, skipped {skipped} -> {output_dir}")
    return 0 if recoverer.recovered else 1
