"""Real LFW faces for tests (read from the configured folder, never copied into the repo)."""

import os

import numpy as np

from dfrec_jax import configlib
from dfrec_jax import images as image_io


def real_faces(count: int, size: int = 112) -> np.ndarray:
    """`count` real LFW faces (different people), float32 [count,size,size,3] in [0,1]."""
    root = configlib.lfw_dir()
    assert os.path.isdir(root), f"real LFW faces needed at {root} (or set DFREC_LFW_DIR)"
    people = sorted(os.listdir(root))[:count]
    return np.stack(
        [image_io.load_rgb(image_io.list_images(os.path.join(root, p))[0], size) for p in people]
    )
