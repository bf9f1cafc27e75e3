"""Test setup: 8 emulated CPU devices so sharded code paths run everywhere.

The device count must be set before any JAX backend is initialised, which is why it happens
at import time of this conftest (pytest imports it first), as are the compile-time XLA flags
(tests/xla_flags.py), which travel to the CLI subprocesses the tests start through the
environment.
"""

import os

from tests import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
xla_flags.add_to_environment()

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# One persistent compilation cache per test session (also inherited by the CLI subprocesses
# tests start): many tests build the same tiny model in fresh closures, and each identical
# program then compiles once. Programs under 1 s of compile time are not worth caching.
_XLA_CACHE = tempfile.mkdtemp(prefix="dfrec_test_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


import socket  # noqa: E402

import pytest  # noqa: E402

_real_connect = socket.socket.connect


class NetworkAccessError(RuntimeError):
    pass


def _guarded_connect(sock, address):
    # Local (unix) sockets are fine; anything over IP means code tried to download something.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        raise NetworkAccessError(f"network access attempted during tests: {address}")
    return _real_connect(sock, address)


# Test files that take half a minute or more on 2 cores (the suite's --durations, mean of two
# runs, 2026-12-06), longest first: run first, they leave the many short files to even out
# the two xdist workers' ends (`--dist loadfile --no-loadscope-reorder` hands files out in
# collection order).
LONGEST_FIRST = (
    "test_models.py",  # 98 s summed over its tests
    "test_trainer.py",  # 97 s
    "test_video.py",  # 79 s
    "test_eval_runner.py",
    "test_train_step.py",
    "test_step_memory.py",
    "test_recover.py",
    "test_trace.py",
    "test_efficientnet_ism.py",
    "test_multiprocess_eval.py",
    "test_manual_builders.py",
    "test_loss_nets_bf16.py",
    "test_configs.py",
    "test_released_parity.py",
    "test_export.py",  # 30 s
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def pytest_collection_finish(session):
    """Every test module is imported: what is alive now stays for the session (gc_policy)."""
    from dfrec_jax.run import gc_policy

    gc_policy.collect_less()


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """The library must never download anything: every test runs with IP networking cut."""
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny `train`-style run folder (tests/tiny.make_workdir, step 3) shared by the tests
    that only read a run (trained, recover, export), built once per worker (a model trace and
    an orbax save: seconds).
    Tests must not write into it (copy it first)."""
    from tests import tiny

    return tiny.make_workdir(tmp_path_factory.mktemp("tiny_run") / "run", step=3)
