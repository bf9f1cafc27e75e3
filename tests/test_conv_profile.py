"""`bench --what conv_profile` (dfrec_jax/conv_profile.py): the convolutions of a program,
found in nested jaxprs, counted, their FLOPs, timed alone and ranked."""

import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax import bench, conv_profile
from tests import tiny

DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, padding="SAME"):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DIMS)


def _two_layers(x, w1, w2):
    inner = jax.jit(lambda y: _conv(y, w2))  # a nested jit: its jaxpr is walked too
    return inner(inner(_conv(x, w1, "VALID")))


def test_finds_nested_convolutions_with_their_counts_and_gradients():
    x, w1, w2 = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((3, 3, 4, 4))
    found = conv_profile.find_convolutions(jax.make_jaxpr(_two_layers)(x, w1, w2))
    counts = sorted((e["lhs"].shape, e["rhs"].shape, e["count"]) for e in found.values())
    # The same 7x7x4 -> 4 conv twice (one key), the VALID 9x9x3 -> 4 once.
    assert counts == [((2, 7, 7, 4), (3, 3, 4, 4), 2), ((2, 9, 9, 3), (3, 3, 3, 4), 1)]

    loss = lambda x, w1, w2: jnp.sum(_two_layers(x, w1, w2) ** 2)  # noqa: E731
    grads = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w1, w2)
    found = conv_profile.find_convolutions(grads)
    # Each of the three: forward, input gradient and kernel gradient.
    assert sum(e["count"] for e in found.values()) == 3 * 3


def test_flops_count_multiply_adds_twice():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
    (entry,) = conv_profile.find_convolutions(jax.make_jaxpr(_conv)(x, w)).values()
    flops = conv_profile.conv_flops(entry["lhs"], entry["rhs"], (2, 8, 8, 5), entry["params"])
    assert flops == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)

    grouped = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=DIMS, feature_group_count=3
    )
    w = jnp.ones((3, 3, 1, 3))  # depthwise: one input feature per group
    (entry,) = conv_profile.find_convolutions(jax.make_jaxpr(grouped)(x, w)).values()
    flops = conv_profile.conv_flops(entry["lhs"], entry["rhs"], (2, 8, 8, 3), entry["params"])
    assert flops == 2 * (2 * 8 * 8 * 3) * (3 * 3 * 1)

    # The input gradient of a stride-2 conv: input-dilated by 2, a quarter of the taps real.
    w = jnp.ones((3, 3, 3, 5))
    strided = lambda x: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (2, 2), "SAME", dimension_numbers=DIMS
    )
    found = conv_profile.find_convolutions(
        jax.make_jaxpr(jax.grad(lambda x: jnp.sum(strided(x) ** 2)))(x)
    )
    (entry,) = [e for e in found.values() if e["params"]["lhs_dilation"] == (2, 2)]
    flops = conv_profile.conv_flops(entry["lhs"], entry["rhs"], (2, 8, 8, 3), entry["params"])
    assert flops == 2 * (2 * 8 * 8 * 3) * (3 * 3 * 5) / 4


def test_profile_times_each_and_ranks_slowest_first():
    x = jnp.ones((2, 32, 32, 8))
    w1, w2 = jnp.ones((3, 3, 8, 16)), jnp.ones((3, 3, 16, 16))
    *records, summary = conv_profile.profile(_two_layers, x, w1, w2, repeats=2)
    assert set(summary) == {"distinct", "convolutions", "total_ms"}
    assert (summary["distinct"], summary["convolutions"]) == (2, 3) and summary["total_ms"] > 0
    totals = [r["total_ms"] for r in records]
    assert totals == sorted(totals, reverse=True)
    for r in records:
        assert r["ms"] > 0 and r["gflop_per_s"] > 0
        np.testing.assert_allclose(r["total_ms"], r["ms"] * r["count"], rtol=1e-3)
    (twice,) = [r for r in records if r["count"] == 2]
    assert twice["lhs"] == [2, 30, 30, 16] and twice["out"] == [2, 30, 30, 16]
    *top, _ = conv_profile.profile(_two_layers, x, w1, w2, repeats=1, top=1)
    assert len(top) == 1


def test_bench_profiles_the_train_steps_convolutions():
    config = tiny.tiny_config()
    records = bench.bench_conv_profile(config, loss_nets=tiny.tiny_loss_nets(), repeats=1, top=3)
    *top, summary = records
    assert len(top) == 3 and all(r["what"] == "conv_profile" and r["batch"] == 8 for r in records)
    # The step holds the model's convolutions, their two gradients and the loss nets'.
    assert summary["convolutions"] > 50 and summary["distinct"] > 20
    assert top[0]["total_ms"] >= top[-1]["total_ms"]
