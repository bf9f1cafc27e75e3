"""`recover --video`: recovery of the main face of a video clip, frame by frame, with the clip's
identities aggregated into one evidence record.

    python -m dfrec_jax recover --workdir W --video CLIP --output OUT
        [--every N] [--max_frames M] [--recovered_video]

Frames are decoded with OpenCV (every N-th frame, at most M of them; 0 = all). In each, MTCNN
finds the faces and the main face is tracked: on the first frame with a face, the best face
(the one `recover --align` takes from an image); afterwards the face whose box overlaps the
last tracked box most, if that overlap (IoU) is at least TRACK_IOU, else (a cut, the face
left) the best face again, marked "reacquired". Each tracked face is aligned and recovered as
`recover --align` recovers an image: a frame saved as a PNG and given to `recover --align`
gets the same figures (the frame's `input_sha256` is that of its PNG, `recover.png_bytes`).

Outputs, with <clip> the clip's file name without extension:

    OUT/<clip>_frames/       every recovered frame as `recover --align` writes an image
                             (<clip>_f<NNNNNN>_source.png, _target.png, ..., .json)
    OUT/<clip>_contact.png   contact sheet: per frame, the aligned input over the recovered
                             target over the recovered source, FRAMES_PER_ROW frames a row
                             (at most CONTACT_FRAMES, evenly spaced)
    OUT/<clip>_recovered.avi with --recovered_video: the sampled frames with the recovered
                             target pasted back (MJPG, the clip's frame rate / N)
    OUT/<clip>.json          the clip record, written last

Aggregation, per identity network (FaceNet, dlib) and recovered role (target, source): the
embeddings of the 8-bit recovered faces are L2-normalised, averaged and renormalised (the
centroid, as `trace` builds a person's), with each frame's cosine to it (mean, min and standard
deviation: the spread). The frames most and least consistent with the target centroid (FaceNet
cosine) are listed. `trace --input OUT/<clip>.json` ranks a gallery by the centroids.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import cv2
import numpy as np

from data_pipelines import alignment
from dfrec_jax import recover
from dfrec_jax import trained as trained_lib
from dfrec_jax.eval import identity
from dfrec_jax.exported import file_sha256  # one file hasher for the project

FORMAT = "dfrec_jax recover --video clip record, version 1"
TRACK_IOU = 0.3
FRAMES_PER_ROW = 10
CONTACT_FRAMES = 100  # a long clip's sheet shows this many frames, evenly spaced
CONSISTENCY_FRAMES = 3  # frames listed as most / least consistent
FRAME_RECORD_SHARED = ("format", "float_decimals", "checkpoint", "config", "versions",
                       "identity_nets", "verdict_threshold", "created_utc")  # fmt: skip


class VideoError(ValueError):
    """A clip that cannot be decoded, has no frames, or no face in any frame."""


class Clip:
    """A video file read with OpenCV, frame by frame: only the frame at hand is in memory.
    Opening checks that a first frame decodes (VideoError otherwise), so a bad clip fails
    before any model is built."""

    def __init__(self, path: str, every: int = 1, max_frames: int = 0):
        if every < 1 or max_frames < 0:
            raise ValueError(f"--every must be >= 1 and --max_frames >= 0 (got {every}, "
                             f"{max_frames})")  # fmt: skip
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video not found: {path}")
        self.path, self.every, self.max_frames = path, every, max_frames
        capture = cv2.VideoCapture(path)
        try:
            if not capture.isOpened():
                raise VideoError(f"{path}: not a video OpenCV can read")
            ok, first = capture.read()
            if not ok:
                raise VideoError(f"{path}: no frame could be decoded")
            self.fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
            self.height, self.width = first.shape[:2]
        finally:
            capture.release()

    def frames(self):
        """(frame index, uint8 RGB [H,W,3]) of every `every`-th frame, at most `max_frames`
        of them (0: all)."""
        capture = cv2.VideoCapture(self.path)
        index = taken = 0
        try:
            while not self.max_frames or taken < self.max_frames:
                ok, bgr = capture.read()
                if not ok:
                    return
                if index % self.every == 0:
                    taken += 1
                    yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            capture.release()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def track(faces: list, last_box) -> tuple:
    """(face, how, iou) for one frame's detections (best first): the face overlapping
    `last_box` most if IoU >= TRACK_IOU, else the best face ("first" / "reacquired")."""
    if not faces:
        return None, None, None
    if last_box is None:
        return faces[0], "first", None
    overlaps = [iou(face.box, last_box) for face in faces]
    best = int(np.argmax(overlaps))
    if overlaps[best] >= TRACK_IOU:
        return faces[best], "tracked", overlaps[best]
    return faces[0], "reacquired", overlaps[best]


def aggregate(nets: identity.IdentityNets, kept: list[dict], batch_size: int) -> dict:
    """Per role and network: the centroid of the frames' embeddings, each frame's cosine to it
    and its spread (dlib also keeps the mean raw descriptor, for dlib's distance rule)."""
    result = {}
    for role in ("target", "source"):
        embeddings = identity.embed_all(nets, [k[role] for k in kept], batch_size)
        result[role] = {}
        for name, values in embeddings.items():
            unit = values / np.maximum(np.linalg.norm(values, axis=-1, keepdims=True), 1e-12)
            centroid = unit.mean(0)
            centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
            cosines = unit @ centroid
            result[role][name] = {
                "centroid": centroid.tolist(),
                "frame_cosines": cosines.tolist(),
                "spread": {"mean": float(cosines.mean()), "min": float(cosines.min()),
                           "std": float(cosines.std())},  # fmt: skip
            }
            if name == "dlib":
                result[role][name]["mean_descriptor"] = values.mean(0).tolist()
    return result


def contact_sheet(kept: list[dict]) -> tuple[np.ndarray, list[int]]:
    """(uint8 grid: per frame a column aligned | target | source, FRAMES_PER_ROW a row, the
    frame indices shown): at most CONTACT_FRAMES frames, evenly spaced over the recovered."""
    chosen = np.unique(np.linspace(0, len(kept) - 1, min(len(kept), CONTACT_FRAMES)).round())
    shown = [kept[i] for i in chosen.astype(int)]
    tiles = [np.concatenate([k["model_input"], k["target"], k["source"]]) for k in shown]
    rows = []
    for start in range(0, len(tiles), FRAMES_PER_ROW):
        row = tiles[start : start + FRAMES_PER_ROW]
        if len(tiles) > FRAMES_PER_ROW:  # a short last row is filled with white
            row += [np.full_like(tiles[0], 255)] * (FRAMES_PER_ROW - len(row))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0), [k["frame_index"] for k in shown]


def write_recovered_video(path: str, clip: Clip, kept: list[dict]) -> None:
    """The sampled frames (a second pass over the clip), each tracked face replaced by its
    recovered target pasted back with the frame's alignment (MJPG AVI, fps / every)."""
    recovered = {k["frame_index"]: k for k in kept}
    fps = (clip.fps or 25.0) / clip.every
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (clip.width, clip.height))
    if not writer.isOpened():
        raise OSError(f"cannot write {path} (OpenCV's MJPG writer)")
    try:
        for index, rgb in clip.frames():
            if index in recovered:
                matrix = np.asarray(recovered[index]["record"]["align"]["matrix_image_to_crop"])
                rgb = alignment.paste_back(rgb, recovered[index]["target"], matrix)
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def run(
    clip: str,
    output_dir: str,
    *,
    workdir: str | None = None,
    checkpoint: str | None = None,
    step: int | None = None,
    every: int = 1,
    max_frames: int = 0,
    recovered_video: bool = False,
    nets: identity.IdentityNets | None = None,
    detector=None,
) -> int:
    """Recovers the clip's main face into `output_dir` and writes the clip record; returns the
    exit code. A clip OpenCV cannot read, with no frame, or with no face raises VideoError."""
    video = Clip(clip, every, max_frames)  # a bad clip fails here, before the model loads
    model = trained_lib.load(workdir=workdir, checkpoint=checkpoint, step=step)
    eval_config, eval_source = recover.eval_section(model.config)
    detector = detector or alignment.FaceDetector()
    detector_info = recover.describe_detector(detector)
    stem = os.path.splitext(os.path.basename(clip))[0]
    frames_dir = os.path.join(output_dir, f"{stem}_frames")
    os.makedirs(frames_dir, exist_ok=True)
    recoverer = recover.Recoverer(model, nets, eval_config, eval_source, frames_dir, keep=True)
    skipped, last_box, decoded = [], None, 0
    for index, rgb in video.frames():
        decoded += 1
        try:
            faces = detector.detect(rgb)
        except Exception as e:  # noqa: BLE001 - a detector failure on one frame is a skip
            faces, reason = [], f"face detection failed ({type(e).__name__}: {e})"
        else:
            reason = "no face found"
        face, how, overlap = track(faces, last_box)
        if face is None:
            skipped.append({"frame_index": index, "reason": reason})
            continue
        last_box = face.box
        item = {"path": f"{clip}#frame={index}", "stem": f"{stem}_f{index:06d}",
                "sha256": recover.sha256(recover.png_bytes(rgb)), "original": rgb,
                "conversions": [], "frame_index": index,
                "track": {"how": how, "iou_with_last": overlap}}  # fmt: skip
        recoverer.add(recover.aligned_item(item, face, model.image_size, detector_info))
    recoverer.flush()
    kept = recoverer.kept
    if not kept:
        os.rmdir(frames_dir)  # empty: nothing was recovered
        raise VideoError(f"{clip}: no face found in any of {decoded} sampled frames")
    if skipped:
        print(f"skip: {len(skipped)} of {decoded} frames without a face (listed in the clip "
              "record)", file=sys.stderr)  # fmt: skip

    outputs = {"frames_folder": os.path.basename(frames_dir)}
    sheet_name = f"{stem}_contact.png"
    sheet, shown = contact_sheet(kept)
    data = recover.png_bytes(sheet)
    recover.write_atomic(os.path.join(output_dir, sheet_name), data)
    outputs["contact_sheet"] = {"file": sheet_name, "sha256": recover.sha256(data),
                                "frames": shown}  # fmt: skip
    if recovered_video:
        video_name = f"{stem}_recovered.avi"
        video_path = os.path.join(output_dir, video_name)
        write_recovered_video(video_path, video, kept)
        outputs["recovered_video"] = {"file": video_name, "sha256": file_sha256(video_path)}

    aggregated = aggregate(recoverer.nets, kept, recoverer.batch_size)
    consistency = np.asarray(aggregated["target"]["facenet"]["frame_cosines"])
    order = np.argsort(-consistency, kind="stable")
    indices = [k["frame_index"] for k in kept]
    probabilities = [k["record"]["forgery_probability"] for k in kept]
    forged = sum(k["record"]["verdict"] == "forgery" for k in kept)
    shared = {key: kept[0]["record"][key] for key in FRAME_RECORD_SHARED if key != "created_utc"}
    record = {
        **shared,
        "format": FORMAT,
        "clip": {
            "path": clip,
            "absolute_path": os.path.abspath(clip),
            "sha256": file_sha256(clip),  # in blocks: a clip may be larger than memory
            "fps": video.fps,
            "every": every,
            "max_frames": max_frames,
            "frames_sampled": decoded,
            "width": video.width,
            "height": video.height,
        },
        "tracking": {
            "detector": detector_info,
            "rule": f"first frame: the best face (box area x score, as recover --align); then "
            f"the face with the largest IoU with the last tracked box if >= {TRACK_IOU}, else "
            "the best face again (reacquired)",
        },
        "frames": [
            {"frame_index": k["frame_index"], "track": k["track"],
             **{key: v for key, v in k["record"].items() if key not in FRAME_RECORD_SHARED}}
            for k in kept
        ],  # fmt: skip
        "skipped_frames": skipped,
        "forgery_probability": {"per_frame": probabilities,
                                "mean": float(np.mean(probabilities)),
                                "median": float(np.median(probabilities))},  # fmt: skip
        "aggregate": aggregated,
        "most_consistent_frames": [indices[i] for i in order[:CONSISTENCY_FRAMES]],
        "least_consistent_frames": [indices[i] for i in order[::-1][:CONSISTENCY_FRAMES]],
        "recovered_frames": len(kept),
        "forgery_frames": forged,
        "verdict": "forgery" if 2 * forged >= len(kept) else "pristine",
        "verdict_rule": "forgery if at least half of the recovered frames' verdicts (each the "
        "image rule in frames[].verdict_rule) are forgery, else pristine",
        "outputs": outputs,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = os.path.join(output_dir, stem + recover.RECORD_SUFFIX)
    recover.write_atomic(path, recover.dumps(record).encode())
    print(f"recovered {len(kept)} of {decoded} frames ({forged} forged: {record['verdict']})"
          f" -> {path}")  # fmt: skip
    return 0


def read_clip_record(path: str) -> dict:
    """A clip record written by `run` (ValueError for anything else)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a recover --video clip record")
    return record
