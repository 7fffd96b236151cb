"""Property tests over the peer API and its signatures (hypothesis).

- Any request a token holder can sign (any route, path segments, query, JSON or raw body, Range)
  gets an answer below 500 from a real daemon, signed when accepted, with no traceback logged,
  and the daemon keeps gossiping.
- Any one-byte change to a signed request's method, path, body, time or nonce fails verification
  (unit level: ``RequestVerifier`` with a fixed clock).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached.peers.auth import HEADER_NONCE, AuthRefused, ClusterKey, RequestVerifier, sign_request, verify_body_answer
from tests.support.cluster import TOKEN, node_flags, token_file  # noqa: F401 - the fixture
from tests.support.node import running_daemon
from tests.support.wait import wait_until

SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=False)
KEY = ClusterKey(TOKEN, "default")

ROUTES = [
    "POST /gossip",
    "GET /holdings",
    "GET /blobs/{s}",
    "GET /blobs/{s}/pieces",
    "GET /partials/{s}",
    "GET /partials/{s}/pieces",
    "GET /manifests/{s}",
    "GET /refs",
    "GET /status",
    "GET /{s}",
    "POST /{s}/{s}",
    "GET /{s}/{s}/{s}",
]
segments = st.one_of(
    st.sampled_from(["0" * 64, "blake3:" + "0" * 64, "..", ".", "%2e%2e", "%00", "a" * 300, "", "%ff"]),
    st.text(max_size=40).map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
members = st.fixed_dictionaries(
    {
        "node_id": st.text(max_size=20) | json_values,
        "address": st.sampled_from(["127.0.0.1:1", "", "x" * 400]) | json_values,
        "cluster": st.sampled_from(["default", "other"]) | json_values,
        "incarnation": st.integers(min_value=-5, max_value=2**70) | json_values,
    },
    optional={
        "heartbeat": json_values,
        "labels": st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=40) | json_values,
    },
)
gossip_bodies = st.fixed_dictionaries(
    {
        "cluster": st.sampled_from(["default", "other"]) | json_values,
        "members": st.lists(members, max_size=4) | json_values,
    },
    optional={"catalog": json_values},
)


@st.composite
def signed_requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    method, template = draw(st.sampled_from(ROUTES)).split(" ")
    path = "/p2p/v1" + template
    while "{s}" in path:
        path = path.replace("{s}", draw(segments), 1)
    if draw(st.booleans()):
        path += "?" + "&".join(
            f"{draw(st.sampled_from(['ref', 'since', 'x']))}={draw(segments)}" for _ in range(draw(st.integers(1, 3)))
        )
    body = b""
    if method == "POST":
        body = draw(
            st.one_of(
                gossip_bodies.map(lambda v: json.dumps(v).encode()),
                json_values.map(lambda v: json.dumps(v).encode()),
                st.binary(max_size=200),
            )
        )
    headers = sign_request(KEY, draw(st.sampled_from(["fuzz", "n" * 253])), method, path, body)
    if draw(st.booleans()):
        headers["Range"] = draw(
            st.sampled_from(["bytes=0-0", "bytes=0-", "bytes=5-1", "bytes=99999999999999999999-", "lines=1"])
        )
    return method, path, body, headers


def send(
    address: str, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    host, _, port = address.rpartition(":")
    assert host.startswith("127.")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


async def test_any_signed_request_gets_an_answer_below_500(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    statuses: list[int] = []
    async with running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file)) as a:
        address = a.peer_address or ""

        @settings(max_examples=100, **SETTINGS)
        @given(signed_requests())
        def run(req: tuple[str, str, bytes, dict[str, str]]) -> None:
            method, path, body, headers = req
            status, answer_headers, answer = send(address, method, path, body, headers)
            statuses.append(status)
            assert status < 500, (method, path, body[:200], status, answer[:300])
            if status in (200, 400, 403, 404):
                assert verify_body_answer(KEY, headers[HEADER_NONCE], status, answer_headers, answer) == "a", (
                    "every accepted request's answer is signed"
                )

        await asyncio.to_thread(run)
        assert a.gossip is not None
        rounds = a.gossip.rounds
        await wait_until(lambda: a.gossip.rounds >= rounds + 3, timeout_s=10, what="gossip goes on")
    assert statuses and 401 not in statuses, "every request was signed correctly"
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage()[:300] for r in bad]


FIELDS = ["method", "path", "body", "time", "nonce"]


@settings(max_examples=100, **SETTINGS)
@given(
    method=st.sampled_from(["GET", "POST"]),
    path=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60).map(
        lambda p: "/p2p/v1/" + p
    ),
    body=st.binary(max_size=300),
    field=st.sampled_from(FIELDS),
    where=st.integers(min_value=0),
    new=st.integers(min_value=0, max_value=255),
)
def test_any_one_byte_change_fails_verification(
    method: str, path: str, body: bytes, field: str, where: int, new: int
) -> None:
    now = 1_700_000_000
    headers = sign_request(KEY, "fuzz", method, path, body, now=now)
    v = RequestVerifier(KEY, clock=lambda: now)
    parts: dict[str, Any] = {
        "method": method.encode(),
        "path": path.encode(),
        "body": body,
        "time": headers["X-Cached-Time"].encode(),
        "nonce": headers[HEADER_NONCE].encode(),
    }
    original = parts[field]
    if not original:
        original = b"x"  # an empty body gains a byte: also a change
        changed = bytes([new])
    else:
        i = where % len(original)
        if original[i] == new:
            new = (new + 1) % 256
        changed = original[:i] + bytes([new]) + original[i + 1 :]
    parts[field] = changed
    h = dict(headers)
    h["X-Cached-Time"] = parts["time"].decode("latin-1")
    h[HEADER_NONCE] = parts["nonce"].decode("latin-1")
    with pytest.raises(AuthRefused):
        v.verify(parts["method"].decode("latin-1"), parts["path"].decode("latin-1"), h, parts["body"])
