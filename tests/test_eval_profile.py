"""`bench --what eval_profile` (dfrec_jax/eval_profile.py) on tiny scoring networks: every part
of an eval batch timed, with the face counts eval's metrics function scores."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from dfrec_jax import bench, eval_profile, losses, timing
from dfrec_jax.eval import identity, runner
from tests import tiny, tiny_eval

PARTS = ("facenet", "dlib", "lpips", "fid", "pixels", "metrics", "pristine", "landmarks", "inpaint")


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
    bench.run("eval_profile", config, batch_sizes=[b], repeats=2, nets=nets, matmul_sizes=(128,))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    *parts, summary = records
    assert [p["part"] for p in parts] == list(PARTS)
    for p in parts:
        assert p["what"] == "eval_profile" and (p["batch"], p["rows"]) == (b, rows)
        assert p["ms"] > 0
    by_part = {p["part"]: p for p in parts}
    for name in ("facenet", "dlib", "lpips", "fid", "metrics", "pristine"):
        assert by_part[name]["gflop"] > 0 and by_part[name]["compile_s"] >= 0

    # Each part runs its net on face_counts' images (which the next test reads off eval's own
    # metrics function): its FLOPs are the net's alone on that many faces.
    size, counts = tiny.IMAGE_SIZE, eval_profile.face_counts(rows, b)
    expected = {
        "facenet": _flops(nets.identity.facenet, counts["identity"]),
        "dlib": _flops(nets.identity.dlib, counts["identity"]),
        "fid": _flops(nets.fid_features, counts["fid"]),
        "lpips": _flops(nets.lpips, counts["lpips"], jax.numpy.zeros((b, size, size, 3))),
    }
    for name, flops in expected.items():
        np.testing.assert_allclose(by_part[name]["gflop"], flops / 1e9, rtol=1e-3, err_msg=name)
    # Pristine examples: FaceNet on their rows' faces, plus the uint8 conversion and the
    # cosines (5% of this tiny net's arithmetic; (R + 3) x B faces would be 75% more).
    facenet_alone = _flops(nets.identity.facenet, counts["pristine_identity"]) / 1e9
    assert facenet_alone <= by_part["pristine"]["gflop"] <= 1.1 * facenet_alone
    # The whole function holds every part's arithmetic (and a little more: cosines, SSIM).
    parts_flops = sum(by_part[n]["gflop"] for n in ("facenet", "dlib", "lpips", "fid", "pixels"))
    assert by_part["metrics"]["gflop"] >= 0.99 * parts_flops

    # Landmarks: an untimed call, then `repeats` timed ones, each on the batch's two calls'
    # images; the landmark region needs one more call on the inputs.
    timed = [n for n in calls if n == counts["landmarks"]]
    assert len(timed) == 3
    assert calls.count(b) == (1 if mask == "landmarks" else 0)

    batch_ms = sum(by_part[n]["ms"] for n in ("metrics", "landmarks", "inpaint"))
    np.testing.assert_allclose(summary["batch_ms"], batch_ms, rtol=1e-3)
    np.testing.assert_allclose(summary["img_per_s"], b / (batch_ms / 1e3), rtol=1e-3)
    assert summary["slowest_part"] in PARTS[:5] and summary["peak_matmul_tflops"] > 0
    assert by_part["pristine"]["share_of_batch"] is None  # not part of a batch of forgeries
    shares = [by_part[n]["share_of_batch"] for n in ("metrics", "landmarks", "inpaint")]
    np.testing.assert_allclose(sum(shares), 1.0, atol=0.01)


def test_face_counts_are_what_eval_scores():
    """eval_profile.face_counts read off runner.device_metrics itself: each scorer records the
    batch it is traced with (a change to eval's scoring that the profile misses fails here)."""
    config = tiny.tiny_config()
    rows, b, size = 2 + len(config.eval.inpaint_methods), 3, tiny.IMAGE_SIZE
    nets, seen = tiny_eval.eval_nets(_template()), {}

    def recording(name, scorer):
        def record(*images):
            seen[name] = tuple(x.shape[0] for x in images)
            return scorer(*images)

        return record

    nets = dataclasses.replace(
        nets,
        identity=identity.IdentityNets(
            facenet=recording("facenet", nets.identity.facenet),
            dlib=recording("dlib", nets.identity.dlib),
        ),
        fid_features=recording("fid", nets.fid_features),
        lpips=recording("lpips", nets.lpips),
    )
    arrays, layout = runner.split_scorers(nets)
    uint8 = lambda *shape: np.zeros(shape, np.uint8)  # noqa: E731
    face = (size, size, 3)
    dfrec = {"target": np.zeros((b, *face), np.float32), "source": np.zeros((b, *face), np.float32)}
    metrics_fn = functools.partial(runner.device_metrics, layout=layout)
    jax.make_jaxpr(metrics_fn)(
        arrays, uint8(b, *face), uint8(b, *face), uint8(b, *face), uint8(rows - 1, b, *face), dfrec
    )
    counts = eval_profile.face_counts(rows, b)
    assert seen == {
        "facenet": (counts["identity"],),
        "dlib": (counts["identity"],),
        "fid": (counts["fid"],),
        "lpips": (counts["lpips"], b),
    }
    seen.clear()
    similarity_fn = functools.partial(runner.input_similarity, layout=layout)
    jax.make_jaxpr(similarity_fn)(arrays, uint8(rows - 1, b, *face), dfrec["target"])
    assert seen == {"facenet": (counts["pristine_identity"],)}
