"""What each `split_by` rule of the paired-image builders keeps of a MegaFS-style set.

    python -m data_pipelines.measure_pair_splits [--images=30000] [--people=6217] [--seed=0]

Simulates CelebA-HQ's shape (30,000 images of 6,217 people, each image's person drawn at
random) with one swap per image as target and a random other image as source, as MegaFS'
`<target>_<source>` files pair them; splits persons with `splits.identity_split` (the builders'
rule, 0.8 / 0.1 / 0.1). Prints one JSON line per split: targets, what split_by="pair" keeps
and drops, and how many of split_by="target"'s swaps have a source person from another split
(README "Data").
"""

import argparse
import json

import numpy as np

from data_pipelines import splits


def measure(images: int = 30_000, people: int = 6_217, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    person = rng.integers(0, people, images)
    source = (np.arange(images) + rng.integers(1, images, images)) % images  # another image
    split_of = {p: splits.identity_split(str(p)) for p in np.unique(person)}
    target_split = np.array([split_of[p] for p in person])
    source_split = np.array([split_of[p] for p in person[source]])
    rows = []
    for name in splits.SPLITS:
        mine = target_split == name
        crossing = int(np.sum(mine & (source_split != name)))
        rows.append({"split": name, "targets": int(mine.sum()),
                     "pair_keeps": int(mine.sum()) - crossing, "pair_drops": crossing,
                     "target_keeps": int(mine.sum()),
                     "target_sources_from_other_splits": crossing})  # fmt: skip
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--people", type=int, default=6_217)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for row in measure(args.images, args.people, args.seed):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
