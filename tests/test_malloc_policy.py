"""dfrec_jax/run/malloc_policy.py (opt-in, DFREC_MALLOC=reuse): under the policy a worker
thread's large block, freed and allocated again, reuses its mapped pages; under glibc's
defaults (what runs unless asked) every allocation faults its pages in anew (XLA:CPU's
per-execution buffers); where the policy does not apply it leaves malloc alone; `python -m
dfrec_jax` applies it before importing JAX (status "reuse": no thread ran before it) and turns
a bad DFREC_MALLOC into one error line."""

import os
import platform
import subprocess
import sys

import pytest

from dfrec_jax import configlib

# A worker thread mallocs 256 MiB, writes every page and frees it, four times: the page faults
# of the first round and of the later ones, from getrusage.
_PROBE = """
import ctypes, resource, sys, threading
from dfrec_jax.run import malloc_policy

print(malloc_policy.reuse_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20
faults = []

def rounds():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(faults[0], max(faults[1:]))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the policy sets glibc's malloc",
)


# What would change malloc under the probe: an allocator or glibc settings of the caller's.
_OURS = ("DFREC_MALLOC", "JAX_PLATFORMS", "LD_PRELOAD", "GLIBC_TUNABLES")


def _clean_environ():
    return {k: v for k, v in os.environ.items() if k not in _OURS and not k.startswith("MALLOC_")}


def _probe(**env):
    environ = _clean_environ()
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=configlib.REPO_ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    status, counts = done.stdout.strip().splitlines()
    first, later = map(int, counts.split())
    return status, first, later


@glibc_only
def test_freed_blocks_are_reused_under_the_policy_and_faulted_anew_without_it():
    status, first, later = _probe(DFREC_MALLOC="reuse", JAX_PLATFORMS="cpu")
    assert status == "reuse"
    assert first > 0 and later <= first // 20, (first, later)  # the pages stayed mapped

    for env in ({"DFREC_MALLOC": "system"}, {}):  # off unless asked for
        status, first, later = _probe(**env)
        assert status == "skipped: DFREC_MALLOC=system"
        assert later >= first // 2 > 0, (first, later)  # mmap'd and unmapped every round


@pytest.fixture
def skip_reason(monkeypatch):
    """malloc_policy._skip_reason under a clean environment (nothing is applied to this
    process: only the decision is computed)."""
    from dfrec_jax.run import malloc_policy

    for name in _OURS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DFREC_MALLOC", "reuse")
    monkeypatch.setattr(malloc_policy.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc_policy.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(malloc_policy.pkgutil, "iter_modules", lambda: [])
    return malloc_policy._skip_reason


def test_the_policy_stays_off_where_an_accelerator_runs(skip_reason, monkeypatch):
    from dfrec_jax.run import malloc_policy

    assert skip_reason() is None
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert skip_reason() == "JAX_PLATFORMS=cuda"
    monkeypatch.delenv("JAX_PLATFORMS")
    plugin = type("Module", (), {"name": "jax_cuda12_plugin"})
    monkeypatch.setattr(malloc_policy.pkgutil, "iter_modules", lambda: [plugin])
    assert skip_reason() == "accelerator plugin jax_cuda12_plugin installed"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # CPU asked for: on even with a plugin
    assert skip_reason() is None
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert skip_reason() == "another allocator is preloaded"


def test_the_policy_needs_glibc(skip_reason, monkeypatch):
    from dfrec_jax.run import malloc_policy

    monkeypatch.setattr(malloc_policy.platform, "libc_ver", lambda: ("", ""))  # musl
    assert skip_reason() == "not glibc"
    monkeypatch.setattr(malloc_policy.platform, "system", lambda: "Darwin")
    assert skip_reason() == "not glibc"


def test_an_unknown_choice_is_one_clear_error(skip_reason, monkeypatch):
    monkeypatch.setenv("DFREC_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="DFREC_MALLOC='jemalloc': expected one of reuse, system"):
        skip_reason()


def test_the_command_line_turns_a_bad_choice_into_one_error_line():
    done = subprocess.run(
        [sys.executable, "-m", "dfrec_jax", "bench", "--what", "forward"],
        cwd=configlib.REPO_ROOT,
        env={**_clean_environ(), "DFREC_MALLOC": "bogus"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: DFREC_MALLOC='bogus': expected one of reuse, system"


@glibc_only
def test_the_command_line_applies_it_before_jax_is_imported():
    probe = (
        "import sys; import dfrec_jax.__main__; "
        "from dfrec_jax.run import malloc_policy; print(malloc_policy.status)"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", probe],
        cwd=configlib.REPO_ROOT,
        env={**_clean_environ(), "DFREC_MALLOC": "reuse", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "reuse"
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert imported.index("dfrec_jax.run.malloc_policy") < imported.index("jax")
