"""`recover --video` (dfrec_jax/video.py): decode, track, recover per frame as `recover --align`
does, aggregate, contact sheet, clip record; `trace` on the clip record; bad clips.

The clips are written here: real LFW faces on a grey canvas, moving every frame, the person
swapped halfway (MJPG AVI, OpenCV). The tiny random DFREC and identity nets stand in for the
trained ones (tests/tiny.py); MTCNN is the real detector.
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from data_pipelines import alignment
from dfrec_jax import recover, trace, video
from tests import lfw, tiny

FRAMES = 30
CANVAS = 200
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What must be equal between a clip's frame and the same frame recovered as a picture.
FIGURES = ("forgery_logit", "forgery_probability", "identity_similarity_input_target",
           "identity_similarity_input_target_dlib", "verdict", "input_sha256", "align")  # fmt: skip


def _faces(count: int) -> np.ndarray:
    return np.round(lfw.real_faces(count, 112) * 255).astype(np.uint8)


def write_clip(path, frames: list[np.ndarray], fps: float = 25.0) -> None:
    height, width = frames[0].shape[:2] if frames else (CANVAS, CANVAS)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


def moving_face_frames(count: int = FRAMES) -> list[np.ndarray]:
    """Person A for the first half, person B after (the swap), drifting 1 px every 2 frames."""
    faces = _faces(2)
    frames = []
    for i in range(count):
        canvas = np.full((CANVAS, CANVAS, 3), 128, np.uint8)
        offset = 30 + i // 2
        canvas[offset : offset + 112, offset - 10 : offset + 102] = faces[int(i >= count // 2)]
        frames.append(canvas)
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "interview.avi"
    write_clip(path, moving_face_frames())
    return path


@pytest.fixture(scope="module")
def nets():
    return tiny.tiny_identity_nets()


@pytest.fixture(scope="module")
def detector():
    return alignment.FaceDetector()


@pytest.fixture(scope="module")
def recovered(clip, tiny_run, nets, detector, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_out")
    code = video.run(str(clip), str(out), workdir=tiny_run, nets=nets, detector=detector)
    return {"code": code, "out": out, "record": json.loads((out / "interview.json").read_text())}


def test_clip_record_frames_and_outputs(recovered, clip):
    assert recovered["code"] == 0
    record, out = recovered["record"], recovered["out"]
    assert record["format"] == video.FORMAT
    assert record["clip"]["frames_sampled"] == FRAMES and record["clip"]["fps"] == 25.0
    assert record["clip"]["sha256"] == recover.sha256(clip.read_bytes())
    frames = record["frames"]
    assert [f["frame_index"] for f in frames] == list(range(FRAMES))
    assert record["skipped_frames"] == []
    assert frames[0]["track"]["how"] == "first"
    assert all(f["track"]["how"] == "tracked" and f["track"]["iou_with_last"] >= video.TRACK_IOU
               for f in frames[1:])  # fmt: skip
    # Every frame's files exist and match their hashes; the contact sheet holds every frame.
    folder = out / record["outputs"]["frames_folder"]
    for frame in frames:
        for entry in frame["outputs"].values():
            assert recover.sha256((folder / entry["file"]).read_bytes()) == entry["sha256"]
    sheet = record["outputs"]["contact_sheet"]
    assert recover.sha256((out / sheet["file"]).read_bytes()) == sheet["sha256"]
    image = np.asarray(Image.open(out / sheet["file"]))
    size = tiny.IMAGE_SIZE
    rows = -(-FRAMES // video.FRAMES_PER_ROW)
    assert image.shape[:2] == (rows * 3 * size, video.FRAMES_PER_ROW * size)
    assert sheet["frames"] == list(range(FRAMES))


def test_contact_sheet_of_a_long_clip_shows_evenly_spaced_frames():
    face = np.zeros((4, 4, 3), np.uint8)
    kept = [{"model_input": face, "target": face, "source": face, "frame_index": 2 * i}
            for i in range(1000)]  # fmt: skip
    sheet, shown = video.contact_sheet(kept)
    assert len(shown) == video.CONTACT_FRAMES and shown[0] == 0 and shown[-1] == 1998
    assert sheet.shape == (video.CONTACT_FRAMES // video.FRAMES_PER_ROW * 12,
                           video.FRAMES_PER_ROW * 4, 3)  # fmt: skip


def test_aggregate_verdict_and_consistency(recovered):
    record = recovered["record"]
    frames = record["frames"]
    probabilities = [f["forgery_probability"] for f in frames]
    assert record["forgery_probability"]["per_frame"] == probabilities
    assert record["forgery_probability"]["mean"] == pytest.approx(np.mean(probabilities), abs=1e-6)
    forged = sum(f["verdict"] == "forgery" for f in frames)
    assert record["forgery_frames"] == forged and record["recovered_frames"] == FRAMES
    assert record["verdict"] == ("forgery" if 2 * forged >= FRAMES else "pristine")
    for role in ("target", "source"):
        for name, dim in (("facenet", 8), ("dlib", 8)):
            agg = record["aggregate"][role][name]
            assert np.linalg.norm(agg["centroid"]) == pytest.approx(1.0, abs=1e-5)
            cosines = np.asarray(agg["frame_cosines"])
            assert cosines.shape == (FRAMES,) and len(agg["centroid"]) == dim
            assert agg["spread"]["min"] == pytest.approx(cosines.min(), abs=1e-6)
            assert agg["spread"]["mean"] == pytest.approx(cosines.mean(), abs=1e-6)
    cosines = np.asarray(record["aggregate"]["target"]["facenet"]["frame_cosines"])
    best, worst = record["most_consistent_frames"], record["least_consistent_frames"]
    assert cosines[best[0]] == pytest.approx(cosines.max(), abs=1e-6)
    assert cosines[worst[0]] == pytest.approx(cosines.min(), abs=1e-6)


def test_each_frame_equals_image_recover_align_of_that_frame(
    recovered, clip, tiny_run, nets, detector, tmp_path, capsys
):
    """The acceptance check: every frame saved as a picture and given to `recover --align`."""
    frames = video.Clip(str(clip)).frames()
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for index, rgb in frames:
        (pictures / f"interview_f{index:06d}.png").write_bytes(recover.png_bytes(rgb))
    out = tmp_path / "as_images"
    code = recover.run([str(pictures)], str(out), workdir=tiny_run, nets=nets, align=True,
                       detector=detector)  # fmt: skip
    assert code == 0, capsys.readouterr().err
    for frame in recovered["record"]["frames"]:
        image = json.loads((out / f"{frame['stem']}.json").read_text())
        for key in FIGURES:
            assert frame[key] == image[key], (frame["frame_index"], key)
        for kind in ("source", "target", "mask", "aligned"):
            assert frame["outputs"][kind]["sha256"] == image["outputs"][kind]["sha256"]


def test_trace_ranks_a_gallery_by_the_clips_identities(recovered, nets, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    for person, face in zip(("alice", "bob", "carol"), _faces(3)):
        (gallery / person).mkdir(parents=True)
        (gallery / person / "1.png").write_bytes(recover.png_bytes(face))
    clip_record = recovered["out"] / "interview.json"
    report_path = tmp_path / "trace.json"
    assert trace.run(str(gallery), str(clip_record), output=str(report_path), nets=nets) == 0
    report = json.loads(report_path.read_text())
    faces = report["faces"]
    assert [f["role"] for f in faces] == ["source", "target"]
    for face in faces:
        assert face["record"]["file_matches_record"] is True
        assert face["record"]["recovered_frames"] == FRAMES
        assert len(face["candidates"]) == 3
    # The facenet score is the cosine of the clip's centroid to each person's centroid.
    centroid = np.asarray(recovered["record"]["aggregate"]["target"]["facenet"]["centroid"])
    gallery_emb = nets.facenet(_faces(3).astype(np.float32) / 255.0)
    unit = np.asarray(gallery_emb) / np.linalg.norm(gallery_emb, axis=-1, keepdims=True)
    top = faces[1]["candidates"][0]
    expected = max(unit @ centroid)
    assert top["facenet"]["cosine"] == pytest.approx(float(expected), abs=1e-4)

    # A recovered frame file changed after the fact: exit 3 and the record says so.
    folder = recovered["out"] / recovered["record"]["outputs"]["frames_folder"]
    victim = folder / recovered["record"]["frames"][5]["outputs"]["target"]["file"]
    original = victim.read_bytes()
    try:
        victim.write_bytes(recover.png_bytes(np.zeros((tiny.IMAGE_SIZE,) * 2 + (3,), np.uint8)))
        capsys.readouterr()
        code = trace.run(str(gallery), str(clip_record), output=str(report_path), nets=nets)
        assert code == trace.EXIT_RECORD_MISMATCH
        assert "warning: interview.json#target" in capsys.readouterr().err
    finally:
        victim.write_bytes(original)


def test_track_follows_the_overlapping_face_and_reacquires_after_a_cut():
    def face(x0, y0, size=50):
        return alignment.Face(np.array([x0, y0, x0 + size, y0 + size], np.float32), 0.99,
                              np.zeros((5, 2), np.float32))  # fmt: skip

    big, small = face(100, 100, 80), face(10, 10, 50)
    assert video.track([], None) == (None, None, None)
    assert video.track([big, small], None)[:2] == (big, "first")
    chosen, how, overlap = video.track([big, small], np.array([12, 12, 62, 62], np.float32))
    assert chosen is small and how == "tracked" and overlap > 0.8  # not the bigger face
    chosen, how, overlap = video.track([big, small], np.array([300, 300, 350, 350], np.float32))
    assert chosen is big and how == "reacquired" and overlap == 0.0


def test_bad_clips_fail_with_one_reason(tmp_path, tiny_run, nets, detector):
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"not a video at all " * 100)
    empty = tmp_path / "empty.avi"
    write_clip(empty, [])
    faceless = tmp_path / "faceless.avi"
    write_clip(faceless, [np.full((CANVAS, CANVAS, 3), 128, np.uint8)] * 6)
    out = tmp_path / "out"
    run = lambda clip: video.run(str(clip), str(out), workdir=tiny_run, nets=nets,  # noqa: E731
                                 detector=detector)  # fmt: skip
    with pytest.raises(video.VideoError, match="not a video OpenCV can read|no frame"):
        run(garbage)
    with pytest.raises(video.VideoError, match="not a video OpenCV can read|no frame"):
        run(empty)
    with pytest.raises(video.VideoError, match="no face found in any of 6 sampled frames"):
        run(faceless)
    with pytest.raises(FileNotFoundError, match="video not found"):
        run(tmp_path / "missing.avi")
    with pytest.raises(ValueError, match="--every"):
        video.Clip(str(faceless), every=0)
    assert not (out / "faceless.json").exists()  # no clip record for a failed clip


def test_cli_every_nth_frame_recovered_video_and_one_line_errors(clip, tiny_run, tmp_path):
    """The real command (real FaceNet and dlib): every 10th frame, the recovered video, the
    HTML report; then an unreadable clip gives one error line and exit code 1."""
    out = tmp_path / "cli"
    base = [sys.executable, "-m", "dfrec_jax", "recover", "--workdir", str(tiny_run)]
    done = subprocess.run(
        [*base, "--video", str(clip), "--output", str(out), "--every", "10", "--recovered_video",
         "--report"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "interview.json").read_text())
    assert [f["frame_index"] for f in record["frames"]] == [0, 10, 20]
    assert record["identity_nets"]["facenet"] == "facenet_keras"
    capture = cv2.VideoCapture(str(out / record["outputs"]["recovered_video"]["file"]))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 3
    report = (out / "report.html").read_text()  # --report: the page shows the clip
    assert 'src="interview_contact.png"' in report
    assert f"{record['forgery_frames']} of 3 frames forged" in report
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00" * 4096)
    done = subprocess.run([*base, "--video", str(bad), "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: not a video OpenCV can read"], done.stderr[-2000:]
