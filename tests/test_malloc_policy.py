"""dfrec_jax/run/malloc_policy.py: under the policy a worker thread's large block, freed and
allocated again, reuses its mapped pages; under glibc's defaults every allocation faults its
pages in anew (XLA:CPU's per-execution buffers); where the policy does not apply it leaves
malloc alone; `python -m dfrec_jax` applies it before importing JAX."""

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


def _probe(**env):
    environ = {k: v for k, v in os.environ.items() if k not in ("DFREC_MALLOC", "JAX_PLATFORMS")}
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
    status, first, later = _probe(JAX_PLATFORMS="cpu")
    assert status == "reuse"
    assert first > 0 and later <= first // 20, (first, later)  # the pages stayed mapped

    status, first, later = _probe(DFREC_MALLOC="system")
    assert status == "skipped: DFREC_MALLOC=system"
    assert later >= first // 2 > 0, (first, later)  # mmap'd and unmapped every round


@glibc_only
def test_the_policy_stays_off_where_an_accelerator_runs():
    status, _, _ = _probe(JAX_PLATFORMS="cuda,cpu")
    assert status == "skipped: JAX_PLATFORMS=cuda"


def test_an_unknown_choice_is_one_clear_error(monkeypatch):
    from dfrec_jax.run import malloc_policy

    monkeypatch.setenv("DFREC_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="DFREC_MALLOC='jemalloc': expected one of reuse, system"):
        malloc_policy.reuse_freed_memory()


@glibc_only
def test_the_command_line_applies_it_before_jax_is_imported():
    probe = (
        "import sys; import dfrec_jax.__main__; "
        "from dfrec_jax.run import malloc_policy; print(malloc_policy.status)"
    )
    environ = {k: v for k, v in os.environ.items() if k != "DFREC_MALLOC"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", probe],
        cwd=configlib.REPO_ROOT,
        env={**environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "reuse"
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert imported.index("dfrec_jax.run.malloc_policy") < imported.index("jax")
