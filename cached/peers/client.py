"""Client of other nodes' peer API (``/p2p/v1``): gossip, holdings, manifests, piece ranges.

Every request is signed afresh with the cluster key (``peers.auth``: node id, time, nonce, body
digest, MAC); the token itself is never sent. Every answer must prove the same key
(``X-Cached-Answer``, bound to our nonce) before anything in it is used: a 200 or 206 that does
not is a ``PeerError`` ("peer did not prove it holds the cluster token"), counted in
``cached_peer_unauthenticated_total``. Error statuses (401, 404, 429, 5xx) carry nothing we use
beyond "not from this peer, not now", so they are failures whether signed or not.

Answers are read with a size cap per route (``CAPS``): past it the read stops, the answer is a
``PeerError`` and counted in ``cached_peer_answer_too_large_total``; memory stays bounded by the
cap, whatever the peer sends. Failures become ``PeerError`` (with ``retryable`` and ``status``)
at this edge; a 429 is ``PeerBusy`` so the transfer layer moves to another source. Callers still
verify bytes against digests and manifests against their digest.
"""

from __future__ import annotations

import json
import ssl
from email.message import Message
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from cached.errors import CachedError
from cached.metrics import Metrics
from cached.peers.auth import HEADER_NONCE, ClusterKey, sign_request, verify_body_answer, verify_range_answer
from cached.rangeio import Check, RangeIOError, Redirected, Sink, ThreadedRangeReader

MIB = 1 << 20
# Largest answer taken per route. Gossip matches the server's request cap; a piece table is 36
# bytes a piece (64 MiB covers 1.8 M pieces: 28 TiB at the default piece size).
CAPS = {
    "gossip": 8 * MIB,
    "wants": 16 * MIB,
    "holdings": 32 * MIB,
    "manifests": 16 * MIB,
    "pieces": 64 * MIB,
    "refs": 1 * MIB,
    "status": 1 * MIB,
}
_READ_CHUNK = 256 << 10
UNPROVEN = "peer did not prove it holds the cluster token"


class PeerError(CachedError):
    code = "peer_error"

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class PeerBusy(PeerError):
    code = "peer_busy"


class PeerUnproven(PeerError):
    """An answer without a valid signature: nothing of it was used."""

    code = "peer_unauthenticated"


class AnswerTooLarge(PeerError):
    code = "peer_answer_too_large"


def client_ssl(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """TLS for peer requests: verify peers against ``ca`` and present our certificate."""
    if ca is None and cert is None:
        return None
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    # Peers are addressed by IP:port and share a private CA; the CA is the identity check.
    ctx.check_hostname = False
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


class PeerClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        reader: ThreadedRangeReader,
        key: ClusterKey,
        node_id: str,
        *,
        scheme: str = "http",
        timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._reader = reader  # piece bodies: worker threads, off the event loop (same TLS context)
        self._key = key
        self._node_id = node_id
        self._scheme = scheme
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self._ssl = ssl_context if ssl_context is not None else True
        self._metrics = metrics if metrics is not None else Metrics()

    def url(self, address: str, path: str) -> URL:
        return URL(f"{self._scheme}://{address}/p2p/v1{path}", encoded=True)

    def sign(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        """Headers for one request to ``/p2p/v1{path}`` (path with its query, as sent)."""
        return sign_request(self._key, self._node_id, method, f"/p2p/v1{path}", body)

    # --- JSON and bytes answers ----------------------------------------------------------------

    async def _json(self, method: str, address: str, path: str, route: str, body: bytes = b"") -> Any:
        raw = await self._fetch(method, address, path, route, body)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise PeerError(f"peer {address}{path}: answer is not JSON: {e}") from None

    async def _fetch(self, method: str, address: str, path: str, route: str, body: bytes = b"") -> bytes:
        headers = self.sign(method, path, body)
        if body:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method,
                self.url(address, path),
                data=body or None,
                headers=headers,
                timeout=self._timeout,
                ssl=self._ssl,
            ) as resp:
                if resp.status != 200:
                    raise self._status_error(resp.status, address, path)
                data = await self._capped(resp, CAPS[route], address, path, route)
                if verify_body_answer(self._key, headers[HEADER_NONCE], resp.status, resp.headers, data) is None:
                    raise self._unproven(address, path)
                return data
        except PeerError:
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as e:
            raise PeerError(f"peer {address}{path}: {type(e).__name__}: {e}") from None

    async def _capped(self, resp: aiohttp.ClientResponse, cap: int, address: str, path: str, route: str) -> bytes:
        declared = resp.content_length
        if declared is not None and declared > cap:
            raise self._too_large(address, path, route, cap)
        buf = bytearray()
        while chunk := await resp.content.read(min(_READ_CHUNK, cap + 1 - len(buf))):
            buf += chunk
            if len(buf) > cap:
                raise self._too_large(address, path, route, cap)
        return bytes(buf)

    def _too_large(self, address: str, path: str, route: str, cap: int) -> PeerError:
        self._metrics.peer_answer_too_large.labels(route).inc()
        return AnswerTooLarge(f"peer {address}{path}: answer larger than {cap} bytes", retryable=False)

    def _unproven(self, address: str, path: str) -> PeerError:
        self._metrics.peer_unauthenticated.inc()
        return PeerUnproven(f"peer {address}{path}: {UNPROVEN}", retryable=False)

    @staticmethod
    def _status_error(status: int, address: str, path: str) -> PeerError:
        if status == 429:
            return PeerBusy(f"peer {address} is busy (429)", status=status)
        return PeerError(f"peer {address}{path}: HTTP {status}", status=status, retryable=status >= 500)

    # --- routes ------------------------------------------------------------------------------------

    async def gossip(self, address: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", address, "/gossip", "gossip", json.dumps(payload).encode())

    async def want(self, address: str, message: dict[str, Any]) -> dict[str, Any]:
        """Origin single-flight: tell a peer we want (or no longer want) a file; its answer."""
        return await self._json("POST", address, "/wants", "wants", json.dumps(message).encode())

    async def holdings(self, address: str, since: int) -> dict[str, Any]:
        return await self._json("GET", address, f"/holdings?since={int(since)}", "holdings")

    async def ref(self, address: str, canonical: str) -> str | None:
        try:
            answer = await self._json("GET", address, "/refs?" + urlencode({"ref": canonical}, quote_via=quote), "refs")
        except PeerError as e:
            if e.status == 404:
                return None
            raise
        return str(answer.get("manifest", "")).removeprefix("blake3:") or None

    async def status(self, address: str, canonical: str) -> dict[str, Any]:
        return await self._json("GET", address, "/status?" + urlencode({"ref": canonical}, quote_via=quote), "status")

    async def manifest(self, address: str, digest: str) -> bytes:
        return await self._fetch("GET", address, f"/manifests/{digest}", "manifests")

    async def piece_table(self, address: str, blob_hex: str) -> bytes:
        return await self._fetch("GET", address, f"/blobs/{blob_hex}/pieces", "pieces")

    async def partial_pieces(self, address: str, key: str) -> dict[str, Any]:
        return await self._json("GET", address, f"/partials/{key}/pieces", "pieces")

    # --- piece ranges ------------------------------------------------------------------------------

    async def read_range(self, address: str, kind: str, name: str, offset: int, length: int) -> bytes | bytearray:
        """Bytes [offset, offset+length) of a complete blob (kind "blobs") or a partial ("partials")."""
        url, headers, check = self._range_request(address, kind, name)
        try:
            return await self._reader.read(url, offset, length, check=check, headers=headers)
        except (RangeIOError, Redirected) as e:
            raise PeerError(f"peer {address}/{kind}/{name}: {e}") from None

    async def read_range_into(self, address: str, kind: str, name: str, offset: int, length: int, sink: Sink) -> None:
        """The same bytes handed to ``sink`` batch by batch on a worker thread as they arrive."""
        url, headers, check = self._range_request(address, kind, name)
        try:
            await self._reader.read_into(url, offset, length, sink, check=check, headers=headers)
        except (RangeIOError, Redirected) as e:
            raise PeerError(f"peer {address}/{kind}/{name}: {e}") from None

    def _range_request(self, address: str, kind: str, name: str) -> tuple[str, dict[str, str], Check]:
        """URL, freshly signed headers (one nonce per request), and the check of the answer's
        status and signed range headers, which runs before any byte is taken."""
        path = f"/{kind}/{name}"
        headers = self.sign("GET", path)
        nonce = headers[HEADER_NONCE]

        def check(status: int, answer: Message) -> None:
            if status != 206:
                raise self._status_error(status, address, path)
            if verify_range_answer(self._key, nonce, status, answer) is None:
                raise self._unproven(address, path)

        return str(self.url(address, path)), headers, check
