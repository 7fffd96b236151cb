"""Who may do what on the local API: the admin split, and requests no local client sends.

Replays of issue 18: a web page's ``text/plain`` POST of ``{"ref", "force": true}`` to
``/v1/evict`` with a foreign ``Host`` (DNS rebinding) and ``Origin`` (CSRF) used to evict a pinned,
leased model. Admin routes (``evict --force``, ``pin``, ``unpin``, ``replicate``, ``gc``,
``verify``) answered anyone. A client hanging up on ``/v1/events`` and a 5,000-digit integer in a
body each gave a 500 with a traceback in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cached.api.client import ApiClient
from cached.daemon import Daemon
from tests.support.asuser import NOBODY, request_as
from tests.support.node import ADMIN_TOKEN, running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

FLAGS = {"store.piece_size_bytes": "64K"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def ready_model(d: Daemon, origin: Origin, name: str = "m.bin") -> str:
    async with ApiClient(d.api_address) as api:
        model = await api.request("POST", "/v1/prefetch", body={"ref": origin.file_url(name), "wait": True})
        assert model["state"] == "ready"
        await api.request("POST", "/v1/pin", body={"ref": model["ref"]})
        return model["ref"]


def api_errors(d: Daemon, code: str) -> float:
    return d.metrics.registry.get_sample_value("cached_api_errors_total", {"code": code}) or 0.0


async def raw(
    base: str, method: str, path: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, base + path, data=data, headers=headers or {}) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def test_a_cross_site_text_plain_evict_force_is_refused_and_the_model_stays(tmp_path: Path) -> None:
    write_random_file(tmp_path / "origin" / "m.bin", 200_000, seed=3)
    async with Origin(tmp_path / "origin") as origin, running_daemon(tmp_path / "cache", **FLAGS) as d:
        ref = await ready_model(d, origin)
        body = json.dumps({"ref": ref, "force": True}).encode()
        attacks = [
            # The page as it was sent: a no-preflight POST after DNS rebinding of evil.example.
            ({"Host": "evil.example", "Origin": "http://evil.example", "Content-Type": "text/plain"}, 421),
            # The same from a page on another site against 127.0.0.1 itself (plain CSRF).
            ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),
            ({"Origin": "http://evil.example", "Content-Type": "application/json", **ADMIN}, 403),
            ({"Content-Type": "text/plain", **ADMIN}, 415),
            ({"Content-Type": "application/x-www-form-urlencoded", **ADMIN}, 415),
            ({"Host": "evil.example", "Content-Type": "application/json", **ADMIN}, 421),
        ]
        before = sum(api_errors(d, c) for c in ("host_not_allowed", "origin_not_allowed", "unsupported_media_type"))
        for headers, status in attacks:
            got, answer = await raw(d.api_address, "POST", "/v1/evict", data=body, headers=headers)
            assert got == status, (headers, got, answer)
            assert isinstance(answer, dict) and answer["message"], answer
        after = sum(api_errors(d, c) for c in ("host_not_allowed", "origin_not_allowed", "unsupported_media_type"))
        assert after - before == len(attacks), "every refusal is counted"
        async with ApiClient(d.api_address) as api:
            model = await api.request("GET", "/v1/models/status", params={"ref": ref})
        assert model["state"] == "ready" and model["pinned"], model
        assert d.store.model(__import__("cached.types", fromlist=["ModelRef"]).ModelRef.parse(ref)) is not None

        # Local names and the socket's own address still work, and so does the operator.
        for host in ("localhost", "127.0.0.1", f"127.0.0.1:{d.api_address.rsplit(':', 1)[1]}"):
            got, _ = await raw(d.api_address, "GET", "/v1/node", headers={"Host": host, "Origin": f"http://{host}"})
            assert got == 200, host
        got, answer = await raw(
            d.api_address, "POST", "/v1/evict", data=body, headers={"Content-Type": "application/json", **ADMIN}
        )
        assert got == 200 and answer["state"] == "absent", answer


async def test_admin_routes_need_a_credential(tmp_path: Path) -> None:
    write_random_file(tmp_path / "origin" / "m.bin", 100_000, seed=4)
    async with Origin(tmp_path / "origin") as origin, running_daemon(tmp_path / "cache", **FLAGS) as d:
        ref = await ready_model(d, origin)
        routes = [
            ("/v1/pin", {"ref": ref}),
            ("/v1/unpin", {"ref": ref}),
            ("/v1/evict", {"ref": ref, "force": True}),
            ("/v1/replicate", {"ref": ref, "replicas": 1}),
            ("/v1/gc", {}),
            ("/v1/verify", {}),
        ]
        js = {"Content-Type": "application/json"}
        for path, body in routes:
            data = json.dumps(body).encode()
            got, answer = await raw(d.api_address, "POST", path, data=data, headers=js)
            assert got == 401 and answer["error"] == "admin_required", (path, got, answer)
            assert "--admin-token-file" in answer["message"], answer
            got, answer = await raw(
                d.api_address, "POST", path, data=data, headers={**js, "Authorization": "Bearer wrong-token-0123456789"}
            )
            assert got == 403 and answer["error"] == "forbidden", (path, got, answer)
            got, answer = await raw(
                d.api_address, "POST", path, data=data, headers={**js, "Authorization": "Bearer \udcff\udcfe"}
            )
            assert got in (400, 403), (path, got, answer)  # a non-UTF-8 token: refused, never a 500
        async with ApiClient(d.api_address) as api:
            assert (await api.request("GET", "/v1/models/status", params={"ref": ref}))["pinned"]
        # Everything else stays open: status, prefetch, leases, evict without force (refused: pinned).
        got, _ = await raw(d.api_address, "GET", "/v1/models")
        assert got == 200
        got, answer = await raw(d.api_address, "POST", "/v1/evict", data=json.dumps({"ref": ref}).encode(), headers=js)
        assert got == 409, answer
        for path, body in routes[:2] + routes[4:]:
            got, answer = await raw(
                d.api_address, "POST", path, data=json.dumps(body).encode(), headers={**js, **ADMIN}
            )
            assert got in (200, 409), (path, got, answer)  # replicate: 409 on a node without a cluster


async def test_unix_socket_admins_are_root_the_daemon_user_or_the_admin_group(tmp_path: Path) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root: a second user connects as uid 65534")
    sock_dir = Path("/tmp") / f"cached-admin-{os.getpid()}"
    sock_dir.mkdir(mode=0o755, exist_ok=True)
    sock = sock_dir / "api.sock"
    try:
        flags = {**FLAGS, "api.listen": f"unix:{sock}", "api.socket_mode": "0666"}
        async with running_daemon(tmp_path / "cache", **flags):

            def ask(uid: int, headers: dict[str, str] | None = None) -> Any:
                return request_as(uid, uid, unix=str(sock), method="POST", target="/v1/gc", body={}, headers=headers)

            as_nobody = await asyncio.to_thread(ask, NOBODY)
            assert as_nobody.status == 403 and "uid 65534" in as_nobody.body["message"], as_nobody
            assert (await asyncio.to_thread(ask, 0)).status == 200
            assert (await asyncio.to_thread(ask, NOBODY, ADMIN)).status == 200, "the token works for anyone"
            # Any Host on the unix socket; open routes open to nobody too.
            a = await asyncio.to_thread(
                lambda: request_as(NOBODY, NOBODY, unix=str(sock), target="/v1/node", headers={"Host": "whatever"})
            )
            assert a.status == 200, a
    finally:
        import shutil

        shutil.rmtree(sock_dir, ignore_errors=True)


async def test_a_huge_integer_is_a_400_and_no_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_daemon(tmp_path / "cache", **FLAGS) as d:
        js = {"Content-Type": "application/json", **ADMIN}
        huge = "9" * 5000
        cases = [
            ("/v1/prefetch", '{"ref": "hf://a/b", "timeout_s": %s}' % huge),
            ("/v1/replicate", '{"ref": "hf://a/b", "replicas": %s}' % huge),
            ("/v1/leases", '{"ref": "hf://a/b", "holder": "h", "ttl_s": %s}' % huge),
            ("/v1/leases", '{"ref": "hf://a/b", "holder": "h", "ttl_s": %d}' % 2**63),
            ("/v1/leases", '{"ref": "hf://a/b", "holder": "h", "ttl_s": 1e999}'),
            ("/v1/prefetch", '{"ref": "hf://a/b", "timeout_s": NaN}'),
        ]
        with caplog.at_level(logging.DEBUG):
            for path, body in cases:
                got, answer = await raw(d.api_address, "POST", path, data=body.encode(), headers=js)
                assert got == 400 and answer["error"] == "bad_request", (path, body[:60], got, answer)
        assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"
        assert api_errors(d, "internal") == 0


async def test_a_client_hanging_up_on_the_event_stream_is_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_daemon(tmp_path / "cache", **FLAGS) as d:
        host, port = d.api_address.removeprefix("http://").rsplit(":", 1)
        with caplog.at_level(logging.DEBUG):
            for _ in range(5):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                # Hang up hard (RST), then make the stream write: a job event for every subscriber.
                writer.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                writer.close()
                d.jobs.events.publish({"event": "test", "ref": "hf://a/b"})
            await wait_until(lambda: not d.jobs.events._subscribers, timeout_s=20)
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], [
            r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
        ]
        assert api_errors(d, "internal") == 0
