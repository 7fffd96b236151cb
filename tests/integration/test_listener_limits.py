"""Connection limits on both listeners of a real daemon (cached.api.listener), attacked as the
review did: floods of idle TCP connections, slowloris request heads, trickled bodies.

Past ``max_connections`` or ``max_connections_per_ip`` a connection is closed at once; an idle or
half-sent head is closed after ``header_timeout_s``; a body slower than ``body_timeout_s`` is cut.
Meanwhile the daemon answers real requests, counts what it refused, and logs no traceback. Distinct
source addresses come from binding client sockets to 127.0.0.2, 127.0.0.3, ... (all loopback).
The last test runs a daemon under a low open-file limit (prlimit) and floods it, as the finding
did with 20,000 connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cached.api.client import ApiClient
from cached.api.listener import RESERVE_FDS, clamp
from cached.config import ListenerLimits
from cached.daemon import Daemon
from tests.support.node import DaemonProcess, running_daemon
from tests.support.tls import self_signed
from tests.support.wait import wait_until

TOKEN = "listener-limits-cluster-token-0123"
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN)
    return path


def limits(section: str, **kw: Any) -> dict[str, Any]:
    return {f"{section}.limits.{k}": v for k, v in kw.items()}


def sample(d: Daemon, name: str, **labels: str) -> float:
    return d.metrics.registry.get_sample_value(name, labels) or 0.0


def hostport(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("http://").rpartition(":")
    return host, int(port)


async def connect(address: str, src: str) -> Conn:
    host, port = hostport(address)
    return await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=(src, 0)), 10)


async def closed_by_server(conn: Conn, timeout_s: float = 10.0) -> bool:
    """True once the server has closed the connection (EOF or reset); False if still open."""
    try:
        return await asyncio.wait_for(conn[0].read(1), timeout_s) == b""
    except TimeoutError:  # before OSError: TimeoutError is one
        return False
    except (ConnectionError, OSError):
        return True


async def close_all(conns: list[Conn]) -> None:
    for _, w in conns:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    noisy = [r for r in caplog.records if r.name == "cached.api.listener" and r.levelno >= logging.WARNING]
    assert len(noisy) <= 2, [r.getMessage() for r in noisy]  # rate-limited: one line per 10 s


async def healthz(d: Daemon) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(f"{d.api_address}/healthz") as r:
            return r.status


async def peer_status_from(d: Daemon, src: str) -> int:
    """A real peer request from ``src`` (no credentials: the answer is 401, which proves it was served)."""
    conn = aiohttp.TCPConnector(local_addr=(src, 0), force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(f"http://{d.peer_address}/p2p/v1/holdings?since=0") as r:
            return r.status


@contextlib.asynccontextmanager
async def peer_node(tmp_path: Path, token_file: Path, **flags: Any) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp_path / "node", **{"cluster.token_file": str(token_file), **flags}) as d:
        yield d


# --- the peer listener -----------------------------------------------------------------------------


async def test_a_flood_from_one_address_gets_its_share_and_the_daemon_still_answers(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flags = limits("peer", max_connections=50, max_connections_per_ip=20, header_timeout_s=60)
    async with peer_node(tmp_path, token_file, **flags) as d:
        conns = [await connect(f"http://{d.peer_address}", "127.0.0.2") for _ in range(300)]
        try:
            # The first 20 are held open (idle); every one past the per-address cap is closed at once.
            results = await asyncio.gather(
                *(closed_by_server(c, timeout_s=0.5 if i < 20 else 10) for i, c in enumerate(conns))
            )
            assert results == [False] * 20 + [True] * 280
            assert sample(d, "cached_listener_connections", listener="peer") == 20
            assert sample(d, "cached_listener_refused_total", listener="peer", reason="max_connections_per_ip") == 280
            # Under the flood: another address is served on the peer port, and the local API answers.
            assert await peer_status_from(d, "127.0.0.1") == 401
            assert await healthz(d) == 200
        finally:
            await close_all(conns)
        await wait_until(lambda: sample(d, "cached_listener_connections", listener="peer") == 0, what="slots released")
    no_tracebacks(caplog)


async def test_the_global_cap_holds_across_addresses_and_slots_come_back(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flags = limits("peer", max_connections=50, max_connections_per_ip=20, header_timeout_s=60)
    async with peer_node(tmp_path, token_file, **flags) as d:
        conns = [await connect(f"http://{d.peer_address}", f"127.0.0.{ip}") for ip in range(2, 7) for _ in range(15)]
        try:
            closed = await asyncio.gather(*(closed_by_server(c, timeout_s=0.5) for c in conns))
            assert closed.count(False) == 50 and closed.count(True) == 25
            assert sample(d, "cached_listener_connections", listener="peer") == 50
            assert sample(d, "cached_listener_refused_total", listener="peer", reason="max_connections") == 25
            assert await closed_by_server(await connect(f"http://{d.peer_address}", "127.0.0.9"))
        finally:
            await close_all(conns)
        await wait_until(lambda: sample(d, "cached_listener_connections", listener="peer") == 0, what="slots released")
        assert await peer_status_from(d, "127.0.0.9") == 401
    no_tracebacks(caplog)


async def test_idle_connections_and_a_half_sent_request_line_are_closed_after_the_header_timeout(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flags = limits("peer", header_timeout_s=0.5, max_connections_per_ip=100)
    async with peer_node(tmp_path, token_file, **flags) as d:
        idle = [await connect(f"http://{d.peer_address}", "127.0.0.3") for _ in range(30)]
        slow = await connect(f"http://{d.peer_address}", "127.0.0.4")
        slow[1].write(b"GET /p2p/v1/hea")  # slowloris: half a request line, then nothing
        try:
            assert all(await asyncio.gather(*(closed_by_server(c, timeout_s=20) for c in idle + [slow])))
            assert sample(d, "cached_listener_timeouts_total", listener="peer", kind="header") == 31
            await wait_until(
                lambda: sample(d, "cached_listener_connections", listener="peer") == 0, what="slots released"
            )
            # A connection that sends its request in time is served as usual.
            assert await peer_status_from(d, "127.0.0.4") == 401
        finally:
            await close_all(idle + [slow])
    no_tracebacks(caplog)


async def trickle(conn: Conn, head: bytes, *, max_bytes: int = 200, every_s: float = 0.1) -> bool:
    """Send ``head``, then one body byte per ``every_s``; True once the server cut the connection."""
    reader, writer = conn
    writer.write(head)
    for _ in range(max_bytes):
        try:
            writer.write(b" ")
            await writer.drain()
        except (ConnectionError, OSError):
            return True
        if reader.at_eof():
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            data = await asyncio.wait_for(reader.read(65536), every_s)
            if data == b"":
                return True
    return False


async def test_a_body_that_trickles_slower_than_the_body_timeout_is_cut(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flags = {**limits("peer", body_timeout_s=0.5), **limits("api", body_timeout_s=0.5)}
    async with peer_node(tmp_path, token_file, **flags) as d:
        for address, listener, head in (
            (
                f"http://{d.peer_address}",
                "peer",
                b"POST /p2p/v1/gossip HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
            ),
            (
                d.api_address,
                "api",
                b"POST /v1/prefetch HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
            ),
        ):
            conn = await connect(address, "127.0.0.5")
            try:
                assert await trickle(conn, head), f"{listener}: a trickled body was never cut"
            finally:
                await close_all([conn])
            assert sample(d, "cached_listener_timeouts_total", listener=listener, kind="body") == 1
        assert await healthz(d) == 200
    no_tracebacks(caplog)


# --- the local API listener ------------------------------------------------------------------------


async def test_the_local_api_over_tcp_has_the_same_caps_and_deadlines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flags = limits("api", max_connections=30, max_connections_per_ip=10, header_timeout_s=60)
    async with running_daemon(tmp_path / "node", **flags) as d:
        conns = [await connect(d.api_address, "127.0.0.2") for _ in range(100)]
        try:
            closed = await asyncio.gather(
                *(closed_by_server(c, timeout_s=0.5 if i < 10 else 10) for i, c in enumerate(conns))
            )
            assert closed == [False] * 10 + [True] * 90
            assert sample(d, "cached_listener_refused_total", listener="api", reason="max_connections_per_ip") == 90
            assert await healthz(d) == 200
        finally:
            await close_all(conns)
    async with running_daemon(tmp_path / "node2", **limits("api", header_timeout_s=0.5)) as d:
        slow = await connect(d.api_address, "127.0.0.3")
        slow[1].write(b"GET /healt")
        try:
            assert await closed_by_server(slow, timeout_s=20)
        finally:
            await close_all([slow])
        assert sample(d, "cached_listener_timeouts_total", listener="api", kind="header") == 1
        assert await healthz(d) == 200
    no_tracebacks(caplog)


async def test_the_local_api_on_a_unix_socket_caps_each_calling_user(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sock = tmp_path / "api.sock"
    flags = {"api.listen": f"unix:{sock}", **limits("api", max_connections_per_ip=5, header_timeout_s=60)}
    async with running_daemon(tmp_path / "node", **flags) as d:
        conns = [await asyncio.open_unix_connection(str(sock)) for _ in range(12)]
        try:
            closed = await asyncio.gather(
                *(closed_by_server(c, timeout_s=0.5 if i < 5 else 10) for i, c in enumerate(conns))
            )
            assert closed == [False] * 5 + [True] * 7
            assert sample(d, "cached_listener_refused_total", listener="api", reason="max_connections_per_ip") == 7
        finally:
            await close_all(conns)
        await wait_until(lambda: sample(d, "cached_listener_connections", listener="api") == 0, what="slots released")
        async with ApiClient(d.api_address) as api:
            assert (await api.request("GET", "/v1/node"))["node_id"] == "test-node"
    no_tracebacks(caplog)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
async def test_a_tls_connection_that_never_handshakes_is_closed(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    d_ = tmp_path / "pki"
    self_signed(d_)
    flags = {
        "peer.tls_cert_file": str(d_ / "c.pem"),
        "peer.tls_key_file": str(d_ / "k.pem"),
        **limits("peer", header_timeout_s=0.5),
    }
    async with peer_node(tmp_path, token_file, **flags) as d:
        silent = await connect(f"http://{d.peer_address}", "127.0.0.6")  # TCP only: no ClientHello
        ctx = ssl.create_default_context(cafile=str(d_ / "c.pem"))
        host, port = hostport(d.peer_address)
        # Handshake done, then no request: the header deadline applies as on plain TCP.
        idle = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname="127.0.0.1", local_addr=("127.0.0.6", 0)
        )
        try:
            assert await closed_by_server(silent, timeout_s=20)
            assert await closed_by_server(idle, timeout_s=20)
            assert sample(d, "cached_listener_timeouts_total", listener="peer", kind="header") == 1
        finally:
            await close_all([silent, idle])
    no_tracebacks(caplog)


# --- file descriptors in reserve -------------------------------------------------------------------


def test_caps_are_clamped_to_leave_file_descriptors_in_reserve() -> None:
    api, peer = (
        ListenerLimits(max_connections=1024, max_connections_per_ip=128),
        ListenerLimits(max_connections=2048, max_connections_per_ip=64),
    )
    out = clamp({"api": api, "peer": peer}, fd_limit=1024)
    assert out["api"].max_connections + out["peer"].max_connections <= 1024 - RESERVE_FDS
    assert out["api"].max_connections_per_ip <= out["api"].max_connections
    assert out["peer"].max_connections > out["api"].max_connections  # shares follow the configured caps
    assert clamp({"api": api, "peer": peer}, fd_limit=1 << 20) == {"api": api, "peer": peer}


class LowFdDaemon(DaemonProcess):
    """The daemon as a child process under a small open-file limit (soft = hard, as a unit with
    LimitNOFILE=400 would give it)."""

    def __init__(self, workdir: Path, nofile: int, *extra: str) -> None:
        super().__init__(workdir, *extra)
        self.nofile = nofile

    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *super().argv()]

    def peer_port(self) -> int:
        for line in self.log_path.read_text().splitlines():
            if "peer_api=" in line:
                return int(line.split("peer_api=")[1].split()[0].rpartition(":")[2])
        raise AssertionError("no peer_api= line in the daemon log")


@pytest.mark.skipif(
    shutil.which("prlimit") is None, reason="needs prlimit (util-linux) to start the daemon with a low fd limit"
)
def test_a_connection_flood_cannot_exhaust_the_daemons_file_descriptors(tmp_path: Path, token_file: Path) -> None:
    # The finding: 20,000 idle connections took every file descriptor and the log filled with
    # tracebacks. Here the open-file limit is 400 and the flood 1,000 connections from one address.
    node = LowFdDaemon(tmp_path, 400, "--cluster-token-file", str(token_file)).start()
    socks: list[socket.socket] = []
    try:
        port = node.peer_port()
        for _ in range(1000):
            s = socket.socket()
            s.settimeout(5)
            s.bind(("127.0.1.1", 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
        # Still serving on both listeners, under the flood.
        assert node.cachectl("status", timeout_s=30).returncode == 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /p2p/v1/holdings?since=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(12).startswith(b"HTTP/1.1 401")
        text = unix_get(node.socket, "/metrics")
    finally:
        for s in socks:
            s.close()
        node.stop()
    log = node.log_path.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
    assert "clamped" in log
    refused = [
        line
        for line in text.splitlines()
        if line.startswith('cached_listener_refused_total{listener="peer",reason="max_connections_per_ip"}')
    ]
    assert refused and float(refused[0].split()[-1]) > 0, text[-2000:]


def unix_get(path: Path, target: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
