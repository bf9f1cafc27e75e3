"""`bench --what train_step`: step timing, XLA FLOPs, matmul peak and MFU on synthetic batches.

The fast tests time a small sharded stand-in step whose FLOPs are known; the real DFREC step
(tiny model, tiny loss nets) is marked slow: its compile takes minutes on 2 shared cores.
"""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfrec_jax import bench, configlib, timing
from dfrec_jax.train import sharding, standalone
from tests import tiny

M, K = 64, 128  # stand-in step: per device [1, M, K] @ [K, K]


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))


def _stand_in_step(mesh):
    rep = NamedSharding(mesh, P())

    @functools.partial(
        jax.jit,
        in_shardings=(rep, sharding.batch_sharding(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    def step(state, batch):
        y = jnp.einsum("bmk,kn->bmn", batch["image"], state["w"])
        return {"w": state["w"] * 0.5}, {"total": jnp.mean(y)}

    return step


def test_measured_step_report_is_consistent(mesh):
    devices = mesh.devices.size
    assert devices == 8
    step = _stand_in_step(mesh)
    state = {"w": jax.device_put(jnp.full((K, K), 0.01), NamedSharding(mesh, P()))}
    x = np.ones((devices, M, K), np.float32)
    batch = standalone.global_batch({"image": x}, sharding.batch_sharding(mesh))
    assert batch["image"].sharding.spec == P(("data", "fsdp"))
    state, measured = standalone.measure_step(step, state, batch, repeats=3, warmup=1)
    assert len(measured["times"]) == 3 and measured["compile_s"] > 0
    # 1 + 3 calls each halve w (the donated state is threaded through); the loss is the
    # last call's, computed with the w it received.
    np.testing.assert_allclose(np.asarray(state["w"]), 0.01 / 2**4, rtol=1e-6)
    np.testing.assert_allclose(measured["loss"], K * 0.01 / 2**3, rtol=1e-5)
    matmul = 2 * M * K * K  # one device's share; the rest is a few elementwise ops
    assert matmul <= measured["flops_per_device"] <= 1.05 * matmul

    peak = timing.peak_matmul_tflops(mesh, sizes=(64, 128), repeats=2)
    assert peak["size"] in (64, 128) and peak["tflops"] > 0
    report = bench.step_report(measured, devices, mesh, peak)
    json.dumps(report)
    assert report["device_count"] == 8 and report["device"] == "cpu"
    assert report["flops_per_step"] == 8 * measured["flops_per_device"]
    step_s = report["step_ms"] / 1e3
    assert report["step_ms"] == pytest.approx(1e3 * np.median(measured["times"]), abs=0.01)
    assert report["step_ms_min"] <= report["step_ms"]
    assert report["img_per_s"] == pytest.approx(devices / step_s, rel=0.01)
    achieved = report["flops_per_step"] / step_s / 1e12
    assert report["achieved_tflops"] == pytest.approx(achieved, rel=0.01)
    assert report["mfu"] == pytest.approx(achieved / peak["tflops"], rel=0.01)
    assert report["mfu"] > 0


def test_no_flops_reported_means_no_mfu(mesh):
    measured = {"compile_s": 1.0, "flops_per_device": None, "times": [0.1], "loss": 1.0}
    report = bench.step_report(measured, 8, mesh, {"tflops": 1.0, "size": 64})
    assert report["mfu"] is None and report["flops_per_step"] is None
    assert "no FLOPs" in report["note"]


def test_flops_of_handles_every_cost_analysis_shape():
    class Compiled:
        def __init__(self, analysis):
            self.analysis = analysis

        def cost_analysis(self):
            if isinstance(self.analysis, Exception):
                raise self.analysis
            return self.analysis

    assert timing.flops_of(Compiled({"flops": 12.0})) == 12.0
    assert timing.flops_of(Compiled([{"flops": 7.0, "bytes accessed": 3.0}])) == 7.0
    assert timing.flops_of(Compiled([])) is None
    assert timing.flops_of(Compiled(None)) is None
    assert timing.flops_of(Compiled({"flops": -1.0})) is None
    assert timing.flops_of(Compiled(NotImplementedError("no cost model"))) is None


def test_synthetic_batch_is_deterministic_and_shaped_like_the_pipeline():
    from data_pipelines import input_pipeline

    a, b = standalone.synthetic_batch(4, 32, seed=3), standalone.synthetic_batch(4, 32, seed=3)
    assert set(a) == set(input_pipeline.OUTPUT_KEYS)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], standalone.synthetic_batch(4, 32, seed=4)["image"])
    for key in ("image", "source", "target"):
        assert a[key].shape == (4, 32, 32, 3) and a[key].dtype == np.uint8
    assert a["mask"].shape == (4, 32, 32, 1) and a["mask"].dtype == np.uint8
    assert a["label"].dtype == a["has_mask"].dtype == a["alpha"].dtype == np.float32
    np.testing.assert_array_equal(a["label"], [0, 1, 0, 1])
    np.testing.assert_array_equal(a["alpha"], [0, 1, 0, 1])
    inside = a["mask"][..., 0] > 0
    assert inside[0].all() and inside[2].all()  # real faces: their own source, mask 255
    for i in (0, 2):
        np.testing.assert_array_equal(a["source"][i], a["image"][i])
        np.testing.assert_array_equal(a["target"][i], a["image"][i])
    assert 0.1 < inside[1].mean() < 0.5  # a face-sized ellipse
    np.testing.assert_array_equal(a["image"][inside], a["target"][inside])
    np.testing.assert_array_equal(a["image"][~inside], a["source"][~inside])


def test_bench_modules_do_not_need_tensorflow():
    """GPU machines have no TensorFlow: the train_step bench must import without it."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):\n"
        "            raise ImportError('no TensorFlow on this machine: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from dfrec_jax import bench, loss_nets, inference\n"
        "from dfrec_jax.train import sharding, state, step\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=configlib.REPO_ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_uneven_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="batch 6 does not split over 8 devices"):
        bench.bench_train_step(tiny.tiny_config(), batch_sizes=(6,), loss_nets=object())


@pytest.mark.slow
def test_real_train_step_on_8_devices():
    """The DFREC step itself (tiny model and loss nets), sharded over 8 devices."""
    (result,) = bench.bench_train_step(
        tiny.tiny_config(),
        batch_sizes=(8,),
        repeats=3,
        loss_nets=tiny.tiny_loss_nets(),
        warmup=1,
        matmul_sizes=(128,),
    )
    json.dumps(result)
    assert result["what"] == "train_step" and result["batch"] == 8
    assert result["image_size"] == tiny.IMAGE_SIZE and result["dtype"] == "float32"
    assert result["mesh"] == {"data": 8, "fsdp": 1} and result["device_count"] == 8
    assert result["params"] > 1000 and np.isfinite(result["loss"])
    assert result["compile_s"] > 0 and result["step_ms"] > 0
    assert result["flops_per_step"] == 8 * result["flops_per_device"] > 0
    assert 0 < result["mfu"] <= 1


@pytest.mark.slow  # ~70 s: it compiles every part of the step separately
def test_step_profile_times_every_part_of_the_step():
    from dfrec_jax import step_profile

    results = step_profile.profile_train_step(
        tiny.tiny_config(), 8, repeats=1, loss_nets=tiny.tiny_loss_nets(), matmul_sizes=(128,)
    )
    json.dumps(results)
    parts = {r["part"]: r for r in results}
    assert list(parts) == ["model", "identity", "perceptual", "attribute", "optimizer", "step",
                           "summary"]  # fmt: skip
    for name in ("model", "identity", "perceptual", "attribute", "optimizer", "step"):
        part = parts[name]
        assert part["ms"] > 0 and part["batch"] == 8, part
        assert part["share_of_step"] == pytest.approx(part["ms"] / parts["step"]["ms"], abs=2e-3)
    # The model's backward and the loss nets' gradients are real work XLA counts.
    assert parts["model"]["gflop"] > 0 and parts["identity"]["gflop"] > 0
    assert parts["step"]["share_of_step"] == 1.0
    # The whole step does at least the model's and the loss nets' FLOPs.
    assert parts["step"]["gflop"] >= parts["model"]["gflop"]
    summary = parts["summary"]
    assert summary["slowest_part"] in parts and summary["step_ms"] == parts["step"]["ms"]
    assert summary["parts_sum_ms"] == pytest.approx(
        sum(parts[n]["ms"] for n in ("model", "identity", "perceptual", "attribute", "optimizer")),
        abs=0.5,
    )
