"""dfrec_jax/run/malloc_policy.py (DFREC_MALLOC): a worker thread's large block, freed and
allocated again, faults in every 4 KiB page each time under glibc's defaults (`system`; XLA:CPU's
per-execution buffers), ~1/512 as many with `hugepages` (the default: glibc's huge-page tunable,
set by re-executing the process) and none after the first with `reuse`; where a choice does not
apply it says why and leaves malloc alone; `python -m dfrec_jax` applies it before importing
JAX and re-executes itself for `hugepages`; a bad DFREC_MALLOC is one error line."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from dfrec_jax import configlib
from dfrec_jax.run import malloc_policy

# A worker thread mallocs 256 MiB, writes every page and frees it, four times: the page faults
# of the first round and of the later ones, from getrusage. The probe applies DFREC_MALLOC as
# the command line does, re-executing itself for `hugepages`.
_PROBE = """
import ctypes, resource, sys, threading
from dfrec_jax.run import malloc_policy

print(malloc_policy.apply([sys.executable, *sys.orig_argv[1:]]))
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
_PAGES = (256 << 20) // 4096  # 4 KiB pages in the probe's block

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the policy sets glibc's malloc",
)


# What would change malloc under the probe: an allocator or glibc settings of the caller's.
_OURS = ("DFREC_MALLOC", "JAX_PLATFORMS", "LD_PRELOAD", "GLIBC_TUNABLES", malloc_policy._REEXECUTED)


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


def _huge_pages_expected():
    """The status `hugepages` should give on this machine (the tests run where the kernel and
    glibc provide it; elsewhere the reason is checked instead of the effect)."""
    version = platform.libc_ver()[1]
    if tuple(int(n) for n in version.split(".")[:2]) < (2, 35):
        return f"skipped: glibc {version} has no glibc.malloc.hugetlb (2.35+)"
    mode = malloc_policy.thp_mode()
    return (
        "hugepages" if mode in ("madvise", "always") else f"skipped: transparent huge pages: {mode}"
    )


@glibc_only
def test_freed_blocks_are_reused_under_reuse_and_faulted_anew_under_system():
    status, first, later = _probe(DFREC_MALLOC="reuse", JAX_PLATFORMS="cpu")
    assert status == "reuse"
    assert first > 0 and later <= first // 20, (first, later)  # the pages stayed mapped

    status, first, later = _probe(DFREC_MALLOC="system")
    assert status == "skipped: DFREC_MALLOC=system"
    assert later >= first // 2 > 0, (first, later)  # mmap'd and unmapped every round
    # A tunable inherited from a parent (or set by hand) still acts: the status says so.
    status, _, _ = _probe(DFREC_MALLOC="system", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    assert status == "skipped: DFREC_MALLOC=system (GLIBC_TUNABLES sets glibc.malloc.hugetlb=1)"


@glibc_only
def test_huge_pages_are_the_default_and_fault_a_2_mib_page_at_a_time():
    for env in ({"DFREC_MALLOC": "hugepages"}, {}):
        status, first, later = _probe(**env)
        assert status == _huge_pages_expected()
        if status == "hugepages":
            # Every round maps the block anew (so it faults again), in 2 MiB pages.
            assert 0 < first <= _PAGES // 20 and 0 < later <= _PAGES // 20, (first, later)
        else:
            assert later >= first // 2 > 0, (first, later)


@glibc_only
def test_huge_pages_keep_the_callers_tunables_and_respect_an_explicit_off():
    if _huge_pages_expected() != "hugepages":
        pytest.skip(f"this kernel: {_huge_pages_expected()}")
    status, first, later = _probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert status == "skipped: GLIBC_TUNABLES sets glibc.malloc.hugetlb=0"
    assert later >= first // 2 > 0, (first, later)
    status, first, later = _probe(GLIBC_TUNABLES="glibc.malloc.check=0:glibc.malloc.hugetlb=1")
    assert status == "hugepages" and later <= _PAGES // 20, (first, later)


@pytest.fixture
def policy(monkeypatch):
    """malloc_policy under a clean environment, on a glibc 2.36 Linux with transparent huge
    pages on request, where re-executing raises instead of replacing the test process."""
    for name in _OURS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(malloc_policy.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc_policy.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(malloc_policy.pkgutil, "iter_modules", lambda: [])
    monkeypatch.setattr(malloc_policy, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(malloc_policy, "_set_reuse", lambda: None)  # decisions only
    monkeypatch.setattr(malloc_policy, "_threads", lambda: 1)  # pytest's threads aside

    class Reexecuted(Exception):
        pass

    def execve(path, argv, environ):
        raise Reexecuted(path, argv, environ)

    monkeypatch.setattr(malloc_policy.os, "execve", execve)
    malloc_policy.Reexecuted = Reexecuted
    yield malloc_policy
    del malloc_policy.Reexecuted


def test_huge_pages_reexecute_the_command_once_with_the_tunable_added(policy, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")
    rerun = ["/venv/bin/python", "-m", "dfrec_jax", "train", "--workdir", "w"]
    with pytest.raises(policy.Reexecuted) as reexecuted:
        policy.apply(rerun)
    path, argv, environ = reexecuted.value.args
    assert path == rerun[0] and argv == rerun
    assert environ["GLIBC_TUNABLES"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"

    # The re-executed process: the tunable is there, nothing more to do.
    monkeypatch.setattr(policy.os, "environ", {**environ})
    assert policy.apply(rerun) == "hugepages"
    assert policy._REEXECUTED not in policy.os.environ  # its children start clean

    # Where the tunable did not reach the re-executed process, no second re-execution.
    monkeypatch.setattr(policy.os, "environ", {policy._REEXECUTED: "1"})
    assert (
        policy.apply(rerun)
        == "skipped: GLIBC_TUNABLES has no glibc.malloc.hugetlb (glibc reads it at start-up)"
    )
    assert policy.apply(None).startswith("skipped: GLIBC_TUNABLES has no")  # not the CLI

    # An interpreter that cannot be executed: the command runs on without huge pages.
    def refuse(path, argv, environ):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(policy.os, "environ", {})
    monkeypatch.setattr(policy.os, "execve", refuse)
    assert policy.apply(rerun) == "skipped: re-execution failed: [Errno 13] Permission denied"


def test_the_tunable_is_read_as_glibc_reads_it():
    read = malloc_policy._tunable
    assert read("glibc.malloc.hugetlb=1") == "1"
    assert read("glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0") == "0"  # the last one wins
    assert read("glibc.malloc.check=0:glibc.malloc.hugetlb=2") == "2"
    assert read("glibc.malloc.hugetlb") is None and read("") is None  # no value: nothing set


def test_huge_pages_need_a_kernel_and_glibc_that_provide_them(policy, monkeypatch):
    monkeypatch.setattr(policy, "thp_mode", lambda: "never")
    assert policy.apply(["python"]) == "skipped: transparent huge pages: never"
    monkeypatch.setattr(policy, "thp_mode", lambda: "always")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert policy.apply(["python"]) == "hugepages"
    monkeypatch.setattr(policy.platform, "libc_ver", lambda: ("glibc", "2.36-9+deb12u14"))
    assert policy.apply(["python"]) == "hugepages"
    monkeypatch.setattr(policy.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert policy.apply(["python"]) == "skipped: glibc 2.31 has no glibc.malloc.hugetlb (2.35+)"


def test_the_kernels_huge_page_mode_is_its_bracketed_word(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(malloc_policy, "_THP_MODE", str(setting))
    assert malloc_policy.thp_mode() == "madvise"
    monkeypatch.setattr(malloc_policy, "_THP_MODE", str(tmp_path / "missing"))
    assert malloc_policy.thp_mode() == "unavailable"


def test_only_the_command_line_is_reexecuted(monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "-m", "dfrec_jax", "eval"])
    assert malloc_policy.command_to_rerun() == [
        sys.executable,
        "-X",
        "utf8",
        "-m",
        "dfrec_jax",
        "eval",
    ]
    script = ["/venv/bin/dfrec-jax", "recover", "--workdir", "w"]  # pyproject's console script
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "-I", *script])
    assert malloc_policy.command_to_rerun() == [sys.executable, "-I", *script]
    others = (["-m", "pytest", "-m", "dfrec_jax"], ["-c", "-m dfrec_jax"], ["x.py", "-m"], ["-"])
    for other in others:
        monkeypatch.setattr(sys, "orig_argv", ["python3", *other])
        assert malloc_policy.command_to_rerun() is None, other


def test_reuse_stays_off_where_an_accelerator_runs(policy, monkeypatch):
    monkeypatch.setenv("DFREC_MALLOC", "reuse")
    assert policy.apply() == "reuse"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert policy.apply() == "skipped: JAX_PLATFORMS=cuda"
    monkeypatch.delenv("JAX_PLATFORMS")
    plugin = type("Module", (), {"name": "jax_cuda12_plugin"})
    monkeypatch.setattr(policy.pkgutil, "iter_modules", lambda: [plugin])
    assert policy.apply() == "skipped: accelerator plugin jax_cuda12_plugin installed"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # CPU asked for: on even with a plugin
    assert policy.apply() == "reuse"
    monkeypatch.setattr(policy, "_threads", lambda: 3)  # their arenas were bound before
    assert policy.apply() == "reuse, late: 2 other threads were running"


def test_every_choice_but_system_needs_glibc_and_no_other_allocator(policy, monkeypatch):
    for choice in ("reuse", "hugepages"):
        monkeypatch.setenv("DFREC_MALLOC", choice)
        monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
        assert policy.apply(["python"]) == "skipped: another allocator is preloaded"
        monkeypatch.delenv("LD_PRELOAD")
        monkeypatch.setattr(policy.platform, "libc_ver", lambda: ("", ""))  # musl
        assert policy.apply(["python"]) == "skipped: not glibc"
        monkeypatch.setattr(policy.platform, "system", lambda: "Darwin")
        assert policy.apply(["python"]) == "skipped: not glibc"
        monkeypatch.setattr(policy.platform, "system", lambda: "Linux")
        monkeypatch.setattr(policy.platform, "libc_ver", lambda: ("glibc", "2.36"))


def test_an_unknown_choice_is_one_clear_error(policy, monkeypatch):
    monkeypatch.setenv("DFREC_MALLOC", "jemalloc")
    expected = "DFREC_MALLOC='jemalloc': expected one of hugepages, reuse, system"
    with pytest.raises(ValueError, match=expected):
        policy.apply()


def test_the_command_line_turns_a_bad_choice_into_one_error_line():
    done = subprocess.run(
        [sys.executable, "-m", "dfrec_jax", "bench", "--what", "forward"],
        cwd=configlib.REPO_ROOT,
        env={**_clean_environ(), "DFREC_MALLOC": "bogus"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == "error: DFREC_MALLOC='bogus': expected one of hugepages, reuse, system"
    )


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


@glibc_only
@pytest.mark.parametrize("launcher", ["python -m dfrec_jax", "dfrec-jax"])
def test_the_command_line_runs_with_huge_pages_by_default(tmp_path, launcher):
    """`python -m dfrec_jax bench` and the `dfrec-jax` script re-execute themselves with the
    tunable: their records say so."""
    if launcher == "dfrec-jax":
        command = [os.path.join(os.path.dirname(sys.executable), "dfrec-jax")]
        assert os.path.isfile(command[0]), "run ./run.sh once: it installs the project"
    else:
        command = [sys.executable, "-m", "dfrec_jax"]
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text(
        textwrap.dedent("""
            from tests import tiny

            def get_config(arg=None):
                return tiny.tiny_config()
        """)
    )
    done = subprocess.run(
        [*command, "bench", "--what", "forward", "--config", str(config_file), "--batch", "1",
         "--repeats", "1"],
        cwd=configlib.REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**_clean_environ(), "DFREC_COMPILATION_CACHE": "off",
             "PYTHONPATH": configlib.REPO_ROOT},  # the script's path holds no `tests`
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["host_malloc"] == _huge_pages_expected()
