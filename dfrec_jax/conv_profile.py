"""Every convolution of a program, timed alone: which of them run below the device's rate.

`bench --what conv_profile --config C` walks the jaxpr of the config's train step (forward,
input and kernel gradients, the frozen loss networks included), groups its convolutions by
shapes and parameters, compiles and times each group's convolution alone on random inputs,
and reports them slowest first with their GFLOP/s. The step profile (step_profile.py) says
which part of the step is slow; this says which convolutions inside it are, so a fix can be
aimed (its slowest entries led to the padded unpadded convolutions of layers.py).
Limits: a convolution timed alone is not fused with its neighbours, so the sum estimates the
convolutions' share, not a partition of the step; counts are appearances in the program (a
loop body's convolution once, both branches of a cond); shapes are the program's global
ones, each timed on one device.
"""

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax.timing import significant, time_call


def _sub_jaxprs(params: dict) -> Iterator:
    """The jaxprs an equation carries in its parameters (jit, cond branches, scan, custom
    derivatives, remat), closed or open."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def find_convolutions(jaxpr) -> dict[tuple, dict]:
    """{key: {"lhs", "rhs" (ShapeDtypeStructs), "params", "count"}} over `jaxpr` and every
    jaxpr nested in it; one key per distinct (shapes, dtypes, parameters). `count` is how often
    a convolution appears in the program: one inside a loop body (scan, while) counts once."""
    found: dict[tuple, dict] = {}

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
                key = (
                    (lhs.shape, str(lhs.dtype)),
                    (rhs.shape, str(rhs.dtype)),
                    tuple(sorted((k, str(v)) for k, v in eqn.params.items())),
                )
                entry = found.setdefault(
                    key, {"lhs": lhs, "rhs": rhs, "params": dict(eqn.params), "count": 0}
                )
                entry["count"] += 1
            for sub in _sub_jaxprs(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "consts") else jaxpr)
    return found


def conv_flops(lhs, rhs, out_shape, params) -> float:
    """Multiply-adds x 2 of one convolution: every output element sums over the kernel's
    window and its input features (per group: the kernel's in-feature dimension). With input
    dilation (the input gradient of a strided conv) only ~1 in prod(lhs_dilation) taps meets
    an input element, the rest the inserted zeros: counted as that fraction."""
    spec = params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
    window = np.prod([rhs.shape[d] for d in spec[2:]]) / np.prod(params["lhs_dilation"])
    return 2.0 * float(np.prod(out_shape)) * float(window) * rhs.shape[spec[1]]


def time_convolutions(found: dict, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Each distinct convolution compiled and timed alone (best of `repeats` calls) on random
    inputs; records sorted by time x count, slowest first."""
    rng = np.random.default_rng(seed)
    records = []
    for entry in found.values():
        lhs, rhs, params = entry["lhs"], entry["rhs"], entry["params"]
        conv = jax.jit(lambda a, b, p=params: jax.lax.conv_general_dilated_p.bind(a, b, **p))
        args = [jnp.asarray(rng.standard_normal(s.shape), s.dtype) for s in (lhs, rhs)]
        out = jax.eval_shape(conv, *args)
        seconds = min(time_call(conv, *args, repeats=repeats))
        flops = conv_flops(lhs, rhs, out.shape, params)
        records.append(
            {
                "lhs": list(lhs.shape),
                "rhs": list(rhs.shape),
                "out": list(out.shape),
                "dtype": str(lhs.dtype),
                "strides": list(params["window_strides"]),
                "padding": [list(p) for p in params["padding"]],
                "lhs_dilation": list(params["lhs_dilation"]),
                "rhs_dilation": list(params["rhs_dilation"]),
                "groups": [params["feature_group_count"], params["batch_group_count"]],
                "count": entry["count"],
                "ms": significant(seconds * 1e3),
                "total_ms": significant(seconds * 1e3 * entry["count"]),
                "gflop_per_s": significant(flops / seconds / 1e9),
            }
        )
    records.sort(key=lambda r: -r["total_ms"])
    return records


def profile(fn, *args, repeats: int = 3, top: int = 0) -> list[dict]:
    """The convolutions of `fn(*args)` (any jax-traceable function: a jitted train step, a
    gradient), timed alone, slowest first; `top` > 0 keeps that many, then a summary record."""
    found = find_convolutions(jax.make_jaxpr(fn)(*args))
    records = time_convolutions(found, repeats)
    summary = {
        "distinct": len(records),
        "convolutions": sum(r["count"] for r in records),
        "total_ms": significant(sum(r["total_ms"] for r in records)),
    }
    return (records[:top] if top > 0 else records) + [summary]
