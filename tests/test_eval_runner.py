"""The `eval` runner end to end on a tiny model, a tiny real-face lfw_swap (32 px) and tiny
scoring networks: every field of metrics.json and table.md; the None, inpainting and DFREC rows
against independent recomputations on the same examples; grouping (pristine examples out of the
target metrics, in the accuracy); max_examples; padding; perturbations; errors; report tables."""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import datasets, input_pipeline
from dfrec_jax import configlib
from dfrec_jax import trained as trained_lib
from dfrec_jax.eval import baselines, identity, pose, report, runner
from dfrec_jax.pretrained import inception_fid
from tests import tiny, tiny_eval

BATCH = tiny_eval.BATCH  # 8; the split has 12 examples: two batches, the second half padding
TEST_PEOPLE = 3


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny config (eval batch 8), its lfw_swap built once, and the test split in numpy."""
    root = tmp_path_factory.mktemp("eval_data")
    lfw = tiny.write_lfw_tree(root / "lfw", people_per_split=(1, 1, TEST_PEOPLE))
    config = tiny_eval.config(lfw, root / "tfds")
    builder = datasets.prepare(config.data)
    test = list(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)))
    examples = {
        k: np.stack([e[k] for e in test])
        for k in ("image", "source", "target", "mask", "label", "landmarks")
    }
    examples["method_id"] = np.array(
        [input_pipeline.METHODS.index(e["method"].decode()) for e in test]
    )
    assert len(test) == 4 * TEST_PEOPLE and examples["label"].sum() == 2 * TEST_PEOPLE
    assert len(test) % BATCH, "the fixture must leave padding in the last batch"
    return config, examples


@pytest.fixture(scope="module")
def nets(data):
    _, examples = data
    return tiny_eval.eval_nets(examples["landmarks"][0])


@pytest.fixture(scope="module")
def workdir(tiny_run, tmp_path_factory):
    """A copy of the session's tiny run (same model config as `data`'s; eval writes into it)."""
    copy = tmp_path_factory.mktemp("eval_run") / "run"
    shutil.copytree(tiny_run, copy)
    return str(copy)


SCORER_CALLS = {}  # scorer -> images per call, as `clean`'s eval ran them


def _counted(name, scorer):
    """`scorer` recording how many images each call of the compiled program gives it."""

    def counted(x, *rest):
        jax.debug.callback(functools.partial(SCORER_CALLS.setdefault(name, []).append, len(x)))
        return scorer(x, *rest)

    return counted


@pytest.fixture(scope="module")
def clean(data, nets, workdir):
    config, _ = data
    counted = dataclasses.replace(
        nets,
        identity=identity.IdentityNets(
            **{name: _counted(name, getattr(nets.identity, name)) for name in identity.NAMES}
        ),
        fid_features=_counted("fid_features", nets.fid_features),
        lpips=_counted("lpips", nets.lpips),
    )
    metrics = runner.run(config.copy_and_resolve_references(), workdir=workdir, nets=counted)
    return metrics, os.path.join(workdir, "eval", "test")


def _unit(x):
    return np.asarray(x, np.float32) / 255.0


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _psnr(a, b):
    mse = np.mean((_unit(a).astype(np.float64) - _unit(b)) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):  # identical pristine pairs: inf, never selected
        return 10 * np.log10(1.0 / mse)


def _iou(pred, true):
    pred, true = np.asarray(pred, bool), np.asarray(true)[..., 0] > 127
    return np.sum(pred & true, axis=(1, 2)) / np.sum(pred | true, axis=(1, 2))


def _auc(scores, labels):
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def _groups(examples):
    """group -> (its forgeries, its accuracy population), as the issue defines them."""
    forged = examples["label"] == 1
    out = {}
    for m in sorted(set(examples["method_id"][forged])):
        own = forged & (examples["method_id"] == m)
        out[input_pipeline.METHODS[m]] = (own, own | ~forged)
    out["All"] = (forged, np.ones_like(forged))
    return out


def _check_row(cells, examples, per_sample, source=None, accuracy_similarity=None, iou=None):
    """Every group of one row against per-sample reference values over all examples."""
    for group, (forged, population) in _groups(examples).items():
        cell = cells[group]
        for key, values in per_sample.items():
            assert cell[key]["n"] == forged.sum(), (group, key)
            np.testing.assert_allclose(
                cell[key]["mean"],
                values[forged].mean(),
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{group} {key}",
            )
            np.testing.assert_allclose(
                cell[key]["std"],
                values[forged].std(),
                rtol=1e-3,
                atol=1e-6,
                err_msg=f"{group} {key}",
            )
        if accuracy_similarity is not None:
            labels = examples["label"][population]
            predicted = np.where(accuracy_similarity[population] > 0.9, 0, 1)
            assert cell["recovery_accuracy"] == pytest.approx(np.mean(predicted == labels))
            assert cell["idsim_input_facenet"]["n"] == population.sum()
        if iou is not None:
            assert cell["mask_iou"]["mean"] == pytest.approx(iou[forged].mean(), rel=1e-6)


# ----------------------------------------------------------------------------- run


def test_writes_every_field(clean, data, workdir):
    metrics, folder = clean
    config, examples = data
    on_disk = json.load(open(os.path.join(folder, "metrics.json")))
    assert on_disk == metrics
    rows = ["none", "inpaint_telea", "inpaint_ns", "dfrec"]
    assert metrics["row_order"] == rows and sorted(metrics["rows"]) == sorted(rows)
    assert metrics["row_labels"] == {
        "none": "None",
        "inpaint_telea": "Inpaint (Telea)",
        "inpaint_ns": "Inpaint (NS)",
        "dfrec": "DFREC",
    }
    forged = examples["label"] == 1
    methods = [input_pipeline.METHODS[m] for m in sorted(set(examples["method_id"][forged]))]
    assert len(methods) >= 2, "the fixture should hold several forgery methods"
    # lfw_swap holds identity morphs and splices: one column per kind before "All".
    kinds = sorted({runner.forgery_kind(m) for m in methods} - {None})
    kind_groups = [runner.KIND_GROUPS[k] for k in kinds] if len(kinds) > 1 else []
    assert metrics["groups"] == methods + kind_groups + ["All"]
    per_method = {
        m: int(np.sum(forged & (examples["method_id"] == input_pipeline.METHODS.index(m))))
        for m in methods
    }
    assert metrics["num_examples"] == {
        "total": len(forged),  # padding rows never counted
        "pristine": int(np.sum(~forged)),
        "forged": int(forged.sum()),
        "forged_per_method": per_method,
    }
    model = trained_lib.load(workdir=workdir)
    assert metrics["checkpoint"] == {
        "path": model.checkpoint_dir,
        "step": 3,
        "params_sha256": model.params_sha256,
    }
    assert metrics["config_hash"] == open(os.path.join(workdir, "config_hash.txt")).read().strip()
    assert metrics["split"] == "test" and metrics["perturb"] == ""
    assert metrics["dataset"]["name"] == "lfw_swap/res32/3.0.0"
    assert metrics["dataset"]["split_examples"] == len(forged)
    assert metrics["paper_reference"]["values"]["CelebaMegaFS FTM"]["dfrec"] == 0.7192
    assert {"jax", "tensorflow", "python"} <= set(metrics["versions"])
    assert metrics["created_utc"].endswith("+00:00")
    assert metrics["eval_config"]["batch_size"] == BATCH
    metric_keys = {key for key, _, _ in report.METRICS} | {"idsim_input_facenet"}
    for row in rows:
        for group in metrics["groups"]:
            cell = metrics["rows"][row][group]
            assert set(cell) == metric_keys
            assert (cell["auc"] is None) == (row != "dfrec")
            assert (cell["mask_iou"] is None) == (row == "none")
            assert (cell["idsim_source_facenet"] is None) == row.startswith("inpaint")
            assert isinstance(cell["fid"], float) or (cell["fid"] is None and group != "All")
    table = open(os.path.join(folder, "table.md")).read()
    assert table == report.document(metrics)
    assert f"| Method | {' | '.join(methods + kind_groups)} | All |" in table


def test_none_row_matches_direct_computation(clean, data, nets):
    """The forgery itself as the recovered target and source (the paper's first row)."""
    metrics, _ = clean
    _, ex = data
    embed = lambda x: np.asarray(nets.identity.facenet(_unit(x)))  # noqa: E731
    embed_dlib = lambda x: np.asarray(nets.identity.dlib(_unit(x)))  # noqa: E731
    poses = [pose.head_pose(nets.landmarks(ex[k]), tiny.IMAGE_SIZE) for k in ("image", "target")]
    per_sample = {
        "idsim_target_facenet": _cosine(embed(ex["image"]), embed(ex["target"])),
        "idsim_target_dlib": _cosine(embed_dlib(ex["image"]), embed_dlib(ex["target"])),
        "dlib_match_target": np.linalg.norm(
            embed_dlib(ex["image"]) - embed_dlib(ex["target"]), axis=-1
        )
        < runner.DLIB_SAME_PERSON,
        "idsim_source_facenet": _cosine(embed(ex["image"]), embed(ex["source"])),
        "psnr": _psnr(ex["image"], ex["target"]),
        "lpips": np.asarray(nets.lpips(_unit(ex["image"]), _unit(ex["target"]))),
        "pose_error": pose.angle_error(*poses),
    }
    assert per_sample["pose_error"][ex["label"] == 1].min() > 1  # the pose term is exercised
    none = metrics["rows"]["none"]
    # IDSim(input, input) = 1 > 0.9: every input is called pristine.
    _check_row(none, ex, per_sample, accuracy_similarity=np.ones(len(ex["label"])))
    assert none["All"]["recovery_accuracy"] == pytest.approx(np.mean(ex["label"] == 0))
    forged = ex["label"] == 1
    features = lambda x: np.asarray(nets.fid_features(_unit(x[forged])))  # noqa: E731
    expected = inception_fid.fid_from_features(features(ex["image"]), features(ex["target"]))
    assert none["All"]["fid"] == pytest.approx(expected, rel=1e-3)


def test_inpaint_rows_match_opencv(clean, data, nets):
    metrics, _ = clean
    _, ex = data
    regions = baselines.landmark_region(nets.landmarks(ex["image"]), tiny.IMAGE_SIZE)
    for method in ("telea", "ns"):
        filled = baselines.inpaint(ex["image"], regions, method, radius=5)
        assert not np.array_equal(filled, ex["image"])
        cells = metrics["rows"][f"inpaint_{method}"]
        _check_row(cells, ex, {"psnr": _psnr(filled, ex["target"])}, iou=_iou(regions, ex["mask"]))


def test_dfrec_row_matches_the_model(clean, data, nets, workdir):
    """Predictions in the pipeline's batch layout (8 rows, zero padding), as eval saw them
    (trained.predict runs each image alone, so the layout does not change them)."""
    metrics, _ = clean
    _, ex = data
    model = trained_lib.load(workdir=workdir)
    n = len(ex["label"])
    padded = np.zeros((2 * BATCH,) + ex["image"].shape[1:], np.uint8)
    padded[:n] = ex["image"]
    out = [jax.device_get(model.predict(padded[i : i + BATCH])) for i in (0, BATCH)]
    out = {
        k: np.concatenate([o[k] for o in out])[:n]
        for k in ("seg", "forgery_logit", "target", "source")
    }
    embed = lambda x: np.asarray(nets.identity.facenet(jnp.asarray(x, jnp.float32)))  # noqa: E731
    recovered = embed(out["target"])
    per_sample = {
        "idsim_target_facenet": _cosine(recovered, embed(_unit(ex["target"]))),
        "idsim_source_facenet": _cosine(embed(out["source"]), embed(_unit(ex["source"]))),
    }
    dfrec = metrics["rows"]["dfrec"]
    _check_row(
        dfrec,
        ex,
        per_sample,
        accuracy_similarity=_cosine(recovered, embed(_unit(ex["image"]))),
        iou=_iou(out["seg"][..., 0] > 0.5, ex["mask"]),
    )
    for group, (_, population) in _groups(ex).items():
        expected = _auc(out["forgery_logit"][population], ex["label"][population])
        assert dfrec[group]["auc"] == pytest.approx(expected), group


def test_pristine_examples_are_scored_by_facenet_alone(clean, data):
    """The split's 6 forgeries and 6 pristine examples come in two padded batches of 8, each
    mixed; they are scored apart: one batch of forgeries through every scorer, one of pristine
    examples through FaceNet alone (IDSim(input, recovered target), all they add to the
    tables). Scoring each batch read would run every scorer twice. Rows R = 4: FaceNet and
    dlib embed (R + 3) x 8 distinct faces of the forgeries, FaceNet R x 8 of the pristine."""
    _, ex = data
    assert np.sum(ex["label"] == 1) == np.sum(ex["label"] == 0) == 6
    rows = 4
    assert {name: sorted(calls) for name, calls in SCORER_CALLS.items()} == {
        "facenet": sorted([(rows + 3) * BATCH, rows * BATCH]),
        "dlib": [(rows + 3) * BATCH],
        "lpips": [rows * BATCH],
        "fid_features": [(rows + 1) * BATCH],
    }


@pytest.mark.parametrize("methods", [("telea", "ns"), ()])
def test_samples_come_back_in_split_order(data, nets, workdir, methods):
    """Batches of 3: forgeries and pristine examples fill their queues at different times, in
    several batches each with a padded rest; every per-sample value is its own example's
    (pristine ones: IDSim(input, recovered target) of every row, the rest NaN). Without
    inpainting methods the rows are None and DFREC alone."""
    config, ex = data
    config = config.copy_and_resolve_references()
    config.eval.batch_size, config.eval.inpaint_methods = 3, methods
    model = trained_lib.load(workdir=workdir)
    _, examples = runner._examples(config, "test", model.image_size)
    evaluator = runner._Evaluator(model, nets, config.eval, seed=int(config.data.seed))
    samples = evaluator.samples(examples, "")
    assert evaluator.rows == ("none", *(f"inpaint_{m}" for m in methods), "dfrec")
    np.testing.assert_array_equal(samples["label"], ex["label"])
    np.testing.assert_array_equal(samples["method_id"], ex["method_id"])
    forged = ex["label"] == 1
    np.testing.assert_array_equal(samples["fid_method_id"], ex["method_id"][forged])
    assert all(len(v) == forged.sum() for v in samples["fid"].values())

    embed = lambda x: np.asarray(nets.identity.facenet(jnp.asarray(x, jnp.float32)))  # noqa: E731
    image, target = embed(_unit(ex["image"])), embed(_unit(ex["target"]))
    predicted = jax.device_get(model.predict(ex["image"]))
    recovered = {"none": image, "dfrec": embed(predicted["target"])}
    regions = baselines.landmark_region(nets.landmarks(ex["image"]), tiny.IMAGE_SIZE)
    radius = int(config.eval.inpaint_radius)
    for m in methods:
        filled = baselines.inpaint(ex["image"], regions, m, radius)
        recovered[f"inpaint_{m}"] = embed(_unit(filled))
    for row, values in samples["rows"].items():
        np.testing.assert_allclose(
            values["idsim_input_facenet"], _cosine(recovered[row], image), atol=1e-5, err_msg=row
        )
        expected = _cosine(recovered[row], target)
        np.testing.assert_allclose(
            values["idsim_target_facenet"][forged], expected[forged], atol=1e-5, err_msg=row
        )
        for key, value in values.items():
            assert key == "idsim_input_facenet" or np.isnan(value[~forged]).all(), (row, key)


def test_max_examples_and_checkpoint_flag(data, nets, workdir, tmp_path):
    """Only the first N examples count; with --checkpoint alone the results go beside it."""
    config, ex = data
    copy = shutil.copytree(workdir, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    config = config.copy_and_resolve_references()
    config.eval.max_examples = 5
    metrics = runner.run(config, checkpoint=str(copy / "checkpoints"), nets=nets)
    assert os.path.exists(copy / "eval" / "test" / "metrics.json")
    first = {k: v[:5] for k, v in ex.items()}
    assert metrics["num_examples"]["total"] == 5
    assert metrics["num_examples"]["forged"] == int(first["label"].sum())
    embed = lambda x: np.asarray(nets.identity.facenet(_unit(x)))  # noqa: E731
    similarity = _cosine(embed(first["image"]), embed(first["target"]))
    _check_row(metrics["rows"]["none"], first, {"idsim_target_facenet": similarity})


def test_split_without_forgeries(data, nets, workdir):
    """validation holds pristine faces only: target metrics are empty (null), not an error."""
    config, _ = data
    metrics = runner.run(
        config.copy_and_resolve_references(), workdir=workdir, split="validation", nets=nets
    )
    assert metrics["groups"] == ["All"] and metrics["num_examples"]["forged"] == 0
    cell = metrics["rows"]["dfrec"]["All"]
    assert cell["idsim_target_facenet"] == {"mean": None, "std": None, "n": 0}
    assert cell["fid"] is None and cell["auc"] is None  # one class only
    assert metrics["rows"]["none"]["All"]["recovery_accuracy"] == 1.0


@pytest.fixture(scope="module")
def jpeg50(data, nets, workdir):
    config, _ = data
    return runner.run(
        config.copy_and_resolve_references(), workdir=workdir, perturb="jpeg:50", nets=nets
    )


def test_perturb_level(jpeg50, clean, workdir, capsys, data, nets):
    metrics, _ = clean
    path = os.path.join(workdir, "eval", "test_jpeg_50", "metrics.json")
    assert json.load(open(path)) == jpeg50 and jpeg50["perturb"] == "jpeg:50"
    none, none_clean = jpeg50["rows"]["none"]["All"], metrics["rows"]["none"]["All"]
    assert none["psnr"]["mean"] < none_clean["psnr"]["mean"]  # JPEG moved the inputs
    dfrec, dfrec_clean = jpeg50["rows"]["dfrec"]["All"], metrics["rows"]["dfrec"]["All"]
    assert dfrec["idsim_target_facenet"]["mean"] != dfrec_clean["idsim_target_facenet"]["mean"]
    config, _ = data
    runner.run(
        config.copy_and_resolve_references(),
        workdir=workdir,
        perturb="gaussian_noise:30",
        nets=nets,
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == os.path.join(workdir, "eval", "test_gaussian_noise_30", "metrics.json")
    assert "| Method |" in "\n".join(out)


def test_perturb_without_level_evaluates_each(jpeg50, data, nets, workdir):
    config, _ = data
    config = config.copy_and_resolve_references()
    config.eval.perturb_levels.jpeg = (90, 50)
    metrics = runner.run(config, workdir=workdir, perturb="jpeg", nets=nets)
    folder = os.path.join(workdir, "eval", "test_jpeg")
    assert json.load(open(os.path.join(folder, "metrics.json"))) == metrics
    assert metrics["perturb"] == "jpeg" and sorted(metrics["levels"]) == ["50", "90"]
    assert metrics["levels"]["50"] == jpeg50["rows"]  # the same computation as jpeg:50
    assert metrics["levels"]["90"] != jpeg50["rows"]
    table = open(os.path.join(folder, "table.md")).read()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines] == ["| jpeg", "| 50", "| 90"]
    dfrec_50 = metrics["levels"]["50"]["dfrec"]["All"]["idsim_target_facenet"]["mean"]
    assert lines[1].split(" | ")[1] == f"{dfrec_50:.4f}"


def test_errors_are_one_line(data, nets, workdir):
    config, _ = data
    with pytest.raises(
        ValueError, match="split 'nope' not in lfw_swap.*test, train, validation"
    ) as e:
        runner.run(config.copy_and_resolve_references(), workdir=workdir, split="nope", nets=nets)
    assert "\n" not in str(e.value)
    other = config.copy_and_resolve_references()
    other.model.tirm.encoder_width = 48
    with pytest.raises(ValueError, match="model.tirm.encoder_width=48 .* trained with 32") as e:
        runner.run(other, workdir=workdir, nets=nets)
    assert "\n" not in str(e.value)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dfrec_jax", "eval", *map(str, args)],
        cwd=configlib.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow  # the real FaceNet, dlib, Inception, VGG16 and face-api nets: ~2 min on 2 cores
def test_cli_with_the_real_networks(data, workdir, tmp_path):
    config, ex = data
    config_file = tmp_path / "tiny_eval.py"
    config_file.write_text(
        textwrap.dedent(f"""
            from tests import tiny, tiny_eval

            def get_config(arg=None):
                config = tiny.tiny_config()
                config.data.lfw_dir = {config.data.lfw_dir!r}
                config.data.data_dir = {config.data.data_dir!r}
                config.eval.batch_size = {BATCH}
                return config
        """)
    )
    copy = shutil.copytree(workdir, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    bad = _cli("--config", config_file, "--workdir", copy, "--split", "nope")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: split")
    done = _cli("--config", config_file, "--workdir", copy, "--config.eval.max_examples=8")
    assert done.returncode == 0, done.stderr[-3000:]
    path = done.stdout.strip().splitlines()[-1]
    assert path == str(copy / "eval" / "test" / "metrics.json")
    metrics = json.load(open(path))
    assert metrics["num_examples"]["total"] == 8
    facenet = identity.load(config.eval).facenet
    first = {k: v[:8] for k, v in ex.items()}
    similarity = _cosine(facenet(_unit(first["image"])), facenet(_unit(first["target"])))
    forged = first["label"] == 1
    none = metrics["rows"]["none"]["All"]["idsim_target_facenet"]
    assert none["n"] == forged.sum()
    assert none["mean"] == pytest.approx(similarity[forged].mean(), abs=1e-3)
    for row in metrics["row_order"]:
        cell = metrics["rows"][row]["All"]
        assert all(cell[k]["n"] == forged.sum() for k in runner.TARGET_METRICS), row


# ----------------------------------------------------------------------------- report


def _summary(mean):
    return {"mean": mean, "std": 0.0, "n": 3}


def _hand_made():
    def cell(x, auc=None):
        return {
            key: (x if key in ("fid", "recovery_accuracy") else _summary(x))
            for key, _, _ in report.METRICS
        } | {"auc": auc, "mask_iou": None}

    rows = {
        "none": {"ftm": cell(0.25), "lcr": cell(0.125), "All": cell(0.2)},
        "inpaint_telea": {"ftm": cell(0.3), "lcr": cell(0.35), "All": cell(0.32)},
        "dfrec": {"ftm": cell(0.71923), "lcr": cell(0.6), "All": cell(0.66, auc=0.9)},
    }
    return {
        "row_order": ["none", "inpaint_telea", "dfrec"],
        "row_labels": {"none": "None", "inpaint_telea": "Inpaint (Telea)", "dfrec": "DFREC"},
        "groups": ["ftm", "lcr", "All"],
        "rows": rows,
    }


def _table(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()]


def test_report_table_i():
    table = _table(report.table_i(_hand_made()))
    assert table[0] == ["Method", "ftm", "lcr", "All"] and table[1] == ["---"] * 4
    assert table[2:] == [
        ["None", "0.2500", "0.1250", "0.2000"],
        ["Inpaint (Telea)", "0.3000", "0.3500", "0.3200"],
        ["DFREC", "0.7192", "0.6000", "0.6600"],
    ]


def test_report_full_table():
    table = _table(report.full_table(_hand_made()))
    assert table[0] == ["Method"] + [header for _, header, _ in report.METRICS]
    assert [row[0] for row in table[2:]] == ["None", "Inpaint (Telea)", "DFREC"]
    dfrec = dict(zip(table[0], table[4]))
    assert dfrec["AUC ↑"] == "0.9000" and dfrec["Mask IoU ↑"] == report.DASH
    assert dfrec["PSNR dB ↑"] == "0.66" and dfrec["FID ↓"] == "0.66"
    assert dict(zip(table[0], table[2]))["AUC ↑"] == report.DASH


def test_report_robustness_table():
    one = _hand_made()
    levels = {"10": one["rows"], "50": one["rows"], "9.5": one["rows"]}
    metrics = dict(one, perturb="gaussian_noise", levels=levels)
    table = _table(report.robustness_table(metrics))
    assert table[0] == ["gaussian_noise"] + [header for _, _, header, _ in report.ROBUSTNESS]
    assert [row[0] for row in table[2:]] == ["9.5", "10", "50"]  # numeric order
    assert table[2][1:3] == ["0.6600", "0.2000"]  # DFREC then None target IDSim, group All


def test_forgery_kinds_get_their_own_columns():
    # lfw_swap mixes identity morphs (target identity kept) and splices (none kept): eval adds
    # one column per kind, over exactly that kind's forgeries (+ every pristine example for
    # accuracy/AUC), between the per-method columns and "All".
    assert runner.forgery_kind("morph_blend") == "morph"
    assert runner.forgery_kind("hull_poisson") == runner.forgery_kind("blended") == "splice"
    assert runner.forgery_kind("ftm") is None and runner.forgery_kind("pristine") is None
    ids = {m: input_pipeline.METHODS.index(m) for m in ("pristine", "morph_blend", "hull_blend",
                                                        "template_blend")}  # fmt: skip
    method_id = np.array([ids["morph_blend"], ids["hull_blend"], ids["pristine"],
                          ids["template_blend"], ids["morph_blend"], ids["pristine"]])  # fmt: skip
    label = np.array([1, 1, 0, 1, 1, 0])
    forged_ids = method_id[label == 1]
    groups = runner._groups(
        {"method_id": method_id, "label": label, "fid_method_id": forged_ids}
    )
    assert list(groups)[-3:] == ["Morphs (all)", "Splices (all)", "All"]
    forged, population, fid_rows = groups["Morphs (all)"]
    np.testing.assert_array_equal(forged, [1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(population, [1, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(fid_rows, [1, 0, 0, 1])
    np.testing.assert_array_equal(groups["Splices (all)"][0], [0, 1, 0, 1, 0, 0])
    # One kind only (e.g. a dataset of learned swappers, or splices alone): no kind columns.
    only = runner._groups({"method_id": method_id[1:4], "label": label[1:4],
                           "fid_method_id": method_id[[1, 3]]})  # fmt: skip
    assert not any(g.endswith("(all)") for g in only)
