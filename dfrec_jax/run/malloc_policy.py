"""glibc's malloc, set so that XLA:CPU's per-execution host buffers do not cost a page fault
per 4 KiB page every step.

XLA:CPU allocates each execution's temporary buffer with malloc from one of its worker threads
and frees it when the execution ends: 1.8 GB for the demo train step. A worker thread's malloc
arena cannot hold a block that large, so glibc serves it from a fresh mmap and unmaps it on
free (whatever M_MMAP_MAX says), and every step the kernel faults in and zeroes all its pages
again: ~450,000 page faults per demo step. Two remedies, chosen with `DFREC_MALLOC`:

- `hugepages` (the default): glibc's `glibc.malloc.hugetlb=1` tunable, which asks the kernel
  for transparent huge pages (2 MiB) on the blocks malloc maps: 897 faults instead of 458,753
  for a 1.8 GB block, and memory is returned to the OS as before. glibc reads its tunables
  when the process starts, so `python -m dfrec_jax` (and the `dfrec-jax` script) re-executes
  itself (same PID, same arguments) with `GLIBC_TUNABLES` extended before it imports anything
  else. Needs glibc >= 2.35 and transparent huge pages in `madvise` or `always` mode; skipped
  otherwise, with the reason in `status`.
- `reuse`: one arena, no mmap, no trimming (mallopt, in-process): freed blocks stay in the heap
  and the next execution reuses the same, already mapped pages: no faults after the first
  step. Cost: the process never hands freed heap memory back to the OS (a 40-step demo training
  run stayed at 8.1 GB resident against a 4.9 GB peak without it), and every thread allocates
  from one lock. For the CPU backend only: skipped where an accelerator plugin is installed or
  JAX_PLATFORMS names another platform first (JAX_PLATFORMS=cpu turns it on even then).
  Arenas are bound to threads at their first allocation, so it must run before JAX, TensorFlow
  or anything else starts threads.
- `system`: malloc is left alone.

Measured on the demo step and training (README, Training: "XLA:CPU's step buffers").
"""

from __future__ import annotations

import ctypes
import os
import pkgutil
import platform
import re
import sys

ENV = "DFREC_MALLOC"
CHOICES = ("hugepages", "reuse", "system")
DEFAULT = "hugepages"

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main (brk) heap
    (_M_MMAP_MAX, 0),  # large blocks from that heap too, not from mmap
    (_M_TRIM_THRESHOLD, -1),  # never return freed heap memory to the OS
)
_ACCELERATOR_MODULES = ("jax_cuda", "jax_rocm", "libtpu")  # name prefixes of JAX's plugins

_TUNABLE = "glibc.malloc.hugetlb"  # glibc >= 2.35: 1 = madvise(MADV_HUGEPAGE) what malloc maps
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set in the re-executed process's environment: a second re-execution would mean the tunable
# did not reach it, and must not loop.
_REEXECUTED = "_DFREC_MALLOC_REEXECUTED"

status = "not set"  # what the last apply() did; bench records carry it


def chosen() -> str:
    """DFREC_MALLOC, checked (ValueError on an unknown value)."""
    choice = os.environ.get(ENV, DEFAULT).strip().lower() or DEFAULT
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def command_to_rerun() -> list[str] | None:
    """This process's command line when it was started as the command line, `python [...] -m
    dfrec_jax ...` or the `dfrec-jax` script (what re-executing it would run again), else
    None."""
    argv = sys.orig_argv
    options = iter(argv[1:])
    for option in options:  # the interpreter's options end at -m, -c, - or a script
        if option in ("-X", "-W"):
            next(options, None)
            continue
        if option == "-m":
            ours = next(options, None) == "dfrec_jax"
        elif option.startswith("-") and option not in ("-c", "-"):
            continue
        else:  # -c, - (stdin) or a script: ours only as the `dfrec-jax` script
            ours = os.path.basename(option) == "dfrec-jax"
        return [sys.executable, *argv[1:]] if ours and sys.executable else None
    return None


def apply(rerun: list[str] | None = None) -> str:
    """Applies DFREC_MALLOC to this process; returns (and keeps in `status`) the choice or
    "skipped: <why>". Call it first thing. `rerun`: the command that started this process
    (`command_to_rerun()`): `hugepages` re-executes it (os.execve, never returns) when the
    tunable is not yet in the environment; without it `hugepages` only reports."""
    global status
    choice = chosen()
    reason = _glibc_reason() if choice != "system" else f"{ENV}=system"
    inherited = _tunable(os.environ.get("GLIBC_TUNABLES", ""))
    if choice == "system" and inherited is not None:  # e.g. from a parent: say what runs
        reason += f" (GLIBC_TUNABLES sets {_TUNABLE}={inherited})"
    if reason is None and choice == "reuse":
        reason = _reuse_reason() or _set_reuse()
    if reason is None and choice == "hugepages":
        reason = _huge_pages(rerun)
    status = choice if reason is None else f"skipped: {reason}"
    others = _threads() - 1
    if reason is None and choice == "reuse" and others > 0:
        # Threads that allocated before keep their own arenas (and their large blocks' mmaps).
        status += f", late: {others} other threads were running"
    return status


def _glibc_reason() -> str | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc")):
        return "another allocator is preloaded"
    return None


def _reuse_reason() -> str | None:
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


def _set_reuse() -> str | None:
    mallopt = ctypes.CDLL(None).mallopt
    failed = [param for param, value in _SETTINGS if mallopt(param, value) != 1]
    return f"mallopt refused {failed}" if failed else None


def _huge_pages(rerun: list[str] | None) -> str | None:
    """None where the tunable is in effect (it was in the environment at start-up); else
    re-executes `rerun` with it, or returns why not."""
    version = platform.libc_ver()[1]
    numbers = re.match(r"(\d+)\.(\d+)", version)
    if numbers is None or tuple(map(int, numbers.groups())) < (2, 35):
        return f"glibc {version} has no {_TUNABLE} (2.35+)"
    reexecuted = os.environ.pop(_REEXECUTED, None)  # not for this process's children
    mode = thp_mode()
    if mode not in ("madvise", "always"):
        return f"transparent huge pages: {mode}"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    value = _tunable(tunables)
    if value is not None:
        return None if value != "0" else f"GLIBC_TUNABLES sets {_TUNABLE}=0"
    if rerun is None or reexecuted:
        return f"GLIBC_TUNABLES has no {_TUNABLE} (glibc reads it at start-up)"
    environ = {
        **os.environ,
        "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{_TUNABLE}=1"))),
        _REEXECUTED: "1",
    }
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(rerun[0], rerun, environ)
    except OSError as e:  # an optimisation: the command runs on without it
        return f"re-execution failed: {e}"


def _tunable(tunables: str) -> str | None:
    """The value of glibc.malloc.hugetlb in a GLIBC_TUNABLES string (name=value:name=value;
    as glibc reads it: the last setting wins, a name without a value sets nothing)."""
    values = [
        item.partition("=")[2] for item in tunables.split(":") if item.startswith(f"{_TUNABLE}=")
    ]
    return values[-1] if values else None


def thp_mode() -> str:
    """The kernel's transparent huge page mode (the bracketed word of its setting)."""
    try:
        with open(_THP_MODE) as f:
            setting = f.read()
    except OSError:
        return "unavailable"
    start, end = setting.find("["), setting.find("]")
    return setting[start + 1 : end] if 0 <= start < end else "unavailable"


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1
