"""Identity-disjoint train/validation/test splits and dataset-folder checks.

A person's split is a pure function of their name (sha256 bucket), so it never changes when
people are added or removed, and no identity can appear in two splits.
"""

import hashlib
import os

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder that is missing or not in the documented layout (one-line message)."""


def identity_split(identity: str, fractions=DEFAULT_FRACTIONS, salt: str = "dfrec") -> str:
    """ "train" / "validation" / "test" for `identity`, by a stable hash bucket."""
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != len(SPLITS):
        raise ValueError(f"split fractions must be 3 numbers summing to 1, got {fractions}")
    digest = hashlib.sha256(f"{salt}:{identity}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def require_dir(path: str, dataset: str, layout: str) -> str:
    """`path` if it is a folder, else DatasetLayoutError naming it and the expected layout."""
    if not path or not os.path.isdir(path):
        layout = " ".join(layout.split())
        raise DatasetLayoutError(
            f"{dataset}: folder not found: {path!r}; expected layout: {layout}"
        )
    return path


LFW_LAYOUT = "<root>/<Person_Name>/<Person_Name>_NNNN.jpg (LFW's folder per person)"


def folder_fingerprint(people: dict[str, list[str]]) -> str:
    """sha256 (16 hex) of a scanned folder's listing: each file's person/name and size. Equal
    for a copy of the same files elsewhere, different when a file is added, removed, renamed
    or resized (a build records it; `datasets.prepare` rebuilds when it changes)."""
    return _listing_digest(
        (f"{person}/{os.path.basename(path)}", path)
        for person, paths in sorted(people.items())
        for path in paths
    )


def tree_fingerprint(root: str) -> str:
    """sha256 (16 hex) of every file below `root` (relative path and size; hidden names left
    out): `folder_fingerprint` for the manual_dir datasets, whose trees have no person level."""

    def files():
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(folder, root)
            for name in sorted(f for f in names if not f.startswith(".")):
                yield f"{rel}/{name}", os.path.join(folder, name)

    return _listing_digest(files())


def _listing_digest(entries) -> str:
    """sha256 (16 hex) of `label:size` lines for (label, path) entries, in the given order."""
    digest = hashlib.sha256()
    for label, path in entries:
        digest.update(f"{label}:{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()[:16]


def scan_lfw(root: str) -> dict[str, list[str]]:
    """Person -> sorted image paths for an LFW-layout folder; people sorted by name."""
    require_dir(root, "lfw", LFW_LAYOUT)
    people = {}
    for person in sorted(os.listdir(root)):
        folder = os.path.join(root, person)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        if files:
            people[person] = [os.path.join(folder, f) for f in files]
    if not people:
        raise DatasetLayoutError(f"lfw: no person folders with images in {root!r}; {LFW_LAYOUT}")
    return people
