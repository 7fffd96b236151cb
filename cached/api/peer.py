"""The peer API (``/p2p/v1`` on ``--peer-listen``): what other nodes of the cluster may ask.

Routes: gossip, wants (origin single-flight, ``transfer.wants``), holdings deltas, complete blobs by id with Range (sendfile), partial blobs with
Range but only over verified pieces (416 otherwise), piece tables, manifests by digest, and
ref -> manifest digest. Every request must be signed with the cluster key (``peers.auth`` states
the wire format: node id, time, nonce, body digest, MAC); anything else (no signature, a wrong or
stale one, a replayed nonce, a body that does not match, a bare ``Authorization: Bearer`` token,
garbage headers) is 401 and counted by reason, and nothing of it reaches a handler. Every answer
to an accepted request is signed in turn (``X-Cached-Answer``), so the caller knows a token holder
answered. Request bodies are capped at ``MAX_BODY_BYTES``. Serving is bounded: past
``max_uploads`` concurrent transfers (or half of them to one peer, or ``SAME_SPAN_UPLOADS`` of the
same piece) the answer is 429 with Retry-After, so the puller moves to
another source; ``serve_rate_bps`` caps upload bandwidth. Nothing here decides what to fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientConnectionResetError, web

from cached.errors import CachedError
from cached.metrics import Metrics
from cached.peers.auth import (
    HEADER_ANSWER,
    HEADER_NODE,
    AuthRefused,
    ClusterKey,
    RequestVerifier,
    SignedRequest,
    sign_answer,
)
from cached.peers.gossip import Gossip
from cached.peers.holdings import local_ref
from cached.ranges import ByteSpan, parse_range, unsatisfiable
from cached.status import StatusSource
from cached.store import Store
from cached.store.verified import VerifiedFile
from cached.transfer.budget import TokenBucket
from cached.transfer.wants import WantMessage, Wants
from cached.types import ModelRef, RefKind, piece_count

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
# The largest request is a gossip message: members (capped by bytes in ``Gossip.message``) and
# the catalog; the client caps a gossip answer at the same size.
MAX_BODY_BYTES = 8 << 20
# Uploads of one span (a piece) at once. A piece that just arrived is wanted by every other node
# at the same moment; sent to all of them at once, each gets 1/N of the uplink and nobody can pass
# it on before all are done. Sent to a few, those finish early and serve it in turn (a tree).
SAME_SPAN_UPLOADS = 3
_SIGNED = web.RequestKey("signed", SignedRequest)


def _unsatisfiable(size: int) -> web.Response:
    """416 for a span outside the blob: the size in Content-Range, and an error body like every
    other refusal (an empty body had no Content-Type, so a client could not tell what it was)."""
    return web.json_response(
        {"error": "range_not_satisfiable", "message": f"the span is outside the blob ({size} bytes)"},
        status=416,
        headers={"Content-Range": unsatisfiable(size)},
    )


class _SlottedFile(web.FileResponse):
    """A FileResponse that holds an upload slot while the kernel sends it."""

    def __init__(
        self, path: str, slot: Callable[[], contextlib.AbstractAsyncContextManager[None]], **kw: object
    ) -> None:
        super().__init__(path, **kw)  # type: ignore[arg-type]
        self._slot = slot

    async def prepare(self, request: web.BaseRequest):  # type: ignore[override]
        async with self._slot():
            return await super().prepare(request)


class PeerApi:
    def __init__(
        self,
        *,
        store: Store,
        gossip: Gossip,
        metrics: Metrics,
        key: ClusterKey,
        node_id: str,
        max_uploads: int,
        serve_rate_bps: int,
        status: StatusSource,
        verifier: RequestVerifier | None = None,
        wants: Wants | None = None,
    ) -> None:
        self._store = store
        self._gossip = gossip
        self._metrics = metrics
        self._key = key
        self._node_id = node_id
        self._verifier = verifier if verifier is not None else RequestVerifier(key)
        self._uploads = asyncio.Semaphore(max_uploads)
        # One peer may hold at most half the upload slots (and the reader work behind them), so a
        # puller that stops reading cannot starve the others.
        self._per_peer_uploads = max(1, max_uploads // 2)
        self._uploading: dict[str, int] = {}
        self._fanout: dict[tuple[str, int], int] = {}  # (blob or partial, span start) -> uploads of it
        self._bucket = TokenBucket(serve_rate_bps)
        self._rate_limited = serve_rate_bps > 0
        self._status = status
        self._wants = wants if wants is not None else Wants()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._auth])
        app.on_response_prepare.append(self._sign_answer)
        r = app.router
        r.add_post("/p2p/v1/gossip", self.gossip)
        r.add_post("/p2p/v1/wants", self.wants)
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
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            # The MAC is checked on the headers first, so nobody without the key makes us read a body.
            claim = self._verifier.check(request.method, request.raw_path, request.headers)
            request[_SIGNED] = self._verifier.accept(claim, await request.read())
        except AuthRefused as e:
            return self._refused(e)
        except web.HTTPException as e:  # a body past MAX_BODY_BYTES
            self._metrics.peer_auth_refused.labels("body_too_large").inc()
            return web.json_response({"error": "http", "message": e.reason}, status=e.status)
        try:
            return await handler(request)
        except web.HTTPException as e:
            return web.json_response({"error": "http", "message": e.reason}, status=e.status)
        except (CachedError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            return web.json_response({"error": "bad_request", "message": str(e)[:200]}, status=400)

    def _refused(self, e: AuthRefused) -> web.Response:
        self._metrics.peer_auth_failures.inc()
        self._metrics.peer_auth_refused.labels(e.reason).inc()
        if e.status == 503:
            return web.json_response(
                {"error": "busy", "message": "too many requests in the replay window"},
                status=503,
                headers={"Retry-After": "1"},
            )
        return web.json_response(
            {"error": "unauthorized", "message": f"request not signed with the cluster key ({e.reason})"}, status=401
        )

    async def _sign_answer(self, request: web.Request, response: web.StreamResponse) -> None:
        """Sign every answer to an accepted request: over the body when we hold it, else (a
        streamed or sendfile range) over its Content-Range and Content-Length."""
        signed = request.get(_SIGNED)
        if signed is None:
            return
        body = response.body if isinstance(response, web.Response) else None
        if isinstance(body, (bytes, bytearray)) or (isinstance(response, web.Response) and body is None):
            mac = sign_answer(self._key, self._node_id, signed.nonce, response.status, body=bytes(body or b""))
        else:
            h = response.headers
            mac = sign_answer(
                self._key,
                self._node_id,
                signed.nonce,
                response.status,
                content_range=h.get("Content-Range", ""),
                content_length=h.get("Content-Length", ""),
            )
        response.headers[HEADER_NODE] = self._node_id
        response.headers[HEADER_ANSWER] = mac

    # --- membership ----------------------------------------------------------------------------

    async def gossip(self, request: web.Request) -> web.Response:
        try:
            payload = json.loads(await request.read())
            return web.json_response(self._gossip.receive(payload, sender=request[_SIGNED].node_id))
        except PermissionError as e:
            self._metrics.gossip_errors.labels("other_cluster").inc()
            return web.json_response({"error": "other_cluster", "message": str(e)}, status=403)
        except (ValueError, UnicodeDecodeError, RecursionError, OverflowError, TypeError, AttributeError) as e:
            self._metrics.gossip_errors.labels("malformed").inc()
            return web.json_response({"error": "bad_request", "message": str(e)[:200]}, status=400)

    async def wants(self, request: web.Request) -> web.Response:
        """Origin single-flight (``transfer.wants``): record the sender's want and answer ours,
        in one step."""
        try:
            msg = WantMessage.from_json(json.loads(await request.read()))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            self._metrics.gossip_errors.labels("malformed").inc()
            return web.json_response({"error": "bad_request", "message": str(e)[:200]}, status=400)
        answer = self._wants.receive(request[_SIGNED].node_id, msg)
        if answer.granted:
            self._metrics.origin_handovers.inc()
        if not answer.wants:
            # Not fetching it, but it may hold it (finished a moment ago): the asker must not read
            # those pieces from the origin while gossip has not told it yet.
            answer = dataclasses.replace(answer, claimed=self._held(msg))
        return web.json_response(answer.to_json())

    def _held(self, msg: WantMessage) -> frozenset[int]:
        if self._store.blob_for_identity(msg.key) is not None and msg.piece_size > 0:
            return frozenset(range(piece_count(msg.size, msg.piece_size)))
        partial = self._store.open_partial(msg.key)
        if partial is None or (partial.size, partial.piece_size) != (msg.size, msg.piece_size):
            return frozenset()
        return frozenset(partial.done)

    async def holdings(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        if since < 0:
            raise ValueError("since must be >= 0")
        return web.json_response(self._gossip.holdings.since(since))

    # --- content -------------------------------------------------------------------------------

    async def manifest(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"].removeprefix("blake3:")
        manifest = self._store.manifest(digest) if _HEX.match(digest) else None
        # A file:// manifest names paths on this node only; knowing its digest grants nothing.
        if manifest is None or local_ref(manifest.ref):
            raise web.HTTPNotFound()
        return web.Response(body=manifest.canonical_bytes(), content_type="application/json")

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
        return web.json_response(self._status.of(ref).to_json())

    async def piece_table(self, request: web.Request) -> web.Response:
        blob = request.match_info["id"].removeprefix("blake3:")
        data = await self._store.piece_log(blob) if _HEX.match(blob) else None
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="application/octet-stream")

    async def partial_pieces(self, request: web.Request) -> web.Response:
        partial = self._store.open_partial(request.match_info["key"])
        if partial is None:
            raise web.HTTPNotFound()
        done = dict(partial.done)
        return web.json_response(
            {
                "size": partial.size,
                "piece_size": partial.piece_size,
                "pieces": {str(i): d.hex() for i, d in done.items()},
            }
        )

    async def blob(self, request: web.Request) -> web.StreamResponse:
        blob = request.match_info["id"].removeprefix("blake3:")
        size = self._store.blob_size(blob) if _HEX.match(blob) else None
        if size is None:
            raise web.HTTPNotFound()
        return await self._serve(request, size, blob_hex=blob)

    async def partial(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        partial = self._store.open_partial(key)
        if partial is None:
            raise web.HTTPNotFound()
        return await self._serve(request, partial.size, partial_key=key)

    async def _serve(
        self,
        request: web.Request,
        size: int,
        *,
        blob_hex: str | None = None,
        partial_key: str | None = None,
    ) -> web.StreamResponse:
        rng = parse_range(request.headers.get("Range"))
        if rng is None or rng.is_suffix:
            return web.json_response({"error": "range_required", "message": "send Range: bytes=a-b"}, status=416)
        span = rng.span(size)
        if span is None:
            return _unsatisfiable(size)
        node = request[_SIGNED].node_id
        if blob_hex is not None and not self._rate_limited:
            # A complete, immutable blob (every byte verified) with no bandwidth cap: the kernel
            # copies it (sendfile). aiohttp prepares the response after we return, so the upload
            # slot is held there.
            if self._full(node, (blob_hex, span.start)):
                return self._busy()
            self._metrics.served_bytes.inc(span.length)
            return _SlottedFile(
                str(self._store.blob_path(blob_hex)), lambda: self._slot(node, (blob_hex, span.start)), chunk_size=CHUNK
            )
        source = await self._store.open_verified(blob_hex=blob_hex, partial_key=partial_key)
        if source is None:
            # The partial was finalized (or dropped) a moment ago; holdings will say so.
            return web.json_response({"error": "gone", "message": "no longer here"}, status=404)
        with source:
            if not source.verified(span.start, span.end):
                # Only verified pieces ever leave this node.
                return web.json_response(
                    {"error": "not_verified", "message": "range covers pieces not verified here"}, status=416
                )
            span_key = (blob_hex or partial_key or "", span.start)
            if self._full(node, span_key):
                return self._busy()
            async with self._slot(node, span_key):
                return await self._stream(request, source, span)

    def _full(self, node: str, span_key: tuple[str, int]) -> bool:
        return (
            self._uploads.locked()
            or self._uploading.get(node, 0) >= self._per_peer_uploads
            or self._fanout.get(span_key, 0) >= SAME_SPAN_UPLOADS
        )

    @contextlib.asynccontextmanager
    async def _slot(self, node: str, span_key: tuple[str, int]) -> AsyncIterator[None]:
        """One upload slot, counted against the peer it serves and the span it sends."""
        self._uploading[node] = self._uploading.get(node, 0) + 1
        self._fanout[span_key] = self._fanout.get(span_key, 0) + 1
        try:
            async with self._uploads:
                yield
        finally:
            for counts, k in ((self._uploading, node), (self._fanout, span_key)):
                counts[k] -= 1  # type: ignore[index]
                if not counts[k]:  # type: ignore[index]
                    del counts[k]  # type: ignore[arg-type]

    def _busy(self) -> web.Response:
        self._metrics.peer_throttled.inc()
        return web.json_response(
            {"error": "busy", "message": "serving at capacity"}, status=429, headers={"Retry-After": "1"}
        )

    async def _stream(self, request: web.Request, source: VerifiedFile, span: ByteSpan) -> web.StreamResponse:
        headers = {"Content-Range": span.content_range, "Content-Length": str(span.length), "Accept-Ranges": "bytes"}
        resp = web.StreamResponse(status=206, headers=headers)
        resp.content_type = "application/octet-stream"
        pos = span.start
        try:
            await resp.prepare(request)
            while pos <= span.end:
                n = min(CHUNK, span.end - pos + 1)
                await self._bucket.take(n)
                chunk = await source.read(pos, n)
                if not chunk:
                    break
                await resp.write(chunk)
                pos += len(chunk)
                self._metrics.served_bytes.inc(len(chunk))
            await resp.write_eof()
        except (ConnectionResetError, ClientConnectionResetError):
            # The puller hung up (it got the piece elsewhere first): nothing to report.
            pass
        return resp
