"""Small helpers shared by the files in configs/ (big_vision's `get_config(arg)` style)."""

import ast
import os
from typing import Any

import ml_collections

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository when running from a checkout (editable install or `python -m` in it); after a
# plain `pip install .` the package sits in site-packages, and the working directory stands in.
REPO_ROOT = _CHECKOUT if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) else os.getcwd()
# Real LFW faces live beside the repository by default; DFREC_LFW_DIR overrides.
DEFAULT_LFW_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "lfw112")


# Built TFDS datasets (the prepared lfw_swap etc.) go here unless DFREC_DATA_DIR says otherwise.
DEFAULT_DATA_DIR = os.path.join(REPO_ROOT, "runs", "tfds")


def lfw_dir() -> str:
    return os.environ.get("DFREC_LFW_DIR", DEFAULT_LFW_DIR)


def data_dir() -> str:
    return os.environ.get("DFREC_DATA_DIR", DEFAULT_DATA_DIR)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses "a=1,b=x" into a ConfigDict over `defaults`; unknown keys are errors.

    Values are read as Python literals where possible (ints, floats, bools), else strings;
    each value keeps the type of its default.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config arg {item!r} is not key=value")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {', '.join(sorted(defaults))}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        default = defaults[key]
        if default is not None and not isinstance(value, type(default)):
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            else:
                raise ValueError(f"config arg {key}={value!r}: expected {type(default).__name__}")
        parsed[key] = value
    return parsed
