"""Reading user-supplied PyTorch weights and filling Flax variable trees from them.

Formats: safetensors (no code execution at all) and PyTorch checkpoints (torch.save, zip or
legacy pre-1.6 format), read by `torch_zip` with a restricted unpickler. Converters describe
each target leaf by a `Rule` (Flax path <- PyTorch key, with a transform); `fill` applies the
rules, refuses shape mismatches and reports missing and unexpected keys.
"""

import dataclasses
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dfrec_jax.pretrained import torch_zip


class ConversionError(ValueError):
    """A checkpoint that does not fit the model: one line naming the key and the shapes."""


def read_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
    """Flat {name: array} from a .safetensors file or a PyTorch zip checkpoint.

    `key` selects a nested dict (e.g. "state_dict", "model"); a leading "module." (from
    DataParallel) is stripped from every name.
    """
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # local import: only converters need it

        state = load_file(path)
    else:
        state = torch_zip.load(path)
    if key is not None:
        if not isinstance(state, Mapping) or key not in state:
            raise ConversionError(f"{path}: no {key!r} entry in the checkpoint")
        state = state[key]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    flat = {}
    for name, value in state.items():
        if isinstance(value, (np.ndarray, np.generic)):  # 0-d tensors come back as scalars
            flat[name.removeprefix("module.")] = np.asarray(value)
    return flat


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv OIHW (depthwise: C,1,H,W) -> Flax HWIO (depthwise: H,W,1,C)."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear (out, in) -> Flax (in, out)."""
    return np.transpose(w)


def identity(w: np.ndarray) -> np.ndarray:
    return w


def cast_floating(tree, dtype):
    """`tree` with its floating arrays as `dtype` jax arrays (other leaves as they were): frozen
    weights cast once when a network is built, not converted again in every step."""

    def cast(x):
        is_float = isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)
        return jnp.asarray(x, dtype) if is_float else x

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Flax leaf `target` ("collection/a/b/kernel") takes `transform(state[source])`."""

    target: str
    source: str
    transform: Callable[[np.ndarray], np.ndarray] = identity


@dataclasses.dataclass
class Report:
    missing: list[str]  # Flax leaves no rule filled (they keep their initial values)
    unexpected: list[str]  # checkpoint keys no rule used

    def summary(self) -> str:
        return f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"


def fill(
    variables: Mapping,
    state: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    ignore_unexpected: Iterable[str] = (),
) -> tuple[dict, Report]:
    """Returns a copy of `variables` with every ruled leaf replaced, and a Report.

    Raises ConversionError when a rule's source key is absent or its converted shape differs
    from the Flax leaf's. Keys starting with a prefix in `ignore_unexpected` (e.g. a
    classifier the feature extractor does not have) are not reported as unexpected.
    """
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(variables).items()}
    used, filled = set(), set()
    for rule in rules:
        if rule.target not in flat:
            raise ConversionError(f"converter bug: no Flax leaf {rule.target}")
        if rule.source not in state:
            raise ConversionError(f"checkpoint has no {rule.source} (for {rule.target})")
        value = np.asarray(rule.transform(state[rule.source]))
        want = tuple(flat[rule.target].shape)
        if value.shape != want:
            raise ConversionError(
                f"shape mismatch: {rule.source} {tuple(state[rule.source].shape)} -> "
                f"{value.shape}, but {rule.target} is {want}"
            )
        flat[rule.target] = value.astype(np.asarray(flat[rule.target]).dtype)
        used.add(rule.source)
        filled.add(rule.target)
    ignore = tuple(ignore_unexpected)
    report = Report(
        missing=sorted(set(flat) - filled),
        unexpected=sorted(k for k in state if k not in used and not k.startswith(ignore)),
    )
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return tree, report
