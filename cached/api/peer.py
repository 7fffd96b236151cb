"""The peer API (``/p2p/v1`` on ``--peer-listen``): what other nodes of the cluster may ask.

Routes: gossip, holdings deltas, complete blobs by id with Range (sendfile), partial blobs with
Range but only over verified pieces (416 otherwise), piece tables, manifests by digest, and
ref -> manifest digest. Every request must carry the cluster token (compared in constant time);
without it the answer is 401 and the refusal is counted. Serving is bounded: past
``max_uploads`` concurrent transfers the answer is 429 with Retry-After, so the puller moves to
another source; ``serve_rate_bps`` caps upload bandwidth. Nothing here decides what to fetch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from typing import Any, Awaitable, Callable

from aiohttp import ClientConnectionResetError, web

from cached.errors import CachedError
from cached.metrics import Metrics
from cached.peers.gossip import Gossip
from cached.store import Store
from cached.transfer.budget import TokenBucket
from cached.types import ModelRef, RefKind

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
CHUNK = 1 << 20


class _SlottedFile(web.FileResponse):
    """A FileResponse that holds an upload slot while the kernel sends it."""

    def __init__(self, path: str, slots: asyncio.Semaphore, **kw: object) -> None:
        super().__init__(path, **kw)  # type: ignore[arg-type]
        self._slots = slots

    async def prepare(self, request: web.BaseRequest):  # type: ignore[override]
        async with self._slots:
            return await super().prepare(request)


class PeerApi:
    def __init__(
        self, *, store: Store, gossip: Gossip, metrics: Metrics, token: str, max_uploads: int, serve_rate_bps: int
    ) -> None:
        self._store = store
        self._gossip = gossip
        self._metrics = metrics
        self._token = token.encode()
        self._uploads = asyncio.Semaphore(max_uploads)
        self._bucket = TokenBucket(serve_rate_bps)
        self._rate_limited = serve_rate_bps > 0
        self.local_status: Callable[[ModelRef], dict[str, Any]] = lambda ref: {"state": "absent"}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20, middlewares=[self._auth])
        r = app.router
        r.add_post("/p2p/v1/gossip", self.gossip)
        r.add_get("/p2p/v1/holdings", self.holdings)
        r.add_get("/p2p/v1/blobs/{id}", self.blob)
        r.add_get("/p2p/v1/blobs/{id}/pieces", self.piece_table)
        r.add_get("/p2p/v1/partials/{key}", self.partial)
        r.add_get("/p2p/v1/partials/{key}/pieces", self.partial_pieces)
        r.add_get("/p2p/v1/manifests/{digest}", self.manifest)
        r.add_get("/p2p/v1/refs", self.ref)
        r.add_get("/p2p/v1/status", self.status)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].encode() if auth.startswith("Bearer ") else b""
        if not hmac.compare_digest(given, self._token):
            self._metrics.peer_auth_failures.inc()
            return web.json_response({"error": "unauthorized", "message": "missing or wrong cluster token"}, status=401)
        try:
            return await handler(request)
        except web.HTTPException as e:
            return web.json_response({"error": "http", "message": e.reason}, status=e.status)
        except (CachedError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            return web.json_response({"error": "bad_request", "message": str(e)[:200]}, status=400)

    # --- membership ----------------------------------------------------------------------------

    async def gossip(self, request: web.Request) -> web.Response:
        try:
            payload = json.loads(await request.read())
            return web.json_response(self._gossip.receive(payload))
        except PermissionError as e:
            self._metrics.gossip_errors.labels("other_cluster").inc()
            return web.json_response({"error": "other_cluster", "message": str(e)}, status=403)
        except (ValueError, UnicodeDecodeError, RecursionError, OverflowError, TypeError, AttributeError) as e:
            self._metrics.gossip_errors.labels("malformed").inc()
            return web.json_response({"error": "bad_request", "message": str(e)[:200]}, status=400)

    async def holdings(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        if since < 0:
            raise ValueError("since must be >= 0")
        return web.json_response(self._gossip.holdings.since(since))

    # --- content -------------------------------------------------------------------------------

    async def manifest(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"].removeprefix("blake3:")
        if not _HEX.match(digest) or self._store.manifest(digest) is None:
            raise web.HTTPNotFound()
        return web.Response(body=self._store.manifest(digest).canonical_bytes(), content_type="application/json")

    async def ref(self, request: web.Request) -> web.Response:
        ref = ModelRef.parse(request.query.get("ref", ""))
        if ref.kind is RefKind.FILE:
            raise web.HTTPNotFound()  # a path on this node: nothing a peer may resolve
        digest = self._store.ref_digest(ref)
        if digest is None:
            raise web.HTTPNotFound()
        return web.json_response({"ref": ref.canonical, "manifest": f"blake3:{digest}"})

    async def status(self, request: web.Request) -> web.Response:
        """This node's model object for a ref (cluster-wide locate asks every member)."""
        ref = ModelRef.parse(request.query.get("ref", ""))
        if ref.kind is RefKind.FILE:
            raise web.HTTPNotFound()  # its path and state are this node's business only
        return web.json_response(self.local_status(ref))

    async def piece_table(self, request: web.Request) -> web.Response:
        blob = request.match_info["id"].removeprefix("blake3:")
        if not _HEX.match(blob) or not self._store.has_blob(blob):
            raise web.HTTPNotFound()
        data = await asyncio.to_thread(self._store.sidecar_path(blob).read_bytes)
        return web.Response(body=data, content_type="application/octet-stream")

    async def partial_pieces(self, request: web.Request) -> web.Response:
        partial = self._store.open_partial(request.match_info["key"])
        if partial is None:
            raise web.HTTPNotFound()
        done = dict(partial.done)
        return web.json_response(
            {"size": partial.size, "piece_size": partial.piece_size, "pieces": {str(i): d.hex() for i, d in done.items()}}
        )

    async def blob(self, request: web.Request) -> web.StreamResponse:
        blob = request.match_info["id"].removeprefix("blake3:")
        if not _HEX.match(blob) or not self._store.has_blob(blob):
            raise web.HTTPNotFound()
        path = self._store.blob_path(blob)
        size = os.path.getsize(path)
        return await self._serve(request, str(path), size, lambda start, end: True, sendfile=True)

    async def partial(self, request: web.Request) -> web.StreamResponse:
        partial = self._store.open_partial(request.match_info["key"])
        if partial is None:
            raise web.HTTPNotFound()

        def verified(start: int, end: int) -> bool:
            first, last = start // partial.piece_size, end // partial.piece_size
            return all(i in partial.done for i in range(first, last + 1))

        return await self._serve(request, str(partial.data_path), partial.size, verified)

    async def _serve(
        self, request: web.Request, path: str, size: int, allowed: Callable[[int, int], bool], *, sendfile: bool = False
    ) -> web.StreamResponse:
        m = _RANGE.match(request.headers.get("Range", ""))
        if m and any(len(g) > 18 for g in m.groups()):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})  # beyond any file
        if not m:
            return web.json_response({"error": "range_required", "message": "send Range: bytes=a-b"}, status=416)
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start > end or start >= size:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        if not allowed(start, end):
            # Only verified pieces ever leave this node.
            return web.json_response({"error": "not_verified", "message": "range covers pieces not verified here"}, status=416)
        if self._uploads.locked():
            self._metrics.peer_throttled.inc()
            return web.json_response({"error": "busy", "message": "serving at capacity"}, status=429, headers={"Retry-After": "1"})
        length = end - start + 1
        if sendfile and not self._rate_limited:
            # A complete, immutable blob with no bandwidth cap: the kernel copies it (sendfile).
            # aiohttp prepares the response after we return, so the upload slot is held there.
            self._metrics.served_bytes.inc(length)
            return _SlottedFile(path, self._uploads, chunk_size=CHUNK)
        async with self._uploads:
            try:
                fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
            except FileNotFoundError:
                # The partial was finalized (or dropped) a moment ago; holdings will say so.
                return web.json_response({"error": "gone", "message": "no longer a partial here"}, status=404)
            headers = {"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(length), "Accept-Ranges": "bytes"}
            resp = web.StreamResponse(status=206, headers=headers)
            resp.content_type = "application/octet-stream"
            pos = start
            try:
                await resp.prepare(request)
                while pos <= end:
                    n = min(CHUNK, end - pos + 1)
                    await self._bucket.take(n)
                    chunk = await asyncio.to_thread(os.pread, fd, n, pos)
                    if not chunk:
                        break
                    await resp.write(chunk)
                    pos += len(chunk)
                    self._metrics.served_bytes.inc(len(chunk))
                await resp.write_eof()
            except (ConnectionResetError, ClientConnectionResetError):
                # The puller hung up (it got the piece elsewhere first): nothing to report.
                pass
            finally:
                os.close(fd)
            return resp

