"""A client that goes away mid-answer is normal, not an error of the daemon.

``aria2c -x8`` splits a download over eight connections and closes each one once its segment is
in, while the daemon is still writing the open-ended range it asked for; a download cancelled
half-way resets its connection. Neither may log at error level (no "Cannot write to closing
transport" traceback) nor count as ``cached_api_errors_total{code="internal"}``: each is logged at
debug and counted as ``code="client_closed"``. Real aria2c (Debian package ``aria2``) and a raw
socket that resets the connection mid-body, against a real daemon and the hub double.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import socket
import struct
from pathlib import Path

import aiohttp
import pytest

from tests.support.hub import Hub, random_bytes
from tests.support.node import running_daemon
from tests.support.wait import wait_until

pytestmark = pytest.mark.system

REPO = "acme/big-model"
SIZE = 24 << 20  # several aria2c segments of 1 MiB minimum


async def counter(http: aiohttp.ClientSession, api: str, code: str) -> float:
    async with http.get(f"{api}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(f'cached_api_errors_total{{code="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


async def hub_with_big_file(hub: Hub) -> bytes:
    data = random_bytes(SIZE, seed=3)
    hub.add_repo(REPO, {"model.safetensors": data, "config.json": b"{}\n"})
    return data


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (Debian package aria2)")
async def test_aria2c_x8_leaves_no_error_and_no_internal_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with Hub() as hub:
        data = await hub_with_big_file(hub)
        async with (
            running_daemon(tmp_path / "cache", **{"origins.hf.endpoint": hub.url}) as d,
            aiohttp.ClientSession() as http,
        ):
            url = f"{d.api_address}/hf/{REPO}/resolve/main/model.safetensors"
            for round_ in ("cold", "warm"):  # streamed as pieces verify, then from the blob
                out = tmp_path / round_
                proc = await asyncio.create_subprocess_exec(
                    "aria2c",
                    "-x8",
                    "-s8",
                    "-k1M",
                    "--file-allocation=none",
                    "--console-log-level=warn",
                    "--summary-interval=0",
                    "--max-tries=3",
                    "--connect-timeout=10",
                    "--timeout=30",
                    "-d",
                    str(out),
                    "-o",
                    "model.safetensors",
                    url,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                log, _ = await asyncio.wait_for(proc.communicate(), 120)
                assert proc.returncode == 0, log.decode(errors="replace")[-3000:]
                got = (out / "model.safetensors").read_bytes()
                assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

            assert errors_logged(caplog) == []
            assert await counter(http, d.api_address, "internal") == 0
            assert hub.counters.file_bytes == SIZE  # and the hub was read once


async def test_a_connection_reset_or_half_closed_mid_body_is_counted_as_client_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with Hub() as hub:
        await hub_with_big_file(hub)
        async with (
            running_daemon(tmp_path / "cache", **{"origins.hf.endpoint": hub.url}) as d,
            aiohttp.ClientSession() as http,
        ):
            url = f"{d.api_address}/hf/{REPO}/resolve/main/model.safetensors"
            async with http.get(url) as r:  # make the node hold it: the reset then hits a fast sender
                assert r.status == 200
                await r.read()
            host, port = d.api_address.removeprefix("http://").rsplit(":", 1)
            for how in ("reset", "half-close", "reset"):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(f"GET /hf/{REPO}/resolve/main/model.safetensors HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                await writer.drain()
                await reader.readexactly(64 * 1024)  # headers and the start of the body
                sock = writer.get_extra_info("socket")
                if how == "half-close":
                    # FIN first (the server closes its side while still writing: "Cannot write to
                    # closing transport"), then gone.
                    sock.shutdown(socket.SHUT_WR)
                    await reader.readexactly(64 * 1024)
                # SO_LINGER 0: close() sends a RST, as a killed or cancelled client does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()

            async def counted() -> bool:
                return await counter(http, d.api_address, "client_closed") >= 3

            await wait_until(counted, timeout_s=30, what="three client_closed counts")
            assert await counter(http, d.api_address, "internal") == 0
            assert errors_logged(caplog) == []
            assert any("client closed the connection" in r.getMessage() for r in caplog.records)
