"""`celeba_megafs`: CelebA-HQ faces swapped by MegaFS (FTM, IDInjection, LCR), from manual_dir.

Expected tree (`<manual_dir>` = `DownloadConfig(manual_dir=...)`):

    <manual_dir>/
      CelebA-HQ-img/<id>.jpg        the CelebA-HQ originals, named by image offset 0..29999
                                    (the folder of that name in CelebAMask-HQ; `CelebA-HQ/` and
                                    `CelebAMask-HQ/CelebA-HQ-img/` are accepted too; searched
                                    recursively; zero-padded names and .png are fine)
      FTM/<target>_<source>.jpg     MegaFS-FTM swaps      (folder `MegaFS-FTM/` also accepted)
      IDInjection/<target>_<source>.jpg                   (`MegaFS-IDInjection/`)
      LCR/<target>_<source>.jpg                           (`MegaFS-LCR/`)
      identity_CelebA-HQ.txt        optional: `<image id> <person id>` per line
        or CelebA-HQ-to-CelebA-mapping.txt (CelebAMask-HQ: `idx orig_idx orig_file`)
        plus identity_CelebA.txt (CelebA: `<orig_file> <person id>`)

Sources: the MegaFS release README (github.com/zyainfal/One-Shot-Face-Swapping-on-Megapixels)
says the dataset has the subsets MegaFS-LCR (30010 images), MegaFS-IDInjection (30441) and
MegaFS-FTM (30038 / 30040), swapped at 1024x1024 on CelebA-HQ, and that "each image is named
as targetID_sourceID.jpg, where ID represents the image offset in CelebA-HQ". The folder names
inside its download (Google Drive / Baidu archives) could not be confirmed offline: they are
config fields (`method_dirs`, `originals_dirs`, `swap_pattern`); unzip each subset into the
folder named above or pass your names through `make_config`. The CelebA-HQ offsets match the
file names of CelebAMask-HQ's CelebA-HQ-img (github.com/switchablenorms/CelebAMask-HQ).

Identities and splits: CelebA-HQ has several photos of many people, so splits are by person
when an identity file is present, at manual_dir or anywhere below it (`splits.identity_split`
of the target's person; a swap whose source person falls in another split is skipped as
"cross-split pair" with split_by="pair", the default, or kept and counted with
split_by="target": paired_images.PairedImageConfig, README "Data"). Without one, every image
id is its own identity, with a warning (two photos of one person can then land in different
splits).

Examples: each swap (label 1, `method` = FTM / IDInjection / LCR) with its true target and
source originals, all resized to `image_size` (the images are already aligned faces, no
re-alignment); `mask` is derived from |swap - target| (no ground-truth masks are released;
see paired_images' docstring); `alpha` is -1.0 (unknown). Each original used as a target is
also a pristine example (mask 255 everywhere, alpha 0; `features.py`).
Bad files (empty, corrupt, truncated, grayscale, CMYK, 16-bit, non-image, not square), missing
originals and unparseable names are skipped and counted: `builder.skip_summary()`.
"""

import os

import tensorflow_datasets as tfds

from data_pipelines.builders import paired_images
from dfrec_jax import host_tf  # noqa: F401  (TensorFlow kept off the accelerators)

# The docstring's expected tree (tfds prints it when manual_dir is missing).
MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__.split("\n\n", 1)[1].split("\nSources:")[0]

LAYOUT = (
    "<manual_dir>/CelebA-HQ-img/<id>.jpg (CelebA-HQ originals, id = image offset 0..29999), "
    "<manual_dir>/{FTM,IDInjection,LCR}/<target>_<source>.jpg (MegaFS swaps), optional "
    "<manual_dir>/identity_CelebA-HQ.txt ('<image id> <person id>' lines)"
)

DEFAULT_CONFIG = paired_images.PairedImageConfig(
    name="default",
    description="MegaFS swaps of CelebA-HQ, 224x224",
    image_size=224,
    originals_dirs=("CelebA-HQ-img", "CelebA-HQ", "CelebAMask-HQ/CelebA-HQ-img"),
    method_dirs=(
        ("FTM", ("FTM", "MegaFS-FTM")),
        ("IDInjection", ("IDInjection", "MegaFS-IDInjection")),
        ("LCR", ("LCR", "MegaFS-LCR")),
    ),
    swap_pattern=r"^(?P<target>\d+)_(?P<source>\d+)\.(?:jpe?g|png)$",
    identity_files=("identity_CelebA-HQ.txt",),
)

CELEBA_MAPPING = "CelebA-HQ-to-CelebA-mapping.txt"
CELEBA_IDENTITY = "identity_CelebA.txt"


def make_config(**overrides) -> paired_images.PairedImageConfig:
    """The default config with `overrides` (any PairedImageConfig field), named accordingly."""
    return paired_images.named_config(paired_images.PairedImageConfig, DEFAULT_CONFIG, **overrides)


class CelebaMegafs(paired_images.PairedImageBuilder):
    """CelebA-HQ face swaps by MegaFS (FTM, IDInjection, LCR) with true sources and targets."""

    name = "celeba_megafs"
    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = paired_images.RELEASE_NOTES
    BUILDER_CONFIGS = [DEFAULT_CONFIG]
    DEFAULT_BUILDER_CONFIG_NAME = "default"
    LAYOUT = LAYOUT
    HOMEPAGE = "https://github.com/zyainfal/One-Shot-Face-Swapping-on-Megapixels"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _identities(self, root: str) -> dict[str, str]:
        ids = super()._identities(root)
        if ids:
            return ids
        mapping = paired_images.find_file(root, CELEBA_MAPPING)
        people = paired_images.find_file(root, CELEBA_IDENTITY)
        if mapping is None or people is None:
            return ids
        # CelebA-HQ offset -> CelebA file (CelebAMask-HQ) -> CelebA person id.
        person_of = paired_images.read_identity_file(people)
        out = {}
        with open(mapping) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0].isdigit():
                    stem = os.path.splitext(parts[2])[0]
                    person = person_of.get(paired_images.image_key(stem))
                    if person is not None:
                        out[paired_images.image_key(parts[0])] = person
        return out


BUILDER = CelebaMegafs
