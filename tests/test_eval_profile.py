"""`bench --what eval_profile` (dfrec_jax/eval_profile.py) on tiny scoring networks: every part
of an eval batch timed, with the face counts eval's metrics function scores."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from dfrec_jax import bench, losses, timing
from tests import tiny, tiny_eval

PARTS = ("facenet", "dlib", "lpips", "fid", "pixels", "metrics", "landmarks", "inpaint")


def _template() -> np.ndarray:
    """68 points on an ellipse inside a tiny face: a plausible landmark layout."""
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    centre = (tiny.IMAGE_SIZE - 1) / 2
    return np.stack([centre + 9 * np.cos(angles), centre + 12 * np.sin(angles)], -1)


def _flops(fn, n: int, *extra) -> float:
    """XLA's FLOPs of one scorer alone on n faces, its weights arguments (as eval passes them)."""
    arrays, layout = losses.split_frozen(fn)
    faces = jax.numpy.zeros((n, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, 3))
    alone = jax.jit(lambda arrays, *x: layout(arrays)(*x))
    return timing.flops_of(alone.lower(arrays, faces, *extra).compile())


@pytest.mark.parametrize("mask", ["landmarks", "fixed"])
def test_every_part_timed_on_eval_face_counts(capsys, mask):
    config = tiny.tiny_config()
    config.eval.inpaint_mask = mask
    rows, b = 2 + len(config.eval.inpaint_methods), 2
    calls = []
    nets = tiny_eval.eval_nets(_template())
    detect = nets.landmarks

    def counted(images):
        calls.append(len(images))
        return detect(images)

    nets = dataclasses.replace(nets, landmarks=counted)
    bench.run("eval_profile", config, batch_sizes=[b], repeats=2, nets=nets)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    *parts, summary = records
    assert [p["part"] for p in parts] == list(PARTS)
    for p in parts:
        assert p["what"] == "eval_profile" and (p["batch"], p["rows"]) == (b, rows)
        assert p["ms"] > 0
    by_part = {p["part"]: p for p in parts}
    for name in ("facenet", "dlib", "lpips", "fid", "metrics"):
        assert by_part[name]["gflop"] > 0 and by_part[name]["compile_s"] >= 0

    # The face counts of eval's metrics function, checked against each net alone.
    size = tiny.IMAGE_SIZE
    expected = {
        "facenet": _flops(nets.identity.facenet, (rows + 3) * b),
        "dlib": _flops(nets.identity.dlib, (rows + 3) * b),
        "fid": _flops(nets.fid_features, (rows + 1) * b),
        "lpips": _flops(nets.lpips, rows * b, jax.numpy.zeros((b, size, size, 3))),
    }
    for name, flops in expected.items():
        np.testing.assert_allclose(by_part[name]["gflop"], flops / 1e9, rtol=1e-3, err_msg=name)
    # The whole function holds every part's arithmetic (and a little more: cosines, SSIM).
    parts_flops = sum(by_part[n]["gflop"] for n in ("facenet", "dlib", "lpips", "fid", "pixels"))
    assert by_part["metrics"]["gflop"] >= 0.99 * parts_flops

    # Landmarks: an untimed call, then `repeats` timed ones, each on the batch's two calls'
    # images; the landmark region needs one more call on the inputs.
    timed = [n for n in calls if n == (rows + 1) * b]
    assert len(timed) == 3
    assert calls.count(b) == (1 if mask == "landmarks" else 0)

    batch_ms = sum(by_part[n]["ms"] for n in ("metrics", "landmarks", "inpaint"))
    np.testing.assert_allclose(summary["batch_ms"], batch_ms, rtol=1e-3)
    np.testing.assert_allclose(summary["img_per_s"], b / (batch_ms / 1e3), rtol=1e-3)
    assert summary["slowest_part"] in PARTS[:5] and summary["peak_matmul_tflops"] > 0
    shares = [by_part[n]["share_of_batch"] for n in ("metrics", "landmarks", "inpaint")]
    np.testing.assert_allclose(sum(shares), 1.0, atol=0.01)
