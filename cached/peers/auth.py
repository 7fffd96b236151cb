"""Proof of holding the cluster token, without ever sending it: signed peer requests and answers.

The token file holds a shared secret; nothing derived from it that could be replayed or reversed
leaves the node. Every peer message carries an HMAC-SHA256 over its parts under ``ClusterKey``, a
key derived from the token and the cluster name, so a node of another cluster (or a host that
merely saw our traffic) can neither produce nor reuse one. The token is never put on the wire;
an ``Authorization: Bearer`` header is ignored (a request that carries only that is refused).

Wire format of a request (``/p2p/v1``; header names are case-insensitive):

- ``X-Cached-Node``: the sender's node id (1..253 printable ASCII characters)
- ``X-Cached-Time``: unix time in whole seconds when it was signed
- ``X-Cached-Nonce``: 32..128 lower-case hex characters (128 random bits or more), never reused
- ``X-Cached-Body-SHA256``: hex SHA-256 of the request body (of b"" when there is none)
- ``X-Cached-Auth``: hex HMAC over ("cached-request", METHOD, path-with-query exactly as sent,
  time, nonce, body digest, node id)

The server accepts a request only if the MAC is right, the time is within ``WINDOW_S`` (60 s) of
its own clock either way, the body hashes to the signed digest, and the nonce was not seen within
the window. Seen nonces are kept until their time leaves the window (at most ``MAX_NONCES``; when
the cache is full of unexpired nonces the request is refused with 503, never remembered by
growing). Any failure is 401 (503 for a full cache); nothing in a refused request is used.

Wire format of an answer to an accepted request:

- ``X-Cached-Node``: the answering node's id
- ``X-Cached-Answer``: hex HMAC over ("cached-answer", request nonce, status, form, ...,
  answering node id), where form is ``"body"`` followed by the hex SHA-256 of the whole body
  (JSON and bytes answers), or ``"range"`` followed by Content-Range and Content-Length (206
  piece answers, whose bytes the caller verifies against BLAKE3 piece digests).

A client uses nothing of an answer (members, holdings, manifests, piece tables, range headers)
until its MAC checks; refused requests (401) are not signed and are only ever a failure. The
request MAC and the answer MAC start with different labels, so one can never stand in for the
other; the answer is bound to the request by its nonce, so an old answer cannot be replayed.

This module owns the key, the wire format and the replay cache; it does no I/O. The HTTP edges
are ``peers.client`` and ``api.peer``; mDNS announcements (``peers.mdns``) sign their own parts.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_DOMAIN = b"cached-peer-auth-v1"

HEADER_NODE = "X-Cached-Node"
HEADER_TIME = "X-Cached-Time"
HEADER_NONCE = "X-Cached-Nonce"
HEADER_BODY = "X-Cached-Body-SHA256"
HEADER_MAC = "X-Cached-Auth"
HEADER_ANSWER = "X-Cached-Answer"

WINDOW_S = 60
MAX_NONCES = 200_000  # ~40 MB at most; far above what a node's peers send in 2 windows
NONCE_BYTES = 16

_NODE = re.compile(r"^[\x21-\x7e]{1,253}$")
_NONCE = re.compile(r"^[0-9a-f]{32,128}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TIME = re.compile(r"^[0-9]{1,12}$")
_REQUEST = "cached-request"
_ANSWER = "cached-answer"


class ClusterKey:
    """The MAC key of one cluster. ``sign`` and ``verify`` take the message as ordered parts;
    each part is length-prefixed, so ("ab", "c") and ("a", "bc") never share a MAC."""

    __slots__ = ("_key",)

    def __init__(self, token: str, cluster: str) -> None:
        self._key = hmac.new(token.encode(), _DOMAIN + b"\0" + cluster.encode(), hashlib.sha256).digest()

    def sign(self, *parts: str | bytes) -> str:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for p in parts:
            b = p.encode("utf-8", "surrogateescape") if isinstance(p, str) else p
            mac.update(len(b).to_bytes(8, "big"))
            mac.update(b)
        return mac.hexdigest()

    def verify(self, mac: str | None, *parts: str | bytes) -> bool:
        """Constant time; a missing, malformed or non-ASCII ``mac`` is simply wrong."""
        if not isinstance(mac, str) or len(mac) != 64 or not mac.isascii():
            return False
        return hmac.compare_digest(mac.lower(), self.sign(*parts))

    def __repr__(self) -> str:  # never the key itself, not even in a traceback
        return "ClusterKey(<secret>)"


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


# --- requests ------------------------------------------------------------------------------------


def sign_request(
    key: ClusterKey,
    node_id: str,
    method: str,
    path_qs: str,
    body: bytes = b"",
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The headers that authenticate one request; compute them afresh for every request sent."""
    ts = str(int(time.time() if now is None else now))
    nonce = nonce or new_nonce()
    digest = body_digest(body)
    mac = key.sign(_REQUEST, method.upper(), path_qs, ts, nonce, digest, node_id)
    return {HEADER_NODE: node_id, HEADER_TIME: ts, HEADER_NONCE: nonce, HEADER_BODY: digest, HEADER_MAC: mac}


class AuthRefused(Exception):
    """A request that does not prove the token. ``status`` is 401, or 503 when the replay cache
    is full; ``reason`` is a short metric label."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedRequest:
    """What an accepted request proved: who signed it, and the nonce its answer is bound to."""

    node_id: str
    nonce: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """A request whose headers are signed correctly; its body is not checked yet."""

    node_id: str
    nonce: str
    body_sha256: str
    time: int


class RequestVerifier:
    """Checks signed requests; remembers nonces for the window (bounded)."""

    def __init__(
        self,
        key: ClusterKey,
        *,
        window_s: int = WINDOW_S,
        max_nonces: int = MAX_NONCES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._window_s = window_s
        self._max_nonces = max_nonces
        self._clock = clock
        self._seen: set[str] = set()
        self._expiry: list[tuple[int, str]] = []  # heap of (unix time the nonce may be forgotten, nonce)

    def __len__(self) -> int:
        return len(self._seen)

    def verify(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> SignedRequest:
        """Raises ``AuthRefused``; on success the nonce is spent."""
        return self.accept(self.check(method, path_qs, headers), body)

    def check(self, method: str, path_qs: str, headers: Mapping[str, str]) -> Claim:
        """The headers alone (before any body is read): format, freshness and MAC."""
        node, ts, nonce, digest, mac = (
            _header(headers, h) for h in (HEADER_NODE, HEADER_TIME, HEADER_NONCE, HEADER_BODY, HEADER_MAC)
        )
        if mac is None:
            raise AuthRefused("missing")
        if node is None or ts is None or nonce is None or digest is None:
            raise AuthRefused("malformed")
        if not (_NODE.match(node) and _TIME.match(ts) and _NONCE.match(nonce) and _HEX64.match(digest)):
            raise AuthRefused("malformed")
        if abs(int(self._clock()) - int(ts)) > self._window_s:
            raise AuthRefused("stale")
        if not self._key.verify(mac, _REQUEST, method, path_qs, ts, nonce, digest, node):
            raise AuthRefused("bad_mac")
        return Claim(node_id=node, nonce=nonce, body_sha256=digest, time=int(ts))

    def accept(self, claim: Claim, body: bytes) -> SignedRequest:
        """The body against the signed digest, then the nonce spent (so only a request that
        proved the token can take a place in the replay cache)."""
        if not hmac.compare_digest(claim.body_sha256, body_digest(body)):
            raise AuthRefused("body_mismatch")
        self._spend(claim.nonce, claim.time + self._window_s + 1, int(self._clock()))
        return SignedRequest(node_id=claim.node_id, nonce=claim.nonce)

    def _spend(self, nonce: str, forget_at: int, now: int) -> None:
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        if nonce in self._seen:
            raise AuthRefused("replay")
        if len(self._seen) >= self._max_nonces:
            # Growing would let a token holder exhaust memory; refusing costs a retry.
            raise AuthRefused("nonce_cache_full", status=503)
        self._seen.add(nonce)
        heapq.heappush(self._expiry, (forget_at, nonce))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if not isinstance(value, str) or not value.isascii():
        return None
    return value.strip()


# --- answers -------------------------------------------------------------------------------------


def sign_answer(
    key: ClusterKey,
    node_id: str,
    nonce: str,
    status: int,
    *,
    body: bytes | None = None,
    content_range: str = "",
    content_length: str = "",
) -> str:
    """The ``X-Cached-Answer`` of one answer: over its whole body when given, else its range headers."""
    if body is not None:
        return key.sign(_ANSWER, nonce, str(status), "body", body_digest(body), node_id)
    return key.sign(_ANSWER, nonce, str(status), "range", content_range, content_length, node_id)


def verify_body_answer(key: ClusterKey, nonce: str, status: int, headers: Mapping[str, str], body: bytes) -> str | None:
    """The answering node's id if the answer proves the token, else None."""
    node = _header(headers, HEADER_NODE)
    if node is None or not _NODE.match(node):
        return None
    ok = key.verify(_header(headers, HEADER_ANSWER), _ANSWER, nonce, str(status), "body", body_digest(body), node)
    return node if ok else None


def verify_range_answer(key: ClusterKey, nonce: str, status: int, headers: Mapping[str, str]) -> str | None:
    node = _header(headers, HEADER_NODE)
    if node is None or not _NODE.match(node):
        return None
    parts = (_header(headers, "Content-Range") or "", _header(headers, "Content-Length") or "")
    ok = key.verify(_header(headers, HEADER_ANSWER), _ANSWER, nonce, str(status), "range", *parts, node)
    return node if ok else None
