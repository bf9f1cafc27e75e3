"""glibc's malloc, set so that XLA:CPU's per-execution host buffers are reused, not remapped.

XLA:CPU allocates each execution's temporary buffer with malloc from one of its worker threads
and frees it when the execution ends: 1.8 GB for the demo train step. A worker thread's malloc
arena cannot hold a block that large, so glibc serves it from a fresh mmap and unmaps it on
free (whatever M_MMAP_MAX says), and every step the kernel faults in and zeroes all its pages
again: ~450,000 page faults per demo step. Without them the demo step took 5.0 s instead of
6.3-7.2 s on 2 AMD EPYC cores (README, Training). With one arena, no mmap and no trimming,
freed blocks stay in the heap and the next execution reuses the same, already mapped pages: no
faults after the first step.

Cost: the process never hands freed heap memory back to the OS: its resident size stays at
its high-water mark, fragmentation included, which can be above the first step's (the
compiler's own memory, programs of other shapes in eval or recover). Every thread allocates
from one arena (one lock): measured on the demo step and one demo training run, not on a
host feeding accelerators from many input threads, so the policy is for the CPU backend and is
skipped where an accelerator plugin is installed or JAX_PLATFORMS names another platform first
(JAX_PLATFORMS=cpu turns it on even then).

Opt-in (`DFREC_MALLOC=reuse`), because a real training process gains far less and holds more
memory: a 40-step demo training run on the same machine took 5.7 / 6.6 / 6.0 s per step in its
last three 10-step windows with it, 5.8 / 7.0 / 6.6 s without, and stayed at 8.1 GB resident
against a 4.9 GB peak (one run each; README, Training). Unset or `system`: malloc is left alone.

Arenas are bound to threads at their first allocation, so this must run before JAX, TensorFlow
or anything else starts threads: `python -m dfrec_jax` calls it before its other imports.
"""

from __future__ import annotations

import ctypes
import os
import pkgutil
import platform

ENV = "DFREC_MALLOC"
CHOICES = ("reuse", "system")  # reuse: the settings below; system (the default): untouched

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main (brk) heap
    (_M_MMAP_MAX, 0),  # large blocks from that heap too, not from mmap
    (_M_TRIM_THRESHOLD, -1),  # never return freed heap memory to the OS
)
_ACCELERATOR_MODULES = ("jax_cuda", "jax_rocm", "libtpu")  # name prefixes of JAX's plugins

status = "not set"  # what the last reuse_freed_memory() did; bench records carry it


def _skip_reason() -> str | None:
    choice = os.environ.get(ENV, "system").strip().lower() or "system"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "system":
        return f"{ENV}=system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc")):
        return "another allocator is preloaded"
    first = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if first and first != "cpu":
        return f"JAX_PLATFORMS={first}"
    if not first:
        plugin = next(
            (m.name for m in pkgutil.iter_modules() if m.name.startswith(_ACCELERATOR_MODULES)),
            None,
        )
        if plugin:
            return f"accelerator plugin {plugin} installed"
    return None


def reuse_freed_memory() -> str:
    """Applies the module's malloc settings to this process where they are meant to apply;
    returns (and keeps in `status`) "reuse" or "skipped: <why>". Call it first thing."""
    global status
    reason = _skip_reason()
    if reason is None:
        mallopt = ctypes.CDLL(None).mallopt
        failed = [param for param, value in _SETTINGS if mallopt(param, value) != 1]
        reason = f"mallopt refused {failed}" if failed else None
    status = "reuse" if reason is None else f"skipped: {reason}"
    if reason is None and _threads() > 1:
        # Threads that allocated before keep their own arenas (and their large blocks' mmaps).
        status += f", late: {_threads() - 1} other threads were running"
    return status


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1
