"""Head pose (yaw, pitch, roll) from 68-point landmarks, for the pose-error column.

A recovered face should keep the input's pose; the table reports the mean absolute angle
difference between the two. Pose comes from a perspective-n-point fit (cv2.solvePnP) of six
landmarks to a generic rigid 3-D face, which is coarse in absolute terms (one face shape for
everyone) but consistent between two images of the same pose, which is what a difference needs.

Frames. The model is written in OpenCV's camera frame: x to the image right, y down, z away
from the camera, so a frontal, upright face has rotation identity. A fitted rotation R (model
to camera) is decomposed as R = Rz(roll) @ Ry(yaw) @ Rx(pitch) (degrees), which gives:
  - yaw > 0: the face turns toward the image left (the subject's right);
  - pitch > 0: the face tilts down (chin toward the chest);
  - roll > 0: the face rotates clockwise in the image (the image-right eye moves down).
Mirroring an image left-right negates yaw and roll and keeps pitch.
"""

import cv2
import numpy as np

# Landmark indices (iBUG 68-point order, image-left first) of the six model points.
NOSE_TIP, CHIN, EYE_OUTER_LEFT, EYE_OUTER_RIGHT, MOUTH_LEFT, MOUTH_RIGHT = 30, 8, 36, 45, 48, 54
MODEL_INDICES = (NOSE_TIP, CHIN, EYE_OUTER_LEFT, EYE_OUTER_RIGHT, MOUTH_LEFT, MOUTH_RIGHT)

# A generic face in millimetres, origin at the nose tip, in the camera frame above. These are
# the widely used head-pose values (S. Mallick, "Head Pose Estimation using OpenCV and Dlib",
# LearnOpenCV 2016: nose (0,0,0), chin (0,-330,-65), eye corners (+-225,170,-135), mouth corners
# (+-150,-150,-125), y up, z toward the viewer) divided by 5 to give an ~90 mm outer-eye-corner
# span, and with y and z negated into the camera frame.
MODEL_POINTS_MM = np.array(
    [
        [0.0, 0.0, 0.0],  # nose tip
        [0.0, 66.0, 13.0],  # chin
        [-45.0, -34.0, 27.0],  # image-left eye, outer corner
        [45.0, -34.0, 27.0],  # image-right eye, outer corner
        [-30.0, 30.0, 25.0],  # image-left mouth corner
        [30.0, 30.0, 25.0],  # image-right mouth corner
    ],
    np.float64,
)
_EYE_SPAN_MM = MODEL_POINTS_MM[3, 0] - MODEL_POINTS_MM[2, 0]


def camera_matrix(image_size: int) -> np.ndarray:
    """float64 [3,3] pinhole intrinsics: focal length = image size in pixels, principal point
    at the image centre ((S-1)/2 with pixel centres at integer coordinates, so mirroring
    x -> S-1-x is a mirror about the principal point)."""
    c = (image_size - 1) / 2.0
    return np.array([[image_size, 0.0, c], [0.0, image_size, c], [0.0, 0.0, 1.0]], np.float64)


def euler_angles(rotation: np.ndarray) -> np.ndarray:
    """float64 [3] (yaw, pitch, roll) in degrees with rotation = Rz(roll) Ry(yaw) Rx(pitch)."""
    r = rotation
    yaw = np.arctan2(-r[2, 0], np.hypot(r[2, 1], r[2, 2]))
    pitch = np.arctan2(r[2, 1], r[2, 2])
    roll = np.arctan2(r[1, 0], r[0, 0])
    return np.degrees([yaw, pitch, roll])


def _initial_pose(points: np.ndarray, camera: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A frontal start for the iterative fit: no rotation, the nose tip on its image ray at
    the depth where the model's eye span has the observed pixel length. Six noisy points
    make solvePnP's own DLT start unreliable; faces in our crops are near frontal."""
    span_px = max(float(np.linalg.norm(points[3] - points[2])), 1.0)
    depth = camera[0, 0] * _EYE_SPAN_MM / span_px
    (u, v), (cx, cy) = points[0], camera[:2, 2]
    tvec = np.array([(u - cx) * depth / camera[0, 0], (v - cy) * depth / camera[1, 1], depth])
    return np.zeros(3), tvec


def head_pose(landmarks, image_size: int) -> np.ndarray:
    """float64 [B,3] (yaw, pitch, roll) in degrees of 68-point landmarks [B,68,2].

    Landmarks are (x, y) pixels of a square image of side image_size, iBUG/dlib order (what
    `data_pipelines.landmarks.LandmarkDetector` returns). Rows where one of the six model
    landmarks is not finite, or where the fit fails, are NaN. Host-side: one solvePnP a row.
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"head_pose: landmarks must be [B,68,2], got shape {landmarks.shape}")
    camera = camera_matrix(image_size)
    poses = np.full((len(landmarks), 3), np.nan)
    for i, row in enumerate(landmarks):
        points = row[list(MODEL_INDICES)]
        if not np.isfinite(points).all():
            continue
        rvec, tvec = _initial_pose(points, camera)
        ok, rvec, _ = cv2.solvePnP(
            MODEL_POINTS_MM,
            points,
            camera,
            None,
            rvec,
            tvec,
            useExtrinsicGuess=True,
            flags=cv2.SOLVEPNP_ITERATIVE,
        )
        if ok:
            poses[i] = euler_angles(cv2.Rodrigues(rvec)[0])
    return poses


def angle_error(pose_a, pose_b) -> np.ndarray:
    """float64 [B] mean absolute difference of (yaw, pitch, roll) [B,3] in degrees, each
    difference wrapped into [-180, 180) first (179 vs -179 is 2 degrees, not 358). NaN rows
    stay NaN."""
    diff = np.asarray(pose_a, np.float64) - np.asarray(pose_b, np.float64)
    wrapped = np.mod(diff + 180.0, 360.0) - 180.0
    return np.mean(np.abs(wrapped), axis=-1)
