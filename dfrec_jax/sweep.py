"""Config sweeps: one `train` run per point of a grid of `--config.*` overrides.

A sweep file (configs/sweeps/*.py) defines `get_sweep(arg=None) -> list[dict]`: one dict per
run, mapping a dotted config path ("model.mask_ratio") to its value. Values that follow from
others are derived by the code that uses them (e.g. the SIRM's identity rows from the mask
ratio, when the model is built), never computed in a sweep file.

Launch (from the repository root; `--dry_run` only prints the commands):

    python -m dfrec_jax sweep --config configs/demo.py \
        --sweep configs/sweeps/mask_ratio_and_weights.py --workdir runs/sweep [--dry_run]

Every point is checked first (each path exists, each value has the field's type, each point's
model builds), then the points train one after another, each as

    python -m dfrec_jax train --config configs/demo.py --workdir runs/sweep/<name> \
        --config.a.b=v ...

with `<name>` made of the overrides that vary over the sweep (`mask_ratio=0.25,identity=0.5`;
an override that only varies in step with one before it is left out). Extra
`--config.*` flags given to `sweep` go to every run, before the point's own. `train` resumes,
so re-running the same sweep continues unfinished points and re-checks finished ones. To spread
the points over machines, run the printed commands (`--dry_run`) wherever you like.
"""

import copy
import difflib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import ml_collections

from dfrec_jax import inference

Point = dict[str, Any]


def config_key_error(config, path: str) -> str | None:
    """Why the dotted `path` is not a field of `config` (one line), or None when it is."""
    node, seen = config, []
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
            kind = type(node).__name__
            return f"config key {'.'.join(seen)!r} holds a {kind}, not a group: no field {part!r}"
        keys = list(node.keys())
        if part not in keys:
            where = f"config.{'.'.join(seen)}" if seen else "config"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return (
                f"unknown config key {'.'.join([*seen, part])!r}: {where} has no {part!r} "
                f"(it has {', '.join(sorted(keys))}){hint}"
            )
        node, seen = node[part], [*seen, part]
    return None


def apply_overrides(config, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A locked copy of `config` with `overrides` (dotted path -> value) applied in order.

    ValueError (one line, naming the key) for an unknown path or a value of the wrong type.
    """
    config = copy.deepcopy(config)
    config.lock()  # a typo must not add a new field
    for path, value in overrides.items():
        _set(config, path, value)
    return config


def _set(config, path: str, value: Any) -> None:
    error = config_key_error(config, path)
    if error:
        raise ValueError(error)
    *parents, leaf = path.split(".")
    holder = config
    for part in parents:
        holder = holder[part]
    if isinstance(holder[leaf], ml_collections.ConfigDict):
        raise ValueError(f"config key {path!r} is a group; override its fields one by one")
    try:
        holder[leaf] = value
    except TypeError as e:  # ConfigDict's type safety: say which key and what it holds
        current = type(holder[leaf]).__name__
        raise ValueError(f"config key {path!r} holds a {current}, got {value!r}") from e


def _load_module(path: str, what: str, name: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config()` of "path/to/config.py[:arg]", as `--config` reads it (not locked)."""
    path, sep, arg = spec.partition(":")
    module = _load_module(path, "config", "dfrec_config_file")
    return module.get_config(arg) if sep else module.get_config()


def load_sweep(spec: str) -> list[Point]:
    """Points of a sweep file: `spec` is "path/to/sweep.py" or "path/to/sweep.py:arg"."""
    path, _, arg = spec.partition(":")
    module = _load_module(path, "sweep", "dfrec_sweep_file")
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"sweep file {path!r} defines no get_sweep(arg=None)")
    points = module.get_sweep(arg or None)
    if not points or not all(isinstance(p, Mapping) for p in points):
        raise ValueError(f"{path}: get_sweep() must return a non-empty list of dicts")
    return [dict(p) for p in points]


def _value_text(value: Any) -> str:
    """A value as the absl / ml_collections flag parsers read it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value)


def format_override(path: str, value: Any) -> str:
    return f"--config.{path}={_value_text(value)}"


def _short_keys(paths: Sequence[str]) -> dict[str, str]:
    """Each dotted path by its shortest suffix that no other path in `paths` ends with."""
    short = {}
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != path and (o == suffix or o.endswith("." + suffix)) for o in paths):
                break
        short[path] = suffix
    return short


def point_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Folder names from the overrides that vary; later keys that only follow earlier ones (the
    names stay unique without them) are left out."""
    texts = [{k: _value_text(v) for k, v in p.items()} for p in points]
    keys = list(dict.fromkeys(k for p in texts for k in p))
    varying = [k for k in keys if len({p.get(k) for p in texts}) > 1]

    def names(used):
        short = _short_keys(used)
        return [",".join(f"{short[k]}={p[k]}" for k in used if k in p) or "base" for p in texts]

    for key in reversed(list(varying)):
        fewer = [k for k in varying if k != key]
        if len(set(names(fewer))) == len(points):
            varying = fewer
    result = [re.sub(r"[^\w.,=+-]", "_", name) for name in names(varying)]
    if len(set(result)) != len(result):
        raise ValueError(f"sweep points are not all different: {result}")
    return result


def train_commands(
    config_arg: str,
    points: Sequence[Mapping[str, Any]],
    workdir: str,
    base_overrides: Mapping[str, Any] | None = None,
    python: str = sys.executable,
) -> list[tuple[str, list[str]]]:
    """(name, argv) of one `python -m dfrec_jax train` per point."""
    commands = []
    for name, point in zip(point_names(points), points):
        overrides = {**(base_overrides or {}), **point}
        argv = [python, "-m", "dfrec_jax", "train", f"--config={config_arg}"]
        argv.append(f"--workdir={os.path.join(workdir, name)}")
        argv += [format_override(k, v) for k, v in overrides.items()]
        commands.append((name, argv))
    return commands


def check_models(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Builds every distinct model (shapes only, nothing computed); ValueError names the bad
    point (e.g. a mask ratio whose visible-patch count the identity tokens do not match)."""
    seen = set()
    for i, config in enumerate(configs):
        key = config.model.to_json()
        if key in seen:
            continue
        seen.add(key)
        try:
            inference.abstract_variables(inference.build_model(config))
        except ValueError as e:
            raise ValueError(f"sweep point {i}: {e}") from None


def run(
    config_arg: str,
    config,
    sweep_spec: str,
    workdir: str,
    *,
    base_overrides: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
    runner: Callable[[list[str]], int] = lambda argv: subprocess.call(argv),
) -> int:
    """Checks every point, then prints (dry run) or runs each point's train command in turn.

    `config` is the base config as given (with `base_overrides` applied). Returns the number
    of failed runs (0 on a dry run); a failed run does not stop the ones after it.
    """
    points = load_sweep(sweep_spec)
    check_models([apply_overrides(config, p) for p in points])
    commands = train_commands(config_arg, points, workdir, base_overrides)
    failed = []
    for i, (name, argv) in enumerate(commands):
        print(shlex.join(argv), file=out, flush=True)
        if dry_run:
            continue
        print(f"# sweep point {i + 1}/{len(commands)}: {name}", file=out, flush=True)
        rc = runner(argv)
        if rc:
            failed.append(name)
            print(f"# sweep point {name} failed (exit {rc})", file=out, flush=True)
    if not dry_run:
        summary = {"sweep": sweep_spec, "points": len(commands), "failed": failed}
        print(json.dumps(summary), file=out, flush=True)
    return len(failed)
