"""Test setup: 8 emulated CPU devices so sharded code paths run everywhere.

The device count must be set before any JAX backend is initialised, which is why it happens
at import time of this conftest (pytest imports it first). The tests compile many small
programs and run little compute, so XLA's CPU backend optimisation is turned down: it cuts
compile time about 3x on 2 cores and does not change what the programs compute.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


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


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """The library must never download anything: every test runs with IP networking cut."""
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect
