"""The token never leaves the node, and gossip is bounded: each attack of issue 18 as it was done.

- A fake "seed" (an aiohttp server on 127.0.0.1 that records every request raw) is contacted by
  the daemon: the token is in nothing it receives, and its unsigned or wrongly signed answers add
  no member.
- A captured signed request re-sent is refused (replay), and so is one with its path, body or
  time changed.
- A token holder gossips 5,000 invented members to one node of a 3-node cluster (then twenty such
  messages): every real node stays alive in every real node's view, and membership stays capped.
- An incarnation of 4,300 digits, of 2**63, or a day in the future, is refused and counted; the
  node's own incarnation does not move, it keeps gossiping, and a restart is fine.
- A peer that signs correctly but answers gossip with 500 MiB: the client stops past its cap.
- A non-UTF-8 ``Authorization`` header: 401, counted, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cached.daemon import Daemon
from cached.peers.client import CAPS
from cached.peers.membership import MAX_MEMBERS
from tests.support.cluster import FAST, TOKEN, all_see_all, cluster, node_flags, token_file  # noqa: F401 - the fixture
from tests.support.node import running_daemon
from tests.support.peerauth import sign_answers, signed
from tests.support.wait import wait_until

MIB = 1 << 20


def counter(d: Daemon, name: str, **labels: str) -> float:
    return d.metrics.registry.get_sample_value(name, labels) or 0.0


class FakePeer:
    """An aiohttp server on 127.0.0.1 posing as a node: records each request's raw head and body,
    and answers gossip with ``answer`` (signed with ``sign_token``, if any)."""

    def __init__(self, answer: Any = None, *, sign_token: str | None = None) -> None:
        self.answer = answer
        self.sign_token = sign_token
        self.requests: list[tuple[str, list[tuple[bytes, bytes]], bytes]] = []  # (target, raw headers, body)
        self.address = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakePeer:
        app = web.Application()
        if self.sign_token is not None:
            sign_answers(app, self.sign_token)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.raw_path, list(request.raw_headers), await request.read()))
        return web.json_response(self.answer if self.answer is not None else {"cluster": "default", "members": []})


def invented(n: int, *, prefix: str = "fake", heartbeat: int = 1) -> list[dict[str, Any]]:
    # Loopback addresses where nothing listens: dialling one is refused at once, nowhere else.
    return [
        {
            "node_id": f"{prefix}-{i:05d}",
            "address": f"127.0.0.1:{1 + i % 1000}",
            "cluster": "default",
            "incarnation": 1,
            "heartbeat": heartbeat,
        }
        for i in range(n)
    ]


async def gossip_as_token_holder(
    s: aiohttp.ClientSession, d: Daemon, members: list[Any], *, node_id: str = "attacker"
) -> int:
    url = f"http://{d.peer_address}/p2p/v1/gossip"
    body = json.dumps({"cluster": "default", "members": members}).encode()
    async with s.post(
        url,
        data=body,
        headers={**signed(TOKEN, "POST", url, body, node_id=node_id), "Content-Type": "application/json"},
    ) as resp:
        await resp.read()
        return resp.status


def real_states(d: Daemon, nodes: dict[str, Daemon]) -> dict[str, str]:
    assert d.gossip is not None
    return {n: m.status.value if (m := d.gossip.membership.get(n)) else "absent" for n in nodes if n != d.cfg.node_id}


def reals_alive(nodes: dict[str, Daemon]) -> bool:
    """Every real node lists every other real one alive (whatever invented ones it also lists)."""
    return all(set(real_states(d, nodes).values()) == {"alive"} for d in nodes.values())


# --- (a) the token never leaves the node --------------------------------------------------------


@pytest.mark.parametrize("signing", ["unsigned", "wrong-key"])
async def test_a_fake_seed_never_sees_the_token_and_its_answer_adds_no_member(
    tmp_path: Path, token_file: Path, signing: str
) -> None:
    lure = {"node_id": "lure", "address": "127.0.0.1:9", "cluster": "default", "incarnation": 1, "heartbeat": 5}
    fake_answer = {"cluster": "default", "members": [lure]}
    sign_token = None if signing == "unsigned" else "not-the-cluster-token-0123456789"
    async with (
        FakePeer(fake_answer, sign_token=sign_token) as fake,
        running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file, **{"peer.seeds": []})) as a,
    ):
        assert a.gossip is not None
        a.gossip.add_seed(fake.address)  # as an mDNS announcement with an arbitrary address does
        await wait_until(lambda: len(fake.requests) >= 3, timeout_s=10, what="the daemon gossiping to the fake seed")
        for target, headers, body in fake.requests:
            raw = target.encode() + b"".join(k + b": " + v + b"\n" for k, v in headers) + body
            assert TOKEN.encode() not in raw, f"the cluster token reached a stranger: {raw[:300]!r}"
            assert b"authorization" not in raw.lower(), "no bearer credential of any kind"
            assert any(k.lower() == b"x-cached-auth" for k, _ in headers), "the request is signed instead"
        await wait_until(
            lambda: counter(a, "cached_peer_unauthenticated_total") >= 3, timeout_s=10, what="unproven answers counted"
        )
        assert counter(a, "cached_gossip_errors_total", kind="unauthenticated") >= 3
        assert a.gossip.membership.get("lure") is None, "nothing of an unproven answer is merged"
        assert a.gossip.membership.members() == []
        # The seed keeps being probed (it may prove itself later), never promoted.
        n = len(fake.requests)
        await wait_until(lambda: len(fake.requests) >= n + 2, timeout_s=10, what="the seed is still probed")
        assert a.gossip.membership.members() == []


# --- (b) replay and tampering -------------------------------------------------------------------


async def test_a_replayed_or_tampered_signed_request_is_refused_and_counted(tmp_path: Path, token_file: Path) -> None:
    async with running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file)) as a, aiohttp.ClientSession() as s:
        url = f"http://{a.peer_address}/p2p/v1/gossip"
        member = {"node_id": "x", "address": "127.0.0.1:9", "cluster": "default", "incarnation": 1}
        body = json.dumps({"cluster": "default", "members": [member]}).encode()
        captured = signed(TOKEN, "POST", url, body)
        async with s.post(url, data=body, headers=captured) as resp:
            assert resp.status == 200, await resp.text()
        async with s.post(url, data=body, headers=captured) as resp:
            assert resp.status == 401
        assert counter(a, "cached_peer_auth_refused_total", reason="replay") == 1

        fresh = signed(TOKEN, "POST", url, body)
        evil = json.dumps({"cluster": "default", "members": [{**member, "node_id": "evil"}]}).encode()
        async with s.post(url, data=evil, headers=fresh) as resp:
            assert resp.status == 401, "a body other than the one signed"
        async with s.post(url + "?x=1", data=body, headers=fresh) as resp:
            assert resp.status == 401, "a path other than the one signed"
        async with s.post(
            url, data=body, headers={**fresh, "X-Cached-Time": str(int(fresh["X-Cached-Time"]) + 1)}
        ) as resp:
            assert resp.status == 401, "a time other than the one signed"
        old = signed(TOKEN, "POST", url, body, now=time.time() - 600)
        async with s.post(url, data=body, headers=old) as resp:
            assert resp.status == 401, "a request signed ten minutes ago"
        assert counter(a, "cached_peer_auth_refused_total", reason="body_mismatch") == 1
        assert counter(a, "cached_peer_auth_refused_total", reason="bad_mac") == 2
        assert counter(a, "cached_peer_auth_refused_total", reason="stale") == 1
        assert counter(a, "cached_peer_auth_failures_total") == 5
        assert a.gossip is not None and [m.info.node_id for m in a.gossip.membership.members()] == ["x"]


# --- (c) thousands of invented members ------------------------------------------------------------


async def test_five_thousand_invented_members_do_not_split_a_cluster(tmp_path: Path, token_file: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes = await cluster(stack, tmp_path, token_file, "abc")
        a = nodes["a"]
        s = await stack.enter_async_context(aiohttp.ClientSession())
        assert await gossip_as_token_holder(s, a, invented(5000)) == 200
        assert a.gossip is not None and len(a.gossip.membership.members()) >= 5000, "the attack landed"
        # A split shows within dead_after_s (2.5 s here); watch for longer than that, every poll.
        rounds = {n: d.gossip.rounds for n, d in nodes.items()}  # type: ignore[union-attr]
        horizon = int(2 * FAST["peer.dead_after_s"] / FAST["peer.gossip_interval_s"])

        def still_whole() -> bool:
            assert reals_alive(nodes), {n: real_states(d, nodes) for n, d in nodes.items()}
            return all(d.gossip.rounds >= rounds[n] + horizon for n, d in nodes.items())  # type: ignore[union-attr]

        await wait_until(still_whole, timeout_s=60, interval_s=0.1, what=f"{horizon} gossip rounds on every node")
        for d in nodes.values():
            assert d.gossip is not None and len(d.gossip.membership.members()) <= MAX_MEMBERS

        # Twenty such messages, each with new names: membership is capped, the excess counted.
        for i in range(20):
            status = await gossip_as_token_holder(s, a, invented(5000, prefix=f"wave{i}"), node_id=f"attacker-{i}")
            assert status == 200
        assert len(a.gossip.membership.members()) <= MAX_MEMBERS
        assert counter(a, "cached_gossip_members_dropped_total", reason="full") >= 20 * 5000 + 5000 - MAX_MEMBERS
        assert reals_alive(nodes), {n: real_states(d, nodes) for n, d in nodes.items()}
        for d in nodes.values():
            assert d.gossip is not None and len(d.gossip.membership.members()) <= MAX_MEMBERS
            assert len(d.gossip.view.nodes()) <= len(nodes), "no holdings kept for invented members"


async def test_one_message_may_not_carry_more_than_the_per_message_cap(tmp_path: Path, token_file: Path) -> None:
    from cached.peers.gossip import MAX_MEMBERS_PER_MESSAGE

    async with running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file)) as a, aiohttp.ClientSession() as s:
        assert await gossip_as_token_holder(s, a, invented(MAX_MEMBERS_PER_MESSAGE + 700)) == 200
        assert a.gossip is not None and len(a.gossip.membership.members()) == MAX_MEMBERS_PER_MESSAGE
        assert counter(a, "cached_gossip_members_dropped_total", reason="message") == 700


# --- (d) absurd incarnations ----------------------------------------------------------------------


async def test_absurd_incarnations_are_refused_and_a_node_keeps_its_own(tmp_path: Path, token_file: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes = await cluster(stack, tmp_path, token_file, "ab")
        a, b = nodes["a"], nodes["b"]
        assert a.gossip is not None and b.gossip is not None
        mine = a.gossip.membership.me.incarnation
        s = await stack.enter_async_context(aiohttp.ClientSession())
        day_ahead = (time.time_ns() // 1_000_000) + 2 * 86_400_000
        for poison in (int("9" * 4300), 2**63, day_ahead):
            entry = {
                "node_id": "a",
                "address": a.peer_address,
                "cluster": "default",
                "incarnation": poison,
                "heartbeat": 1,
            }
            for target in (a, b):  # to the node itself, and to a peer that would pass it on
                assert await gossip_as_token_holder(s, target, [entry]) == 200
        assert a.gossip.membership.me.incarnation == mine
        assert b.gossip.membership.get("a").info.incarnation == mine  # type: ignore[union-attr]
        assert counter(a, "cached_gossip_errors_total", kind="malformed") == 2
        assert counter(b, "cached_gossip_errors_total", kind="malformed") == 2
        assert counter(a, "cached_gossip_members_dropped_total", reason="future") == 1
        assert counter(b, "cached_gossip_members_dropped_total", reason="future") == 1
        # Past what a JSON integer may hold here, the message itself is a 400, counted.
        url = f"http://{a.peer_address}/p2p/v1/gossip"
        body = (
            b'{"cluster": "default", "members": [{"node_id": "a", "address": "x:1", "cluster": "default", "incarnation": '
            + b"9" * 5000
            + b"}]}"
        )
        async with s.post(url, data=body, headers=signed(TOKEN, "POST", url, body)) as resp:
            assert resp.status == 400
        assert a.gossip.membership.me.incarnation == mine
        # a keeps gossiping: its heartbeat goes on reaching b.
        hb = b.gossip.membership.get("a").info.heartbeat  # type: ignore[union-attr]
        await wait_until(
            lambda: b.gossip.membership.get("a").info.heartbeat >= hb + 5, timeout_s=10, what="a's heartbeats reach b"
        )  # type: ignore[union-attr]
        assert all_see_all(nodes)

    # A restart on the same cache is fine too (the poison was never stored anywhere).
    async with contextlib.AsyncExitStack() as stack:
        nodes = await cluster(stack, tmp_path, token_file, "ab")
        assert (
            nodes["a"].gossip is not None
            and nodes["a"].gossip.membership.me.incarnation < int(time.time() * 1000) + 1000
        )


# --- (e) a huge gossip answer -------------------------------------------------------------------------


async def test_a_huge_signed_gossip_answer_is_cut_at_the_cap(tmp_path: Path, token_file: Path) -> None:
    total = 500 * MIB
    chunk = bytes(MIB)
    digest = await asyncio.to_thread(lambda: _zeros_sha256(total, chunk))
    sent: list[int] = []

    async def huge(request: web.Request) -> web.StreamResponse:
        from cached.peers.auth import HEADER_ANSWER, HEADER_NODE, HEADER_NONCE, ClusterKey

        key = ClusterKey(TOKEN, "default")
        nonce = request.headers.get(HEADER_NONCE, "")
        # Signed correctly over the whole 500 MiB body: only the size is wrong.
        mac = key.sign("cached-answer", nonce, "200", "body", digest, "huge")
        resp = web.StreamResponse(
            status=200, headers={HEADER_NODE: "huge", HEADER_ANSWER: mac, "Content-Type": "application/json"}
        )
        resp.enable_chunked_encoding()  # no Content-Length: the client has to count
        await resp.prepare(request)
        n = 0
        try:
            while n < total:
                await resp.write(chunk)
                n += len(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        finally:
            sent.append(n)
        return resp

    app = web.Application()
    app.router.add_post("/p2p/v1/gossip", huge)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        fake = f"127.0.0.1:{runner.addresses[0][1]}"
        async with running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file, **{"peer.seeds": [fake]})) as a:
            await wait_until(
                lambda: counter(a, "cached_peer_answer_too_large_total", route="gossip") >= 2,
                timeout_s=30,
                what="answers cut at the cap",
            )
            assert counter(a, "cached_gossip_errors_total", kind="too_large") >= 2
            await wait_until(lambda: len(sent) >= 2, timeout_s=10, what="the fake peer noticing the hang-up")
            # The client stopped reading past the cap: what the peer could push is the cap plus
            # what socket buffers hold, never the 500 MiB.
            assert max(sent) < CAPS["gossip"] + 32 * MIB, sent
            assert a.gossip is not None and a.gossip.membership.members() == []
    finally:
        await runner.cleanup()


def _zeros_sha256(total: int, chunk: bytes) -> str:
    h = hashlib.sha256()
    for _ in range(total // len(chunk)):
        h.update(chunk)
    return h.hexdigest()


# --- (f) a non-UTF-8 Authorization header ------------------------------------------------------------


async def test_non_utf8_authorization_is_401_without_a_traceback(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file)) as a:
        host, _, port = (a.peer_address or "").rpartition(":")
        for header in (
            b"Authorization: Bearer \xff\xfe\x80" + TOKEN.encode(),
            b"X-Cached-Auth: \xff" * 3,
            b"X-Cached-Node: \xc3\x28",
        ):
            raw = await asyncio.to_thread(
                _raw_get,
                host,
                int(port),
                b"GET /p2p/v1/holdings?since=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header + b"\r\n\r\n",
            )
            assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
        assert counter(a, "cached_peer_auth_failures_total") == 3
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


def _raw_get(host: str, port: int, request: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out
