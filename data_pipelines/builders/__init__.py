"""TFDS builders; importing this package registers them with tensorflow_datasets.

`lfw_swap` synthesises swaps from an LFW-layout folder; `faceforensics`, `celeba_megafs` and
`ffhq_e4s` read a user's download (`manual_dir`) in the layout each module documents.
"""

from data_pipelines.builders import celeba_megafs, faceforensics, ffhq_e4s, lfw_swap  # noqa: F401
