"""Signed peer requests and answers (cached/peers/auth.py), with an injected clock.

A request verifies only with the right key, within the time window, with the body it was signed
over, and once: a replay, a tampered method/path/body/time/nonce/node, or a request of another
cluster is refused, each with its reason. The replay cache forgets nonces whose window has passed
and, full of unexpired ones, refuses (503) rather than grow. Answers verify only against the
nonce of the request they answer.
"""

from __future__ import annotations

import pytest

from cached.peers.auth import (
    HEADER_ANSWER,
    HEADER_BODY,
    HEADER_MAC,
    HEADER_NODE,
    HEADER_NONCE,
    HEADER_TIME,
    WINDOW_S,
    AuthRefused,
    ClusterKey,
    RequestVerifier,
    sign_answer,
    sign_request,
    verify_body_answer,
    verify_range_answer,
)

TOKEN = "unit-cluster-token-0123456789"
NOW = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verifier(clock: Clock, **kw: int) -> RequestVerifier:
    return RequestVerifier(ClusterKey(TOKEN, "default"), clock=clock, **kw)


def request(
    body: bytes = b"",
    path: str = "/p2p/v1/gossip",
    method: str = "POST",
    *,
    token: str = TOKEN,
    cluster: str = "default",
    now: float = NOW,
) -> dict[str, str]:
    return sign_request(ClusterKey(token, cluster), "node-a", method, path, body, now=now)


def refused(v: RequestVerifier, method: str, path: str, headers: dict[str, str], body: bytes) -> AuthRefused:
    with pytest.raises(AuthRefused) as e:
        v.verify(method, path, headers, body)
    return e.value


def test_a_signed_request_verifies_once_and_names_its_sender() -> None:
    v = verifier(Clock())
    h = request(b'{"x": 1}')
    assert set(h) == {HEADER_NODE, HEADER_TIME, HEADER_NONCE, HEADER_BODY, HEADER_MAC}
    assert len(h[HEADER_NONCE]) >= 32, "at least 128 random bits"
    got = v.verify("POST", "/p2p/v1/gossip", h, b'{"x": 1}')
    assert (got.node_id, got.nonce) == ("node-a", h[HEADER_NONCE])
    e = refused(v, "POST", "/p2p/v1/gossip", h, b'{"x": 1}')
    assert (e.reason, e.status) == ("replay", 401)


def test_the_token_is_nowhere_in_what_is_sent() -> None:
    h = request(b"body")
    assert not any(TOKEN in v or TOKEN.encode().hex() in v for v in h.values())
    assert request()[HEADER_NONCE] != request()[HEADER_NONCE], "every request gets a fresh nonce"


@pytest.mark.parametrize(
    ("what", "method", "path", "body", "reason"),
    [
        ("method", "GET", "/p2p/v1/gossip", b"{}", "bad_mac"),
        ("path", "POST", "/p2p/v1/gossip?x=1", b"{}", "bad_mac"),
        ("path-case", "POST", "/p2p/v1/Gossip", b"{}", "bad_mac"),
        ("body", "POST", "/p2p/v1/gossip", b"{ }", "body_mismatch"),
        ("empty-body", "POST", "/p2p/v1/gossip", b"", "body_mismatch"),
    ],
)
def test_a_tampered_request_is_refused(what: str, method: str, path: str, body: bytes, reason: str) -> None:
    v = verifier(Clock())
    h = request(b"{}")
    assert refused(v, method, path, h, body).reason == reason, what
    assert len(v) == 0, "a refused request spends no nonce"


@pytest.mark.parametrize("header", [HEADER_TIME, HEADER_NONCE, HEADER_NODE, HEADER_BODY, HEADER_MAC])
def test_a_changed_header_is_refused(header: str) -> None:
    v = verifier(Clock())
    h = request(b"{}")
    original = h[header]
    changed = dict(h)
    if header == HEADER_TIME:
        changed[header] = str(int(original) - 1)
    else:
        changed[header] = original[:-1] + ("0" if original[-1] != "0" else "1")
    assert refused(v, "POST", "/p2p/v1/gossip", changed, b"{}").reason in ("bad_mac", "malformed")


def test_wrong_key_other_cluster_and_missing_headers_are_refused() -> None:
    v = verifier(Clock())
    assert (
        refused(v, "GET", "/p", request(path="/p", method="GET", token="another-token-0123456789"), b"").reason
        == "bad_mac"
    )
    assert refused(v, "GET", "/p", request(path="/p", method="GET", cluster="other"), b"").reason == "bad_mac"
    assert refused(v, "GET", "/p", {}, b"").reason == "missing"
    assert refused(v, "GET", "/p", {"Authorization": f"Bearer {TOKEN}"}, b"").reason == "missing"
    partial = request(path="/p", method="GET")
    del partial[HEADER_NONCE]
    assert refused(v, "GET", "/p", partial, b"").reason == "malformed"


@pytest.mark.parametrize("value", ["\udcff\udcfe", "é" * 64, "", " " * 64, "x" * 10_000, "0" * 63])
@pytest.mark.parametrize("header", [HEADER_TIME, HEADER_NONCE, HEADER_NODE, HEADER_BODY, HEADER_MAC])
def test_garbage_in_any_header_is_a_refusal_never_an_exception(header: str, value: str) -> None:
    h = {**request(path="/p", method="GET"), header: value}
    assert refused(verifier(Clock()), "GET", "/p", h, b"").status == 401


def test_a_request_outside_the_window_is_stale_either_way() -> None:
    clock = Clock()
    v = verifier(clock)
    assert refused(v, "GET", "/p", request(path="/p", method="GET", now=NOW - WINDOW_S - 1), b"").reason == "stale"
    assert refused(v, "GET", "/p", request(path="/p", method="GET", now=NOW + WINDOW_S + 1), b"").reason == "stale"
    v.verify("GET", "/p", request(path="/p", method="GET", now=NOW - WINDOW_S), b"")
    v.verify("GET", "/p", request(path="/p", method="GET", now=NOW + WINDOW_S), b"")


def test_the_replay_cache_forgets_expired_nonces_and_refuses_rather_than_grow() -> None:
    clock = Clock()
    v = verifier(clock, max_nonces=10)
    for _ in range(10):
        v.verify("GET", "/p", request(path="/p", method="GET"), b"")
    e = refused(v, "GET", "/p", request(path="/p", method="GET"), b"")
    assert (e.reason, e.status) == ("nonce_cache_full", 503)
    assert len(v) == 10
    # Once their time has left the window, the nonces are forgotten (a replay would be stale).
    clock.now += 2 * WINDOW_S + 2
    v.verify("GET", "/p", request(path="/p", method="GET", now=clock.now), b"")
    assert len(v) == 1


def test_an_answer_verifies_only_for_its_request_nonce_status_and_body() -> None:
    key = ClusterKey(TOKEN, "default")
    nonce = request()[HEADER_NONCE]
    body = b'{"cluster": "default", "members": []}'
    headers = {HEADER_NODE: "node-b", HEADER_ANSWER: sign_answer(key, "node-b", nonce, 200, body=body)}
    assert verify_body_answer(key, nonce, 200, headers, body) == "node-b"
    assert verify_body_answer(key, request()[HEADER_NONCE], 200, headers, body) is None, "another request's answer"
    assert verify_body_answer(key, nonce, 201, headers, body) is None
    assert verify_body_answer(key, nonce, 200, headers, body + b" ") is None
    assert verify_body_answer(key, nonce, 200, {**headers, HEADER_NODE: "node-c"}, body) is None
    assert verify_body_answer(ClusterKey("another-token-0123456789", "default"), nonce, 200, headers, body) is None
    assert verify_body_answer(key, nonce, 200, {}, body) is None
    assert verify_body_answer(key, nonce, 200, {HEADER_NODE: "\udcff", HEADER_ANSWER: "\udcff"}, body) is None
    # A request MAC is never an answer MAC.
    h = sign_request(key, "node-b", "POST", "/p2p/v1/gossip", body)
    assert (
        verify_body_answer(key, h[HEADER_NONCE], 200, {HEADER_NODE: "node-b", HEADER_ANSWER: h[HEADER_MAC]}, body)
        is None
    )


def test_a_range_answer_signs_its_range_headers() -> None:
    key = ClusterKey(TOKEN, "default")
    nonce = request()[HEADER_NONCE]
    mac = sign_answer(key, "node-b", nonce, 206, content_range="bytes 0-9/100", content_length="10")
    headers = {HEADER_NODE: "node-b", HEADER_ANSWER: mac, "Content-Range": "bytes 0-9/100", "Content-Length": "10"}
    assert verify_range_answer(key, nonce, 206, headers) == "node-b"
    assert verify_range_answer(key, nonce, 206, {**headers, "Content-Range": "bytes 10-19/100"}) is None
    assert verify_range_answer(key, nonce, 206, {**headers, "Content-Length": "11"}) is None
    assert verify_body_answer(key, nonce, 206, headers, b"") is None, "the forms never stand in for each other"


def test_the_key_never_shows_in_its_repr() -> None:
    assert TOKEN not in repr(ClusterKey(TOKEN, "default"))


def test_the_method_is_compared_exactly() -> None:
    v = verifier(Clock())
    assert refused(v, "gET", "/p", request(path="/p", method="GET"), b"").reason == "bad_mac"
