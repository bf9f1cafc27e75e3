"""`recover`: files and evidence records per image, skips, determinism, verdict, --align.

A tiny random DFREC (tests/tiny.py) at 32 px and tiny random identity nets stand in for the
trained model and FaceNet/dlib; the inputs are real LFW faces.
"""

import contextlib
import datetime
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from dfrec_jax import recover, trained
from dfrec_jax.run import workdir as workdir_lib
from tests import lfw, tiny

SIZE = tiny.IMAGE_SIZE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_KINDS = ("source", "target", "mask", "panel")


@pytest.fixture(scope="module")
def workdir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def nets():
    return tiny.tiny_identity_nets()


def _png(path, uint8):
    Image.fromarray(uint8).save(path)


def _u8(float_image):
    return np.round(np.asarray(float_image) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """inputs/: 3 good faces, a truncated PNG, a 48 px face, a text file named .jpg and a
    sub-folder (not read, listed as skipped); other/a.png: a 4th face with a stem that is already taken;
    readme.txt: a text file given by name."""
    root = tmp_path_factory.mktemp("inputs")
    faces = _u8(lfw.real_faces(5, SIZE))
    folder, other = root / "inputs", root / "other"
    for d in (folder, other, folder / "sub"):
        d.mkdir()
    for name, face in zip("abc", faces):
        _png(folder / f"{name}.png", face)
    _png(other / "a.png", faces[3])
    _png(folder / "sub" / "d.png", faces[4])
    good = (folder / "a.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good[: len(good) // 2])
    _png(folder / "big.png", _u8(lfw.real_faces(1, 48)[0]))
    (folder / "notes.jpg").write_text("not an image\n")
    (root / "readme.txt").write_text("not an image either\n")
    return {
        "args": [str(folder), str(other), str(root / "readme.txt")],
        "good": {
            "a": folder / "a.png",
            "b": folder / "b.png",
            "c": folder / "c.png",
            "a-2": other / "a.png",
        },
        "bad": [
            folder / "big.png",
            folder / "corrupt.png",
            folder / "notes.jpg",
            root / "readme.txt",
        ],
        "sub": folder / "sub",
    }


def _run(capsys, inputs, output, **kwargs):
    code = recover.run(inputs, str(output), **kwargs)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


@pytest.fixture(scope="module")
def first(workdir, nets, inputs, tmp_path_factory):
    """One recover run of all inputs, shared by the tests below (capsys is per test, so the
    output is captured here)."""
    out = tmp_path_factory.mktemp("out1")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = recover.run(inputs["args"], str(out), workdir=workdir, nets=nets)
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def _record(out, stem):
    return json.loads((out / f"{stem}.json").read_text())


def _without_time(out, stem):
    text = (out / f"{stem}.json").read_text()
    return "".join(line for line in text.splitlines(True) if '"created_utc"' not in line)


def test_every_readable_image_gets_its_files(first, inputs):
    out = first["out"]
    assert first["code"] == 0
    expected = {
        f"{stem}{suffix}"
        for stem in inputs["good"]
        for suffix in (*recover.OUTPUTS.values(), ".json")
    }
    assert set(os.listdir(out)) == expected  # no sub-folder input, nothing for bad files
    for stem in inputs["good"]:
        for kind in ("source", "target"):
            with Image.open(out / f"{stem}_{kind}.png") as im:
                assert (im.mode, im.size) == ("RGB", (SIZE, SIZE))
        with Image.open(out / f"{stem}_mask.png") as im:
            assert (im.mode, im.size) == ("L", (SIZE, SIZE))
        with Image.open(out / f"{stem}_panel.png") as im:
            assert im.size == (4 * SIZE, SIZE)
    assert "recovered 4, skipped 5" in first["stdout"] and str(out) in first["stdout"]


def test_bad_inputs_give_one_line_each(first, inputs):
    lines = first["stderr"].strip().splitlines()
    assert len(lines) == len(inputs["bad"]) + 1, lines  # + the sub-folder
    by_path = {line.split(": ")[1]: line for line in lines}
    assert all(line.startswith("skip: ") for line in lines)
    assert "48x48 pixels" in by_path[str(inputs["bad"][0])]
    assert "corrupt image" in by_path[str(inputs["bad"][1])]
    assert "not an image" in by_path[str(inputs["bad"][2])]
    assert "not an image" in by_path[str(inputs["bad"][3])]
    assert "sub-folder (not searched)" in by_path[str(inputs["sub"])]


def test_record_fields(first, inputs, workdir):
    model = trained.load(workdir=workdir)
    with open(os.path.join(workdir, "config_hash.txt")) as f:
        config_hash = f.read().strip()
    for stem, path in inputs["good"].items():
        record = _record(first["out"], stem)
        assert record["stem"] == stem
        assert record["input"]["path"] == str(path)
        assert record["input"]["absolute_path"] == os.path.abspath(path)
        assert (record["input"]["width"], record["input"]["height"]) == (SIZE, SIZE)
        assert record["input_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        p = 1 / (1 + np.exp(-record["forgery_logit"]))
        assert record["forgery_probability"] == pytest.approx(p, abs=2e-6)
        assert record["checkpoint"] == {
            "path": os.path.join(os.path.abspath(workdir), "checkpoints"),
            "step": 3,
            "params_sha256": model.params_sha256,
        }
        assert record["config"]["hash"] == config_hash
        assert record["versions"] == workdir_lib.library_versions()
        assert record["align"] is None
        for kind in OUTPUT_KINDS:
            file = record["outputs"][kind]["file"]
            assert file == f"{stem}_{kind}.png"
            digest = hashlib.sha256((first["out"] / file).read_bytes()).hexdigest()
            assert record["outputs"][kind]["sha256"] == digest
        created = datetime.datetime.fromisoformat(record["created_utc"])
        assert created.utcoffset() == datetime.timedelta(0)
        assert record["verdict_threshold"] == 0.9 and "> 0.9" in record["verdict_rule"]


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _load_u8(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_outputs_match_the_model_and_independent_similarities(first, inputs, workdir, nets):
    """Each image as the model alone would see it (batch of one, run's masking key); the
    similarities recomputed from the written files; the panel built from them."""
    model = trained.load(workdir=workdir)
    for stem, path in inputs["good"].items():
        record, out = _record(first["out"], stem), first["out"]
        image = _load_u8(path)
        alone = jax.device_get(model.predict(image[None]))
        source, target = _load_u8(out / f"{stem}_source.png"), _load_u8(out / f"{stem}_target.png")
        mask = _load_u8(out / f"{stem}_mask.png")
        np.testing.assert_allclose(source, _u8(alone["source"][0]), atol=1)
        np.testing.assert_allclose(target, _u8(alone["target"][0]), atol=1)
        np.testing.assert_allclose(mask, _u8(alone["seg"][0, ..., 0]), atol=1)
        assert record["forgery_logit"] == pytest.approx(float(alone["forgery_logit"][0]), abs=1e-5)

        pair = np.stack([image, target]).astype(np.float32) / 255.0
        for name, key in (("facenet", ""), ("dlib", "_dlib")):
            e = np.asarray(getattr(nets, name)(pair))
            expected = _cosine(e[0], e[1])
            assert record[f"identity_similarity_input_target{key}"] == pytest.approx(
                expected, abs=1e-5
            )

        panel = _load_u8(out / f"{stem}_panel.png")
        tiles = [panel[:, i * SIZE : (i + 1) * SIZE] for i in range(4)]
        np.testing.assert_array_equal(tiles[0], image)
        np.testing.assert_array_equal(tiles[2], source)
        np.testing.assert_array_equal(tiles[3], target)
        alpha = 0.5 * mask[..., None] / 255.0
        red = image * (1 - alpha) + np.array([255, 0, 0]) * alpha
        np.testing.assert_allclose(tiles[1], red, atol=0.51)


def test_runs_are_reproducible_and_checkpoint_equals_workdir(
    first, inputs, workdir, nets, tmp_path, capsys
):
    second = tmp_path / "second"
    code, _, _ = _run(capsys, inputs["args"], second, workdir=workdir, nets=nets)
    assert code == 0
    assert sorted(os.listdir(second)) == sorted(os.listdir(first["out"]))
    for name in os.listdir(second):
        if name.endswith(".png"):
            assert (second / name).read_bytes() == (first["out"] / name).read_bytes(), name
    for stem in inputs["good"]:
        assert _without_time(second, stem) == _without_time(first["out"], stem)
        assert _record(second, stem)["created_utc"]  # the one field left out of the comparison

    # --checkpoint, and one image alone: the same record as in the batch of the first run.
    alone = tmp_path / "alone"
    checkpoint = os.path.join(workdir, "checkpoints")
    code, _, _ = _run(capsys, [str(inputs["good"]["b"])], alone, checkpoint=checkpoint, nets=nets)
    assert code == 0
    assert _without_time(alone, "b") == _without_time(first["out"], "b")


def test_verdict_follows_the_run_threshold(first, inputs, workdir, nets, tmp_path, capsys):
    """A threshold between the recorded similarities (set in a copy of the run's config) gives
    both verdicts, each by the rule `similarity > threshold`."""
    sims = sorted(
        _record(first["out"], s)["identity_similarity_input_target"] for s in inputs["good"]
    )
    assert sims[1] < sims[2], sims
    threshold = round((sims[1] + sims[2]) / 2, 6)
    run_copy = tmp_path / "run"
    shutil.copytree(workdir, run_copy)
    config = json.loads((run_copy / "config.json").read_text())
    config["eval"]["recovery_threshold"] = threshold
    (run_copy / "config.json").write_text(json.dumps(config))

    out = tmp_path / "out"
    assert _run(capsys, inputs["args"], out, workdir=str(run_copy), nets=nets)[0] == 0
    verdicts = []
    for stem in inputs["good"]:
        record = _record(out, stem)
        sim = record["identity_similarity_input_target"]
        assert record["verdict_threshold"] == threshold
        assert record["verdict"] == ("pristine" if sim > threshold else "forgery")
        verdicts.append(record["verdict"])
    assert sorted(verdicts) == ["forgery", "forgery", "pristine", "pristine"]


def test_all_bad_or_no_inputs_fail(inputs, workdir, nets, tmp_path, capsys):
    bad = [str(p) for p in inputs["bad"]]
    code, stdout, err = _run(capsys, bad, tmp_path / "o", workdir=workdir, nets=nets)
    assert code != 0 and len(err) == len(inputs["bad"]) and "recovered 0" in stdout
    assert not any(name.endswith(".json") for name in os.listdir(tmp_path / "o"))

    (tmp_path / "empty").mkdir()
    missing = str(tmp_path / "missing.png")
    code, _, err = _run(
        capsys, [str(tmp_path / "empty"), missing], tmp_path / "o2", workdir=workdir, nets=nets
    )
    assert code != 0
    assert err[0].startswith(f"skip: {tmp_path / 'empty'}: folder has no image files")
    assert err[1] == f"skip: {missing}: no such file or folder"
    assert err[2].startswith("error: no input images") and len(err) == 3


def test_every_folder_entry_is_recovered_or_skipped(workdir, nets, tmp_path, capsys):
    """Pixel modes converted deliberately (and said in the record) or refused with the reason;
    empty files, dangling links and other entries each get their skip line."""
    face = _u8(lfw.real_faces(1, SIZE)[0])
    grey = np.asarray(Image.fromarray(face).convert("L"))
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")  # I;16
    Image.fromarray(grey).save(folder / "grey8.png")
    rgba = np.concatenate([face, np.full((SIZE, SIZE, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba).save(folder / "opaque.png")
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(folder / "holes.png")
    Image.fromarray(face).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "empty.png").write_bytes(b"")
    os.symlink(tmp_path / "gone.png", folder / "dangling.png")
    (folder / "notes.txt").write_text("case notes\n")
    code, stdout, err = _run(capsys, [str(folder)], tmp_path / "out", workdir=workdir, nets=nets)
    assert code == 0 and "recovered 3, skipped 5" in stdout, (stdout, err)
    reasons = {os.path.basename(line.split(": ")[1]): line for line in err}
    assert "transparent pixels" in reasons["holes.png"]
    assert "CMYK colour" in reasons["cmyk.jpg"]
    assert reasons["empty.png"].endswith(": empty file")
    assert reasons["dangling.png"].endswith(": dangling symbolic link")
    assert "not an image file name" in reasons["notes.txt"]
    conversions = {
        stem: _record(tmp_path / "out", stem)["input"]["conversions"]
        for stem in ("grey16", "grey8", "opaque")
    }
    assert conversions == {
        "grey16": ["16-bit greyscale (I;16) scaled to 8 bits and replicated to RGB"],
        "grey8": ["greyscale replicated to RGB"],
        "opaque": ["fully opaque alpha channel dropped (RGBA)"],
    }
    # The 16-bit file and its 8-bit version are the same face to the model: same record numbers.
    a, b = _record(tmp_path / "out", "grey16"), _record(tmp_path / "out", "grey8")
    assert a["identity_similarity_input_target"] == b["identity_similarity_input_target"]
    assert a["outputs"]["target"]["sha256"] == b["outputs"]["target"]["sha256"]


def test_duplicate_stems_are_numbered_in_order():
    paths = ["x/a.png", "y/a.jpg", "z/A.png", "a-2.png", "w/a.png"]
    assert recover.assign_stems(paths) == ["a", "a-2", "A-3", "a-2-2", "a-4"]


def test_cli_without_align_never_imports_tensorflow(workdir, inputs, tmp_path):
    """The real CLI with the real identity nets, in a fresh process."""
    out = tmp_path / "cli"
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['dfrec_jax', 'recover', '--workdir', {str(workdir)!r},"
        f" '--input', {str(inputs['good']['a'])!r}, '--output', {str(out)!r}]\n"
        "try:\n"
        "    runpy.run_module('dfrec_jax', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'mtcnn') if m in sys.modules)\n"
        "print('EXIT', code, 'IMPORTED', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert "EXIT 0 IMPORTED []" in result.stdout, result.stdout + result.stderr[-2000:]
    record = _record(out, "a")
    assert record["identity_nets"]["facenet"] == "facenet_keras"
    assert -1.0 <= record["identity_similarity_input_target"] <= 1.0


def _canvas_with_face(size=200, offset=44):
    """A real 112 px LFW face on a flat grey canvas, and the face's top-left corner."""
    canvas = np.full((size, size, 3), 128, np.uint8)
    face = _u8(lfw.real_faces(1, 112)[0])
    canvas[offset : offset + 112, offset : offset + 112] = face
    return canvas


def test_align_detects_recovers_and_pastes_back(workdir, nets, tmp_path, capsys):
    from data_pipelines import alignment

    folder = tmp_path / "photos"
    folder.mkdir()
    canvas = _canvas_with_face()
    _png(folder / "photo.png", canvas)
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    _png(folder / "noise.png", noise)
    out = tmp_path / "out"
    code, _, err = _run(capsys, [str(folder)], out, workdir=workdir, nets=nets, align=True)
    assert code == 0
    assert err == [f"skip: {folder / 'noise.png'}: no face found (--align)"]

    record = _record(out, "photo")
    info = record["align"]
    assert info["detector"]["class"] == "data_pipelines.alignment.FaceDetector"
    keypoints = np.array(info["keypoints_xy"])
    assert keypoints.shape == (5, 2) and np.all((keypoints > 44) & (keypoints < 156))
    matrix = np.array(info["matrix_image_to_crop"])
    (a, b, tx), (c, d, ty) = matrix
    assert a == pytest.approx(d, abs=1e-5) and b == pytest.approx(-c, abs=1e-5)  # similarity
    landed = keypoints @ matrix[:, :2].T + matrix[:, 2]
    template = alignment.template(SIZE)
    # Least squares maps the keypoints' centroid onto the template's; LFW112 faces are aligned
    # to this template (by another detector), so every point lands within a few pixels of it.
    np.testing.assert_allclose(landed.mean(0), template.mean(0), atol=1e-4)
    assert np.abs(landed - template).max() < 0.1 * SIZE
    crop, _ = alignment.align(canvas, keypoints, SIZE)
    np.testing.assert_allclose(_load_u8(out / "photo_aligned.png"), crop, atol=1)
    assert record["input"]["width"] == 200 and record["model_input"]["size"] == SIZE

    for kind in ("source", "target"):
        full = _load_u8(out / f"photo_{kind}_full.png")
        assert full.shape == canvas.shape
        np.testing.assert_array_equal(full[:20], canvas[:20])  # far from the face: untouched
        pasted = alignment.paste_back(canvas, _load_u8(out / f"photo_{kind}.png"), matrix)
        np.testing.assert_allclose(full, pasted, atol=1)
        digest = hashlib.sha256((out / f"photo_{kind}_full.png").read_bytes()).hexdigest()
        assert record["outputs"][f"{kind}_full"]["sha256"] == digest


def test_older_run_configs_get_the_model_keys_added_since(tmp_path):
    # A config.json written before model.ism.encoder_bn_momentum and
    # model.tirm.identity_pos_embed existed rebuilds the model it was trained with.
    from configs import demo
    from dfrec_jax import trained as trained_lib

    config = demo.get_config().to_dict()
    del config["model"]["ism"]["encoder_bn_momentum"]
    del config["model"]["tirm"]["identity_pos_embed"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, default=list))
    read = trained_lib.read_config(str(path))
    assert read.model.ism.encoder_bn_momentum == 0.99
    assert read.model.tirm.identity_pos_embed is False
    config["model"]["ism"]["encoder_bn_momentum"] = 0.9  # a newer run keeps its own value
    path.write_text(json.dumps(config, default=list))
    assert trained_lib.read_config(str(path)).model.ism.encoder_bn_momentum == 0.9


def test_recover_and_gallery_programs_take_the_identity_weights_as_arguments():
    """FaceNet and dlib (~110 MB) enter recover's program and trace's gallery embedding as an
    argument (losses.BoundToFrozen, identity.split), not as constants: each lowered program's
    constants stay under 1 MB (closed over, they were compiled in and zlib-compressed into
    every persistent-cache entry)."""
    from configs import default
    from dfrec_jax import inference
    from dfrec_jax.eval import identity
    from tests.test_train_step import _constant_bytes

    model = inference.build_model(tiny.tiny_config())
    real = identity.load(default.eval_config())
    fn = recover.make_recover_fn(model, real, 0)
    assert sum(a.nbytes for a in fn.frozen_arrays) > 100e6
    images = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), np.uint8)
    assert _constant_bytes(fn.lower(inference.abstract_variables(model), images).as_text()) < 1e6
    embed = identity._jitted_embed(real)  # the jitted embedding bound to the weights
    assert _constant_bytes(embed.lower(images).as_text()) < 1e6
    # The check sees constants: the embedding closed over the networks is over the bound.
    baked = jax.jit(lambda x: real.embed(x.astype(np.float32) / 255.0))
    assert _constant_bytes(baked.lower(images).as_text()) > 50e6
