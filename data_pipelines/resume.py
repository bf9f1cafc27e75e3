"""Finished splits kept while a build runs, so that a crashed build resumes split by split.

tfds writes a build into a temporary folder and deletes it when anything fails, so a crash in
the test split used to throw the train split away. The manual_dir builders
(paired_images.ManualBuilder) therefore hard-link each split's files, as soon as the split is
written, into `<data_dir>/<dataset>/.splits/<config>/<version>/<split>/` with a `split.json`
(shard lengths, bytes, skip counts, and the fingerprint of the input tree it was built from).
The next build of the same config, version and input tree links them back instead of
generating that split again. Hard links cost no disk space (a copy is made only where linking
fails, e.g. across file systems); the folder is removed once the whole build succeeds.
"""

import json
import logging
import os
import shutil

log = logging.getLogger(__name__)

STATE = "split.json"


def _link(src: str, dst: str) -> None:
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported: copy
        shutil.copyfile(src, dst)


def keep(folder: str, files: list[str], state: dict) -> None:
    """Links a written split's `files` into `folder`, then writes `state` (json) last: a
    split folder without it is incomplete and ignored."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    for path in files:
        _link(path, os.path.join(folder, os.path.basename(path)))
    tmp = os.path.join(folder, f"{STATE}.tmp")
    with open(tmp, "w") as f:
        json.dump({**state, "files": [os.path.basename(p) for p in files],
                   "sizes": [os.path.getsize(p) for p in files]}, f)  # fmt: skip
    os.replace(tmp, os.path.join(folder, STATE))


def restore(folder: str, fingerprint, paths) -> dict | None:
    """The kept state of the split in `folder`, its files linked to `paths(number of files)`
    (the new build's paths, in order), or None when there is no complete kept split built
    from `fingerprint` (then nothing is linked)."""
    try:
        with open(os.path.join(folder, STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    kept = [os.path.join(folder, name) for name in state.get("files", [])]
    sizes = [os.path.getsize(p) if os.path.isfile(p) else -1 for p in kept]
    if state.get("fingerprint") != fingerprint or sizes != state.get("sizes"):
        log.info("%s: kept split not reused (another input tree, or files missing)", folder)
        return None
    files = paths(len(kept))
    for src, dst in zip(kept, files):
        _link(src, dst)
    return state


def discard(folder: str) -> None:
    """Removes `folder` and the parents it leaves empty."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.removedirs(os.path.dirname(folder))
    except OSError:  # not empty: another config's build is kept there
        pass
