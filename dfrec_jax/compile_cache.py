"""JAX's persistent compilation cache, on for every `python -m dfrec_jax` command.

A process that compiles a program XLA has compiled before with the same flags reads the
executable back from disk: a run resumed after preemption, a second `eval` or `bench`, sweep
points of equal shapes. The demo train step on 2 Xeon cores: 74 s cold, 20 s warm (tracing
and lowering in Python remain; README, Training).

Where: $DFREC_COMPILATION_CACHE, else $XDG_CACHE_HOME/dfrec_jax/xla (~/.cache/dfrec_jax/xla),
in a subfolder per machine signature. JAX's cache key names the backend ("cpu") but not the
CPU, and XLA:CPU compiles for the host's instruction set, so an entry written on one CPU type
must not be read on another (a home folder shared by a cluster's nodes): the signature hashes
the architecture, the CPU model and feature flags and the jaxlib version. Entries beyond
MAX_BYTES are dropped least recently used first (JAX's LRU cache, which locks with filelock).
DFREC_COMPILATION_CACHE=off turns it off; a folder JAX already has (JAX_COMPILATION_CACHE_DIR,
the tests' per-session cache) is used as it is.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys

import jax
import jaxlib

ENV = "DFREC_COMPILATION_CACHE"
OFF = ("off", "0", "false", "none")
MAX_BYTES = 2 << 30
_CPU_KEYS = ("model name", "flags", "Features", "CPU implementer", "CPU part")

_hits = [0]


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _hits[0] += 1


jax.monitoring.register_event_listener(_count_hit)


def hits() -> int:
    """Programs this process has read from the persistent cache so far."""
    return _hits[0]


def machine_signature() -> str:
    """12 hex digits naming what an XLA:CPU executable depends on (module docstring)."""
    parts = [platform.machine(), jaxlib.__version__]
    try:
        with open("/proc/cpuinfo") as f:
            seen = {}
            for line in f:
                key = line.partition(":")[0].strip()
                if key in _CPU_KEYS and key not in seen:
                    seen[key] = line.strip()
            parts += [seen[k] for k in sorted(seen)]
    except OSError:  # no /proc (macOS): the processor string is what there is
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def directory(environ=os.environ) -> str | None:
    """The cache folder the environment asks for (None: off)."""
    value = environ.get(ENV, "").strip()
    if value.lower() in OFF and value:
        return None
    if not value:
        home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        value = os.path.join(home, "dfrec_jax", "xla")
    return os.path.join(value, machine_signature())


def enable(environ=os.environ) -> str | None:
    """Turns the cache on before the first compile; returns its folder (None: off). A folder
    that cannot be made is one warning line on stderr, and the command runs without a cache."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = directory(environ)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"warning: no compilation cache ({ENV}): {e}", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
