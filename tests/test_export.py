"""`export`: the serialized model, reloaded in a fresh process without the training code,
computes what the live model computes; its files are checked; its weights are an argument."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dfrec_jax import export, exported, inference, trained
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ("flax", "optax", "orbax", "tensorflow", "dfrec_jax.models", "dfrec_jax.train")
SIZE = tiny.IMAGE_SIZE


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run):
    """A tiny run, its export (default platforms) and fixed test images on disk."""
    root = tmp_path_factory.mktemp("export")
    workdir = tiny_run
    out = str(root / "exported")
    summary = export.run(out, workdir=workdir)
    rng = np.random.default_rng(0)
    images = {
        "float1": rng.uniform(size=(1, SIZE, SIZE, 3)).astype(np.float32),
        "float3": rng.uniform(size=(3, SIZE, SIZE, 3)).astype(np.float32),
        "uint8_3": rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8),
    }
    for name, value in images.items():
        np.save(root / f"{name}.npy", value)
    return {"root": root, "workdir": workdir, "out": out, "summary": summary, "images": images}


@pytest.fixture(scope="module")
def live(run):
    return trained.load(workdir=run["workdir"])


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_fresh_process_matches_live_model_without_training_code(run, live):
    root = run["root"]
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from dfrec_jax import exported

        model = exported.load({run["out"]!r})
        for name in {sorted(run["images"])!r}:
            outputs = model(np.load({str(root)!r} + f"/{{name}}.npy"))
            np.savez({str(root)!r} + f"/out_{{name}}.npz",
                     **{{k: np.asarray(v) for k, v in outputs.items()}})
        print(json.dumps(sorted(m for m in sys.modules
                                if m.split(".")[0] in ("flax", "optax", "orbax", "tensorflow")
                                or m.startswith("dfrec_jax"))))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert imported == ["dfrec_jax", "dfrec_jax.exported"]
    assert not [m for m in imported if m.startswith(FORBIDDEN)]

    for name, images in run["images"].items():
        expected = jax.device_get(live.predict(images))
        got = dict(np.load(root / f"out_{name}.npz"))
        assert sorted(got) == sorted(inference.OUTPUT_KEYS)
        assert got["seg"].shape == (len(images), SIZE, SIZE, 1)
        np.testing.assert_array_equal(got["mask"], expected["mask"])
        for key in ("seg", "forgery_logit", "source", "target"):
            assert got[key].dtype == np.float32
            np.testing.assert_allclose(got[key], expected[key], atol=1e-5, err_msg=key)


def test_manifest_files_and_contract(run, live):
    out = run["out"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    for name in ("model.stablehlo", "variables.npz"):
        assert manifest["sha256"][name] == _sha256(os.path.join(out, name))
    assert manifest["checkpoint"]["step"] == 3 == run["summary"]["step"]
    assert manifest["checkpoint"]["params_sha256"] == live.params_sha256
    config_hash = open(os.path.join(run["workdir"], "config_hash.txt")).read().strip()
    assert manifest["config_hash"] == config_hash
    assert manifest["platforms"] == ["cpu", "cuda"]
    assert manifest["inputs"]["images"] == {
        "shape": ["b", SIZE, SIZE, 3],
        "dtype": "float32",
        "range": [0.0, 1.0],
        "layout": "RGB, aligned face crops (NHWC)",
    }
    patches = (SIZE // live.config.model.patch_size) ** 2
    assert manifest["outputs"] == {
        "seg": {"shape": ["b", SIZE, SIZE, 1], "dtype": "float32"},
        "forgery_logit": {"shape": ["b"], "dtype": "float32"},
        "source": {"shape": ["b", SIZE, SIZE, 3], "dtype": "float32"},
        "target": {"shape": ["b", SIZE, SIZE, 3], "dtype": "float32"},
        "mask": {"shape": ["b", patches], "dtype": "bool"},
    }
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(
        open(os.path.join(run["workdir"], "config.json"))
    )
    # The npz holds exactly the checkpoint's arrays under the manifest's keys, in leaf order.
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(live.variables))[0]
    keys = manifest["inputs"]["variables"]["keys"]
    with np.load(os.path.join(out, "variables.npz")) as npz:
        assert sorted(npz.files) == sorted(keys)
        for key, (path, leaf) in zip(keys, flat, strict=True):
            assert key == "/".join(entry.key for entry in path)
            np.testing.assert_array_equal(npz[key], leaf)
    readme = open(os.path.join(out, "README.md")).read()
    assert f"[b, {SIZE}, {SIZE}, 3]" in readme and "Deterministic" in readme


def test_serialized_program_has_both_platforms_and_symbolic_batch(run):
    with open(os.path.join(run["out"], "model.stablehlo"), "rb") as f:
        program = jax.export.deserialize(bytearray(f.read()))
    assert program.platforms == ("cpu", "cuda")
    batch = program.in_avals[-1].shape[0]
    assert jax.export.is_symbolic_dim(batch) and str(batch) == "b"
    assert program.in_avals[-1].shape[1:] == (SIZE, SIZE, 3)


def test_weights_are_an_argument_not_constants(run, live):
    """Other weights of the same shapes change the exported outputs exactly as they change the
    live model's (nothing of the checkpoint is folded into the program). Their segmentation
    map is ~0 everywhere, so every patch's masking weight is noise drawn with the masking key:
    the masks agree only if the program uses the live model's key (config.seed)."""
    model = exported.load(run["out"])
    other = jax.tree.map(lambda x: x * 1.5, live.variables)
    head = other["params"]["ism"]["decoder"]["segmentation_head"]
    head["kernel"] = np.zeros(head["kernel"].shape, np.float32)
    head["bias"] = np.full(head["bias"].shape, -20.0, np.float32)
    images = run["images"]["float3"]
    got = jax.device_get(model(images, variables=other))
    expected = jax.device_get(dataclasses.replace(live, variables=other).predict(images))
    baseline = jax.device_get(live.predict(images))
    assert not np.allclose(expected["source"], baseline["source"], atol=1e-3)
    assert float(np.max(expected["seg"])) < 1e-3
    np.testing.assert_array_equal(got["mask"], expected["mask"])
    np.testing.assert_allclose(got["source"], expected["source"], atol=1e-5)
    np.testing.assert_allclose(got["forgery_logit"], expected["forgery_logit"], atol=1e-5)


def test_tampered_or_missing_files_give_one_line_errors(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy)
    with np.load(copy / "variables.npz") as npz:
        arrays = dict(npz)
    key = sorted(arrays)[0]
    arrays[key] = arrays[key] + 1.0
    np.savez(copy / "variables.npz", **arrays)
    with pytest.raises(ValueError, match="variables.npz does not match its sha256") as error:
        exported.load(copy)
    assert "\n" not in str(error.value)
    os.remove(copy / "model.stablehlo")
    with pytest.raises(FileNotFoundError, match="model.stablehlo is missing"):
        exported.load(copy)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        exported.load(tmp_path)
    with pytest.raises(ValueError, match=rf"images must be \[b,{SIZE},{SIZE},3\]"):
        exported.load(run["out"])(np.zeros((2, SIZE + 1, SIZE + 1, 3), np.float32))


def test_cli_export_one_platform(run, tmp_path):
    out = tmp_path / "cpu_only"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "dfrec_jax", "export", "--workdir", run["workdir"],
               "--output", str(out), "--platforms", "cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert json.load(open(out / "manifest.json"))["platforms"] == ["cpu"]
    # Same checkpoint, same weights file byte for byte.
    assert _sha256(out / "variables.npz") == _sha256(os.path.join(run["out"], "variables.npz"))


def test_unknown_platform_is_one_line():
    with pytest.raises(ValueError, match=r"unknown platform\(s\) \['gpu'\].*cuda"):
        export.export_model(None, ("cpu", "gpu"))
