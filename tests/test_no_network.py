"""The session-wide guard in conftest really cuts IP networking (so other tests prove that no
module downloads anything)."""

import socket
import urllib.request

import pytest


def test_ip_connections_are_refused():
    with pytest.raises(RuntimeError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with pytest.raises(Exception, match="network access attempted"):
        urllib.request.urlopen("http://127.0.0.1:9/", timeout=1)
