"""Client of other nodes' peer API (``/p2p/v1``): gossip, holdings, manifests, piece ranges.

Every request carries the cluster token. Failures become ``PeerError`` (with ``retryable`` and
``status``) at this edge; a 429 is ``PeerBusy`` so the transfer layer moves to another source.
It never trusts what it receives: callers verify bytes against digests and manifests against
their digest.
"""

from __future__ import annotations

import asyncio
import ssl
from email.message import Message
from typing import Any

import aiohttp
from yarl import URL

from cached.errors import CachedError
from cached.rangeio import Check, RangeIOError, Redirected, Sink, ThreadedRangeReader


class PeerError(CachedError):
    code = "peer_error"

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class PeerBusy(PeerError):
    code = "peer_busy"


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
        self, session: aiohttp.ClientSession, reader: ThreadedRangeReader, token: str, *, scheme: str = "http", timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._session = session
        self._reader = reader  # piece bodies: worker threads, off the event loop (same TLS context)
        self._headers = {"Authorization": f"Bearer {token}"}
        self._scheme = scheme
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self._ssl = ssl_context if ssl_context is not None else True

    def url(self, address: str, path: str) -> URL:
        return URL(f"{self._scheme}://{address}/p2p/v1{path}", encoded=True)

    async def _json(self, method: str, address: str, path: str, **kw: Any) -> Any:
        try:
            async with self._session.request(
                method, self.url(address, path), headers=self._headers, timeout=self._timeout, ssl=self._ssl, **kw
            ) as resp:
                if resp.status != 200:
                    raise self._status_error(resp.status, address, path)
                return await resp.json()
        except PeerError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError) as e:
            raise PeerError(f"peer {address}{path}: {type(e).__name__}: {e}") from None

    @staticmethod
    def _status_error(status: int, address: str, path: str) -> PeerError:
        if status == 429:
            return PeerBusy(f"peer {address} is busy (429)", status=status)
        return PeerError(f"peer {address}{path}: HTTP {status}", status=status, retryable=status >= 500)

    async def gossip(self, address: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", address, "/gossip", json=payload)

    async def holdings(self, address: str, since: int) -> dict[str, Any]:
        return await self._json("GET", address, f"/holdings?since={since}")

    async def ref(self, address: str, canonical: str) -> str | None:
        try:
            answer = await self._json("GET", address, "/refs", params={"ref": canonical})
        except PeerError as e:
            if e.status == 404:
                return None
            raise
        return str(answer.get("manifest", "")).removeprefix("blake3:") or None

    async def status(self, address: str, canonical: str) -> dict[str, Any]:
        return await self._json("GET", address, "/status", params={"ref": canonical})

    async def manifest(self, address: str, digest: str) -> bytes:
        return await self._bytes(address, f"/manifests/{digest}")

    async def piece_table(self, address: str, blob_hex: str) -> bytes:
        return await self._bytes(address, f"/blobs/{blob_hex}/pieces")

    async def partial_pieces(self, address: str, key: str) -> dict[str, Any]:
        return await self._json("GET", address, f"/partials/{key}/pieces")

    async def read_range(self, address: str, kind: str, name: str, offset: int, length: int) -> bytes | bytearray:
        """Bytes [offset, offset+length) of a complete blob (kind "blobs") or a partial ("partials")."""
        url, check = self._range_request(address, kind, name)
        try:
            return await self._reader.read(url, offset, length, check=check, headers=self._headers)
        except (RangeIOError, Redirected) as e:
            raise PeerError(f"peer {address}/{kind}/{name}: {e}") from None

    async def read_range_into(self, address: str, kind: str, name: str, offset: int, length: int, sink: Sink) -> None:
        """The same bytes handed to ``sink`` batch by batch on a worker thread as they arrive."""
        url, check = self._range_request(address, kind, name)
        try:
            await self._reader.read_into(url, offset, length, sink, check=check, headers=self._headers)
        except (RangeIOError, Redirected) as e:
            raise PeerError(f"peer {address}/{kind}/{name}: {e}") from None

    def _range_request(self, address: str, kind: str, name: str) -> tuple[str, Check]:
        path = f"/{kind}/{name}"

        def check(status: int, headers: Message) -> None:
            if status != 206:
                raise self._status_error(status, address, path)

        return str(self.url(address, path)), check

    async def _bytes(self, address: str, path: str) -> bytes:
        try:
            async with self._session.get(self.url(address, path), headers=self._headers, timeout=self._timeout, ssl=self._ssl) as resp:
                if resp.status != 200:
                    raise self._status_error(resp.status, address, path)
                return await resp.read()
        except PeerError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise PeerError(f"peer {address}{path}: {type(e).__name__}: {e}") from None
