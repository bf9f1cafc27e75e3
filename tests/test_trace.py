"""`trace`: the real identity nets rank a gallery of real LFW people for recovered faces.

Gallery: the first image of 4 LFW people with at least two images (one of them also with its
mirror image, so its centroid averages two embeddings; another stored at 96 px, so two image
sizes are embedded), plus an unreadable file and a stray file. Recovery folder: the SECOND
images of two of those people as `case_source.png` / `case_target.png`, the way `recover`
names them, with a `case.json` record that lists the source file's sha256 but not the target's.
"""

import contextlib
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import default
from dfrec_jax import configlib, recover, trace
from dfrec_jax import images as image_io
from dfrec_jax.eval import identity


@pytest.fixture(scope="module")
def nets():
    return identity.load(default.eval_config())


def _people(count):
    root = configlib.lfw_dir()
    chosen = {}
    for person in sorted(os.listdir(root)):
        folder = os.path.join(root, person)
        if os.path.isdir(folder) and len(image_io.list_images(folder)) >= 2:
            chosen[person] = image_io.list_images(folder)[:2]
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"fewer than {count} LFW people with two images in {root}")


def _u8(path, size=None):
    with Image.open(path) as im:
        im = im.convert("RGB")
        return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC) if size else im)


def _save(path, image):
    Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    people = _people(4)
    names = list(people)
    gallery = tmp_path_factory.mktemp("gallery")
    images = {}
    for i, (person, paths) in enumerate(people.items()):
        (gallery / person).mkdir()
        first = _u8(paths[0], 96 if i == 3 else None)
        images[person] = [first]
        _save(gallery / person / "0.png", first)
        if i == 0:
            images[person].append(first[:, ::-1].copy())
            _save(gallery / person / "1.png", images[person][1])
    (gallery / names[2] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (gallery / "stray.png").write_bytes((gallery / names[1] / "0.png").read_bytes())

    recovery = tmp_path_factory.mktemp("recovery")
    faces = {"source": _u8(people[names[0]][1]), "target": _u8(people[names[1]][1])}
    for role, image in faces.items():
        _save(recovery / f"case_{role}.png", image)
    _save(recovery / "case_panel.png", faces["source"])  # not a recovered face: ignored
    source_sha = hashlib.sha256((recovery / "case_source.png").read_bytes()).hexdigest()
    record = {
        "input": {"path": "photo.png"},
        "input_sha256": "0" * 64,
        "verdict": "forgery",
        "forgery_probability": 0.75,
        "identity_similarity_input_target": 0.5,
        "checkpoint": {"step": 7},
        "outputs": {"source": {"sha256": source_sha}, "target": {"sha256": "f" * 64}},
    }
    (recovery / "case.json").write_text(json.dumps(record))
    return {
        "gallery": gallery,
        "recovery": recovery,
        "names": names,
        "images": images,
        "faces": faces,
    }


@pytest.fixture(scope="module")
def traced(case, nets, tmp_path_factory):
    """Two runs into different files, with their stdout / stderr."""
    runs = []
    for i in range(2):
        output = tmp_path_factory.mktemp(f"trace{i}") / "trace.json"
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = trace.run(
                str(case["gallery"]), str(case["recovery"]), output=str(output), top_k=3, nets=nets
            )
        runs.append(
            {
                "code": code,
                "output": output,
                "stdout": stdout.getvalue(),
                "stderr": stderr.getvalue().splitlines(),
            }
        )
    return runs


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_top1_is_the_right_person_under_facenet(case, traced):
    run = traced[0]
    assert run["code"] == trace.EXIT_RECORD_MISMATCH == 3  # the fixture's target was altered
    report = json.loads(run["output"].read_text())
    faces = {face["role"]: face for face in report["faces"]}
    assert [face["file"] for face in report["faces"]] == ["case_source.png", "case_target.png"]
    names = case["names"]
    assert faces["source"]["candidates"][0]["person"] == names[0]
    assert faces["target"]["candidates"][0]["person"] == names[1]
    for face in report["faces"]:
        candidates = face["candidates"]
        assert len(candidates) == 3  # top_k
        assert [c["facenet"]["rank"] for c in candidates] == [1, 2, 3]
        cosines = [c["facenet"]["cosine"] for c in candidates]
        assert cosines == sorted(cosines, reverse=True)
        for c in candidates:
            assert -1 <= c["facenet"]["cosine"] <= 1 and -1 <= c["dlib"]["cosine"] <= 1
            assert 1 <= c["dlib"]["rank"] <= 4
            assert c["dlib"]["same_person"] == (c["dlib"]["nearest_distance"] < 0.6)
    assert report["ranking"]["by"] == "facenet" and report["ranking"]["top_k"] == 3
    assert report["gallery"]["people"] == 4 and report["gallery"]["images"] == 5


def test_scores_match_an_independent_computation(case, traced, nets):
    """Centroid cosines and nearest dlib distances recomputed from the nets' embeddings of
    single images (two compiles per net: 112 and 96 px)."""

    def embed(image):
        batch = image[None].astype(np.float32) / 255.0
        return {name: np.asarray(getattr(nets, name)(batch))[0] for name in identity.NAMES}

    report = json.loads(traced[0]["output"].read_text())
    for face in report["faces"]:
        query = embed(case["faces"][face["role"]])
        for c in face["candidates"]:
            gallery = [embed(image) for image in case["images"][c["person"]]]
            for name in identity.NAMES:
                centroid = _unit(np.mean([_unit(e[name]) for e in gallery], axis=0))
                expected = float(_unit(query[name]) @ centroid)
                assert c[name]["cosine"] == pytest.approx(expected, abs=1e-4), (name, c)
            distances = [np.linalg.norm(e["dlib"] - query["dlib"]) for e in gallery]
            assert c["dlib"]["nearest_distance"] == pytest.approx(min(distances), abs=1e-4)
            assert c["dlib"]["nearest_image"] == f"{c['person']}/{np.argmin(distances)}.png"


def test_record_context_and_skips(case, traced):
    report = json.loads(traced[0]["output"].read_text())
    faces = {face["role"]: face for face in report["faces"]}
    assert faces["source"]["record"]["file_matches_record"] is True
    assert faces["target"]["record"]["file_matches_record"] is False
    assert faces["source"]["record"]["verdict"] == "forgery"
    digest = hashlib.sha256((case["recovery"] / "case_source.png").read_bytes()).hexdigest()
    assert faces["source"]["sha256"] == digest
    skipped = {os.path.basename(s["path"]) for s in report["gallery"]["skipped"]}
    assert skipped == {"broken.png", "stray.png"}
    skips, warnings = traced[0]["stderr"][:2], traced[0]["stderr"][2:]
    assert len(skips) == 2 and all(line.startswith("skip: ") for line in skips)
    assert warnings == [
        "warning: case_target.png: sha256 "
        f"{faces['target']['sha256'][:16]}... differs from the one its evidence record case.json "
        "lists: the file was changed after recover wrote it"
    ]


def test_report_is_deterministic_and_the_table_readable(case, traced):
    first, second = (run["output"].read_bytes() for run in traced)
    assert first == second
    text = first.decode()
    assert json.loads(text) == json.loads(recover.dumps(json.loads(text)))  # canonical form
    assert '"created_utc"' not in text
    table = traced[0]["stdout"]
    assert "case_source.png (source; recover verdict forgery)" in table
    assert case["names"][0] in table and case["names"][1] in table
    assert table.strip().splitlines()[-1].startswith("ranked 4 people for 2 recovered faces")


def test_empty_gallery_or_recovery_fails_with_one_line(case, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert trace.run(str(empty), str(case["recovery"])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no readable image")

    recovery = tmp_path / "recovery"
    recovery.mkdir()
    (recovery / "notes.txt").write_text("nothing here")
    assert trace.run(str(case["gallery"]), str(recovery)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no recovered faces")
