"""Who is on the other end of a loopback TCP connection: the kernel's answer, two ways.

``api.access._tcp_owner`` asks sock_diag for the one socket and falls back to a search of
/proc/net/tcp{,6}. Both must name the uid that opened the client socket: root's, and that of a
child that dropped to uid 65534 before it connected (needs root; skipped otherwise).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from cached.api import access


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def server(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    family, host = request.param
    srv = socket.socket(family)
    try:
        srv.bind((host, 0))
    except OSError as e:
        pytest.skip(f"no {host} here: {e}")
    srv.listen(8)
    with srv:
        yield srv


def accepted_from(srv: socket.socket, uid: int | None) -> tuple[socket.socket, socket.socket | None, int]:
    """(the server side of a connection made by ``uid``, our client end or None, the child's
    pid or 0); ``uid`` None: this process connects."""
    if uid is None:
        client = socket.create_connection(srv.getsockname()[:2])
        conn, _ = srv.accept()
        return conn, client, 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, connect, hold the socket until the parent has looked
        try:
            os.setgid(uid)
            os.setuid(uid)
            c = socket.create_connection(srv.getsockname()[:2])
            os.write(w, b"x")
            time.sleep(5)
            c.close()
        finally:
            os._exit(0)
    os.read(r, 1)
    conn, _ = srv.accept()
    return conn, None, pid


@pytest.mark.parametrize("who", [None, 65534], ids=["this-process", "nobody"])
def test_the_owner_of_a_loopback_client_socket_is_found_both_ways(server: socket.socket, who: int | None) -> None:
    if who is not None and os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    conn, client, child = accepted_from(server, who)
    want = os.geteuid() if who is None else who
    try:
        family, peer, local = conn.family, conn.getpeername(), conn.getsockname()
        assert access._diag_owner(family, peer, local) == want
        assert access._tcp_owner(family, peer, local) == want

        def no_netlink(*a: object) -> None:
            raise OSError("sock_diag unavailable")

        real, access._diag_owner = access._diag_owner, no_netlink  # the /proc search alone
        try:
            assert access._tcp_owner(family, peer, local) == want
        finally:
            access._diag_owner = real
    finally:
        conn.close()
        if client is not None:
            client.close()
        if child:
            os.kill(child, 9)
            os.waitpid(child, 0)
