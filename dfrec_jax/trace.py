"""`trace`: rank a gallery of known people for each face that `recover` recovered.

    python -m dfrec_jax trace --gallery DIR --input RECOVERY_DIR [--output FILE] [--top_k 5]

The gallery has one folder per person (`DIR/<person>/*.png|jpg|...`, sub-folders included)
holding aligned face images of any square size. The recovered faces are the
`<stem>_source.png` and `<stem>_target.png` files `recover` wrote into RECOVERY_DIR; the
matching `<stem>.json` evidence record, when present, is summarised next to each face and its
recorded sha256 is checked against the file that was ranked.

Both identity networks embed every image (at its own size: batches are grouped by size and
padded to eval.batch_size, so each size compiles once). Per person and network the gallery
embeddings are L2-normalised, averaged and normalised again (a centroid), and a face's score
for that person is the cosine to it. Candidates are ranked by the FaceNet cosine (the paper's
identity measure; `rank_by="dlib"` ranks by the dlib cosine instead), ties by name; each lists
both cosines with its rank under each network, and the Euclidean distance between the raw dlib
descriptors of the face and the person's nearest gallery image with dlib's own same-person rule
(distance < 0.6), an independent check on the FaceNet ranking.

Trace has no run folder, and recover records only the run's config hash, so the identity
networks come from `configs/default.py`'s eval_config() (the same package weights unless a
run overrode eval.identity_weights / eval.dlib_weights, which trace then does not know about).

The report (default RECOVERY_DIR/trace.json) has sorted keys, floats rounded like recover's
records, and no timestamps: the same gallery and recovery folder give the same bytes. A table
goes to stdout. The exit code is 1, with one line, when the gallery has no readable image or
the recovery folder has no recovered face; it is EXIT_RECORD_MISMATCH (3), after the report is
written, when a ranked face file no longer matches the sha256 its evidence record lists (or the
record is unreadable): one `warning:` line per such file on stderr, and in the report
`file_matches_record: false` (or the record's `unreadable` reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from configs import default
from dfrec_jax import images as image_io
from dfrec_jax import recover, video
from dfrec_jax.eval import identity
from dfrec_jax.exported import file_sha256
from dfrec_jax.run import workdir as workdir_lib

FORMAT = "dfrec_jax trace report, version 1"
DLIB_SAME_PERSON = 0.6  # dlib's threshold on the Euclidean distance of descriptors
EXIT_RECORD_MISMATCH = 3  # the report is written, but a face file differs from its record
ROLES = ("source", "target")


def _read_square(path: str) -> tuple[bytes, np.ndarray]:
    data, rgb, _ = image_io.read_rgb8(path)
    if rgb.shape[0] != rgb.shape[1]:
        raise image_io.ImageError(f"{rgb.shape[1]}x{rgb.shape[0]} is not square (aligned faces)")
    return data, rgb


def read_gallery(gallery: str):
    """({person: [(path, uint8 image)]} sorted by name, skipped [{path, reason}], digest).

    The digest is the sha256 of one `relative/path sha256-of-file` line per readable image,
    in order: it names exactly which gallery the ranks were computed against.
    """
    people, skipped, digest = {}, [], hashlib.sha256()
    for name in sorted(os.listdir(gallery)):
        folder = os.path.join(gallery, name)
        if not os.path.isdir(folder):
            skipped.append({"path": folder, "reason": "not in a person folder"})
            continue
        readable = []
        for path in image_io.list_images(folder):
            try:
                data, image = _read_square(path)
            except image_io.ImageError as e:
                skipped.append({"path": path, "reason": str(e)})
                continue
            readable.append((path, image))
            digest.update(f"{os.path.relpath(path, gallery)} {recover.sha256(data)}\n".encode())
        if readable:
            people[name] = readable
        else:
            skipped.append({"path": folder, "reason": "no readable image"})
    return people, skipped, digest.hexdigest()


def find_recovered(folder: str) -> tuple[list[dict], list[dict]]:
    """Recovered faces in `folder` ([{file, stem, role, sha256, image}] sorted by file name)
    and skipped [{path, reason}]."""
    faces, skipped = [], []
    for name in sorted(os.listdir(folder)):
        role = next((r for r in ROLES if name.endswith(recover.OUTPUTS[r])), None)
        if role is None:
            continue
        path = os.path.join(folder, name)
        try:
            data, image = _read_square(path)
        except image_io.ImageError as e:
            skipped.append({"path": path, "reason": str(e)})
            continue
        stem = name[: -len(recover.OUTPUTS[role])]
        faces.append(
            {
                "file": name,
                "stem": stem,
                "role": role,
                "sha256": recover.sha256(data),
                "image": image,
            }
        )
    return faces, skipped


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ranks(scores: np.ndarray, names: list[str]) -> np.ndarray:
    """1-based rank of each person per row of scores [F,P]: higher first, ties by name."""
    ranks = np.empty(scores.shape, np.int64)
    for row, values in enumerate(scores):
        order = sorted(range(len(names)), key=lambda p: (-values[p], names[p]))
        ranks[row, order] = np.arange(1, len(names) + 1)
    return ranks


def score(gallery_emb: dict, owner: np.ndarray, face_emb: dict, names: list[str]) -> dict:
    """Per network (`name`): cosines [F,P] of each face to each person's centroid and the
    persons' ranks (`name_rank`); for dlib also the distance [F,P] to the person's nearest
    gallery image (`dlib_distance`) and that image's index (`dlib_nearest`)."""
    num_people = len(names)
    scores = {}
    for name in identity.NAMES:
        unit = _normalise(gallery_emb[name])
        centroids = _normalise(np.stack([unit[owner == p].mean(0) for p in range(num_people)]))
        scores[name] = _normalise(face_emb[name]) @ centroids.T
        scores[f"{name}_rank"] = _ranks(scores[name], names)
    distances = np.linalg.norm(face_emb["dlib"][:, None] - gallery_emb["dlib"][None], axis=-1)
    nearest = np.zeros(scores["dlib"].shape, np.int64)
    for p in range(num_people):
        members = np.flatnonzero(owner == p)
        nearest[:, p] = members[np.argmin(distances[:, members], axis=1)]
    scores["dlib_distance"] = np.take_along_axis(distances, nearest, axis=1)
    scores["dlib_nearest"] = nearest
    return scores


def clip_faces(path: str) -> list[dict]:
    """The recovered target and source of a `recover --video` clip record, each standing for
    all its frames: FaceNet embedding = the record's target/source centroid, dlib = the mean
    raw dlib descriptor (so dlib's distance rule applies). `file_matches_record`: every frame's
    recovered face file still has the sha256 the record lists."""
    record = video.read_clip_record(path)
    folder = os.path.join(os.path.dirname(path), record["outputs"]["frames_folder"])
    digest = file_sha256(path)
    faces = []
    for role in ROLES:
        matches = True
        for frame in record["frames"]:
            entry = frame["outputs"][role]
            try:
                data, _ = _read_square(os.path.join(folder, entry["file"]))
                matches &= recover.sha256(data) == entry["sha256"]
            except (OSError, image_io.ImageError):
                matches = False
        summary = {
            "file": os.path.basename(path),
            "input": record["clip"]["path"],
            "input_sha256": record["clip"]["sha256"],
            "verdict": record["verdict"],
            "forgery_probability": record["forgery_probability"]["mean"],
            "recovered_frames": record["recovered_frames"],
            "checkpoint_step": record["checkpoint"]["step"],
            "file_matches_record": bool(matches),
        } | _converted_from(record)
        aggregate = record["aggregate"][role]
        faces.append({
            "file": f"{os.path.basename(path)}#{role}",
            "stem": os.path.splitext(os.path.basename(path))[0],
            "role": role,
            "sha256": digest,
            "record": summary,
            "embedding": {"facenet": np.asarray(aggregate["facenet"]["centroid"]),
                          "dlib": np.asarray(aggregate["dlib"]["mean_descriptor"])},
        })  # fmt: skip
    return faces


def _record_summary(folder: str, face: dict) -> dict | None:
    """What the face's recover record says, and whether it lists this very file."""
    path = os.path.join(folder, face["stem"] + recover.RECORD_SUFFIX)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        recorded = record["outputs"][face["role"]]["sha256"]
        return {
            "file": os.path.basename(path),
            "input": record["input"]["path"],
            "input_sha256": record["input_sha256"],
            "verdict": record["verdict"],
            "forgery_probability": record["forgery_probability"],
            "identity_similarity_input_target": record["identity_similarity_input_target"],
            "checkpoint_step": record["checkpoint"]["step"],
            "file_matches_record": recorded == face["sha256"],
        } | _converted_from(record)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"file": os.path.basename(path), "unreadable": f"{type(e).__name__}: {e}"}


def _converted_from(record: dict) -> dict:
    """The released file's sha256 when the record's model was `convert`ed from it."""
    source = record["checkpoint"].get("converted_from")
    return {"converted_from_sha256": source["sha256"]} if source else {}


def _candidates(f: int, scores: dict, rank_by: str, top_k: int, people: dict, entries, gallery):
    """The `top_k` best people for face `f` under `rank_by`, with all their scores."""
    names = list(people)
    candidates = []
    for p in np.argsort(scores[f"{rank_by}_rank"][f])[:top_k]:
        distance = float(scores["dlib_distance"][f, p])
        nearest = entries[scores["dlib_nearest"][f, p]][1]
        candidates.append(
            {
                "person": names[p],
                "gallery_images": len(people[names[p]]),
                "facenet": {
                    "cosine": float(scores["facenet"][f, p]),
                    "rank": int(scores["facenet_rank"][f, p]),
                },
                "dlib": {
                    "cosine": float(scores["dlib"][f, p]),
                    "rank": int(scores["dlib_rank"][f, p]),
                    "nearest_distance": distance,
                    "nearest_image": os.path.relpath(nearest, gallery),
                    "same_person": round(distance, recover.FLOAT_DECIMALS) < DLIB_SAME_PERSON,
                },
            }
        )
    return candidates


def _table(faces: list[dict]) -> str:
    header = (
        f"  {'rank':>4}  {'person':<28} {'FaceNet':>8} {'(rank)':>6} {'dlib':>8} {'(rank)':>6}"
        f" {'dlib dist':>9}  same(<{DLIB_SAME_PERSON})"
    )
    lines = []
    for face in faces:
        record = face["record"] or {}
        context = f"; recover verdict {record['verdict']}" if "verdict" in record else ""
        lines += [f"{face['file']} ({face['role']}{context})", header]
        for i, c in enumerate(face["candidates"], 1):
            fn, dl = c["facenet"], c["dlib"]
            lines.append(
                f"  {i:>4}  {c['person']:<28} {fn['cosine']:>8.4f} {fn['rank']:>6}"
                f" {dl['cosine']:>8.4f} {dl['rank']:>6} {dl['nearest_distance']:>9.4f}"
                f"  {'yes' if dl['same_person'] else 'no'}"
            )
    return "\n".join(lines)


def _print_skips(skipped: list[dict]) -> None:
    for item in skipped:
        print(f"skip: {item['path']}: {item['reason']}", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def run(
    gallery: str,
    input_dir: str,
    *,
    output: str | None = None,
    top_k: int = 5,
    rank_by: str = "facenet",
    nets: identity.IdentityNets | None = None,
) -> int:
    """Ranks the gallery for every recovered face in `input_dir`; writes the JSON report and
    prints the table. Returns the exit code. `nets` defaults to the real identity networks."""
    if rank_by not in identity.NAMES:
        raise ValueError(f"rank_by must be one of {identity.NAMES}, got {rank_by!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not os.path.isdir(gallery):
        return _fail(f"gallery folder not found: {gallery}")
    clip = os.path.isfile(input_dir)  # a `recover --video` clip record
    if clip:
        faces, face_skipped = clip_faces(input_dir), []
    elif os.path.isdir(input_dir):
        faces, face_skipped = find_recovered(input_dir)
    else:
        return _fail(f"recovery folder (or clip record) not found: {input_dir}")
    _print_skips(face_skipped)
    if not faces:
        return _fail(f"no recovered faces (*_source.png, *_target.png) in {input_dir}")
    people, gallery_skipped, gallery_sha256 = read_gallery(gallery)
    _print_skips(gallery_skipped)
    if not people:
        return _fail(f"no readable image in a person folder of the gallery {gallery}")

    eval_config = default.eval_config()
    nets_supplied = nets is not None
    nets = nets or identity.load(eval_config)
    names = list(people)
    entries = [(p, path, image) for p, name in enumerate(names) for path, image in people[name]]
    owner = np.array([p for p, _, _ in entries])
    batch = int(eval_config.batch_size)
    gallery_emb = identity.embed_all(nets, [image for _, _, image in entries], batch)
    if clip:  # the clip's aggregated identities stand for its faces
        face_emb = {name: np.stack([face["embedding"][name] for face in faces])
                    for name in identity.NAMES}  # fmt: skip
    else:
        face_emb = identity.embed_all(nets, [face["image"] for face in faces], batch)
    scores = score(gallery_emb, owner, face_emb, names)

    reported = [
        {
            "file": face["file"],
            "stem": face["stem"],
            "role": face["role"],
            "sha256": face["sha256"],
            "record": face["record"] if clip else _record_summary(input_dir, face),
            "candidates": _candidates(f, scores, rank_by, top_k, people, entries, gallery),
        }
        for f, face in enumerate(faces)
    ]
    report = {
        "format": FORMAT,
        "float_decimals": recover.FLOAT_DECIMALS,
        "gallery": {
            "path": gallery,
            "absolute_path": os.path.abspath(gallery),
            "people": len(names),
            "images": len(entries),
            "content_sha256": gallery_sha256,
            "skipped": gallery_skipped,
        },
        "recovery": {
            "path": input_dir,
            "absolute_path": os.path.abspath(input_dir),
            "faces": len(faces),
            "skipped": face_skipped,
        },
        "ranking": {
            "by": rank_by,
            "top_k": top_k,
            "score": "cosine of the face's embedding to the person's centroid (mean of the "
            "L2-normalised gallery embeddings, renormalised), per network",
            "dlib_same_person": f"Euclidean distance of raw dlib descriptors to the person's "
            f"nearest gallery image < {DLIB_SAME_PERSON}",
        },
        "identity_nets": (
            {"config": "configs/default.py eval_config()", **recover.describe_nets(eval_config)}
            if not nets_supplied
            else "supplied by caller"
        ),
        "versions": workdir_lib.library_versions(),
        "faces": reported,
    }
    if output is None:
        base = os.path.splitext(input_dir)[0] + "_" if clip else input_dir + os.sep
        output = base + "trace.json"
    recover.write_atomic(output, recover.dumps(report).encode())
    print(_table(reported))
    print(f"ranked {len(names)} people for {len(faces)} recovered faces -> {output}")
    return EXIT_RECORD_MISMATCH if _warn_record_mismatches(reported) else 0


def _warn_record_mismatches(reported: list[dict]) -> int:
    """One warning line per face whose file differs from (or cannot be checked against) its
    evidence record; returns how many."""
    count = 0
    for face in reported:
        record = face["record"]
        if record is None:
            continue
        if "unreadable" in record:
            problem = f"its evidence record {record['file']} is unreadable ({record['unreadable']})"
        elif not record["file_matches_record"]:
            problem = (
                f"sha256 {face['sha256'][:16]}... differs from the one its evidence record "
                f"{record['file']} lists: the file was changed after recover wrote it"
            )
        else:
            continue
        print(f"warning: {face['file']}: {problem}", file=sys.stderr)
        count += 1
    return count
