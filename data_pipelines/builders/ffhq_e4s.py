"""`ffhq_e4s`: FFHQ faces swapped by E4S (method "E4S"), from manual_dir.

Expected tree (`<manual_dir>` = `DownloadConfig(manual_dir=...)`):

    <manual_dir>/
      ffhq/.../<NNNNN>.png                 FFHQ originals, searched recursively, so both the
                                           official images1024x1024/00000/00000.png tree and a
                                           flat folder work (`FFHQ/`, `images1024x1024/` also
                                           accepted); zero padding is ignored (00042 == 42)
      e4s/swap_<source>_to_<target>.png    E4S swaps (folder `E4S/` also accepted)
      identity_ffhq.txt                    optional: `<image id> <person id>` per line

Sources: E4S releases code, not a swapped FFHQ set (github.com/e4s2022/e4s, CVPR 2023; also
e4s2024/E4S2024). Its inference script scripts/face_swap.py writes each result as
`swap_<source stem>_to_<target stem>.png`, which is the default `swap_pattern`; FFHQ-E4S as
used by DFREC was made by its authors and its layout is not public, so the folder names and
the pattern are config fields (`originals_dirs`, `method_dirs`, `swap_pattern`; e.g.
`make_config(swap_pattern=r"^(?P<source>\\d+)_(?P<target>\\d+)\\.png$")` for
`<source>_<target>.png`). FFHQ's own layout (images1024x1024/<thousands>/<NNNNN>.png) is from
github.com/NVlabs/ffhq-dataset and E4S' README.

Identities and splits: FFHQ has no identity labels; without identity_ffhq.txt every image is
its own identity (Flickr photos of mostly distinct people). Splits are
`splits.identity_split` of the target's identity; a swap whose source falls in another split
is skipped as "cross-split pair" (split_by="pair", default) or kept and counted
(split_by="target"; paired_images.PairedImageConfig).

Examples: each swap (label 1) with its true target and source originals resized to
`image_size` (FFHQ images are aligned faces; no re-alignment); `mask` derived from
|swap - target| (no ground truth; see paired_images' docstring); `alpha` -1.0 (unknown);
each original used as a target is also a pristine example (mask 255 everywhere, alpha 0;
`features.py`). Bad files, missing originals and unparseable names are
skipped and counted: `builder.skip_summary()`.
"""

import tensorflow_datasets as tfds

from data_pipelines.builders import paired_images
from dfrec_jax import host_tf  # noqa: F401  (TensorFlow kept off the accelerators)

# The docstring's expected tree (tfds prints it when manual_dir is missing).
MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__.split("\n\n", 1)[1].split("\nSources:")[0]

LAYOUT = (
    "<manual_dir>/ffhq/**/<NNNNN>.png (FFHQ originals), "
    "<manual_dir>/e4s/swap_<source>_to_<target>.png (E4S swaps), optional "
    "<manual_dir>/identity_ffhq.txt ('<image id> <person id>' lines)"
)

DEFAULT_CONFIG = paired_images.PairedImageConfig(
    name="default",
    description="E4S swaps of FFHQ, 224x224",
    image_size=224,
    originals_dirs=("ffhq", "FFHQ", "images1024x1024"),
    method_dirs=(("E4S", ("e4s", "E4S")),),
    swap_pattern=r"^swap_(?P<source>\d+)_to_(?P<target>\d+)\.(?:png|jpe?g)$",
    identity_files=("identity_ffhq.txt",),
)


def make_config(**overrides) -> paired_images.PairedImageConfig:
    """The default config with `overrides` (any PairedImageConfig field), named accordingly."""
    return paired_images.named_config(paired_images.PairedImageConfig, DEFAULT_CONFIG, **overrides)


class FfhqE4s(paired_images.PairedImageBuilder):
    """FFHQ face swaps by E4S with their true sources and targets."""

    name = "ffhq_e4s"
    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = paired_images.RELEASE_NOTES
    BUILDER_CONFIGS = [DEFAULT_CONFIG]
    DEFAULT_BUILDER_CONFIG_NAME = "default"
    LAYOUT = LAYOUT
    HOMEPAGE = "https://github.com/e4s2022/e4s"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS


BUILDER = FfhqE4s
