"""JAX's persistent compilation cache, on for every `python -m dfrec_jax` command.

A process that compiles a program XLA has compiled before with the same flags reads the
executable back from disk: a run resumed after preemption, a second `eval` or `bench`, sweep
points of equal shapes. The demo train step on 2 Xeon cores: 69 s cold, 18 s warm (tracing
and lowering in Python remain; README, Training).

Where: $DFREC_COMPILATION_CACHE (a local folder or a gs:// URL), else
$XDG_CACHE_HOME/dfrec_jax/xla (~/.cache/dfrec_jax/xla). One folder can serve several kinds of
machine: JAX's cache key holds the device topology's fingerprint, which on CPU covers the
instruction set XLA compiles for (it changes with --xla_cpu_max_isa, measured). No size cap:
JAX's capped (LRU) cache in jax 0.10.2 stops writing for good once a killed process leaves an
entry without its access-time file (jax-ml/jax#39880); entries are a few MB each (the demo
step 3.7 MB), and deleting the folder is always safe. DFREC_COMPILATION_CACHE=off turns it
off; a folder JAX already has (JAX_COMPILATION_CACHE_DIR, the tests' session cache) is kept.
"""

from __future__ import annotations

import os
import sys

import jax

from dfrec_jax import paths

ENV = "DFREC_COMPILATION_CACHE"
OFF = ("off", "0", "false", "none")

_hits = [0]


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _hits[0] += 1


jax.monitoring.register_event_listener(_count_hit)


def hits() -> int:
    """Programs this process has read from the persistent cache so far."""
    return _hits[0]


def directory(environ=os.environ) -> str | None:
    """The cache folder the environment asks for (None: off)."""
    value = environ.get(ENV, "").strip()
    if value.lower() in OFF and value:
        return None
    if value:
        return paths.resolve(value)
    home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "dfrec_jax", "xla")


def enable(environ=os.environ) -> str | None:
    """Turns the cache on before the first compile; returns its folder (None: off). A local
    folder that cannot be made or written is one warning line on stderr, and the command runs
    without a cache."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = directory(environ)
    if path is None:
        return None
    if not paths.is_remote(path):
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(f"{path} is not writable")
        except OSError as e:
            print(f"warning: no compilation cache ({ENV}): {e}", file=sys.stderr)
            return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path
