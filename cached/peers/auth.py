"""Proof of holding the cluster token, without ever sending it.

The token file holds a shared secret; nothing derived from it that could be replayed or reversed
leaves the node. Every peer message (a request, its answer, an mDNS announcement) carries an
HMAC-SHA256 over its parts under a key derived from the token and the cluster name, so a node of
another cluster (or a host that merely saw our traffic) can neither produce nor reuse one.

This module owns the key and the MAC; what each message signs (which parts, freshness windows,
nonces) belongs to the protocol that uses it (``peers.client``/``api.peer`` for HTTP,
``peers.mdns`` for announcements).
"""

from __future__ import annotations

import hashlib
import hmac

_DOMAIN = b"cached-peer-auth-v1"


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
