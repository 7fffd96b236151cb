"""``/v2``: a read-only, pull-through OCI registry mirror on the local API listener.

containerd (``hosts.toml`` pointing a registry at this node), skopeo, oras or any OCI client pulls
through it. The upstream registry is containerd's ``?ns=`` parameter or, without it,
``origins.oci.default_registry``. A manifest by tag is resolved upstream (the answer reused for
``origins.oci.tag_ttl_s``); a manifest by digest is immutable: served from memory, from the store,
or fetched upstream and checked against the digest. Serving a manifest starts the prefetch of the
artifact's blobs as the model ``oci://REGISTRY/NAME@DIGEST?path=/.oci`` (``origins.oci``'s
``MIRROR_PATH``), so they come through the swarm: peers first, the registry about once per
cluster. A blob is served only once it is complete in the store -- every piece verified and the
whole checked against its sha256 -- with ``Range``, by the kernel (sendfile,
``cached.api.blobsend``). Push verbs answer 405; every error is the spec's JSON (``{"errors":
[{"code", "message", "detail"}]}``) with a 4xx (5xx only for an upstream that cannot be reached).
It does not speak to the registry itself (``origins.registry``) or fetch bytes (the jobs do).
"""

from __future__ import annotations

import collections
import logging
import re
import time
from typing import Any

from aiohttp import web

from cached.api.blobsend import send_blob
from cached.config import OciOriginConfig
from cached.errors import CachedError, IntegrityError, OriginDenied, OriginError, OriginNotFound, RefError
from cached.jobs import Jobs
from cached.metrics import Metrics
from cached.origins.oci import MIRROR_PATH, blob_path, mirror_ref
from cached.origins.registry import FetchedManifest, RegistryClient, is_digest
from cached.ranges import parse_range, unsatisfiable
from cached.store import Store
from cached.store.verified import VerifiedFile
from cached.types import JobState, ModelRef, OriginFile, Priority

log = logging.getLogger(__name__)

MAX_MANIFESTS = 512  # manifests kept in memory (by digest); the store keeps the rest
BLOB_WAIT_S = 3600.0  # how long a blob request waits for its fetch before giving up
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_PULL = ("GET", "HEAD")


class MirrorError(Exception):
    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail


def oci_error(status: int, code: str, message: str, detail: Any = None) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": detail}]}
    return web.json_response(body, status=status, headers={"Docker-Distribution-API-Version": "registry/2.0"})


class RegistryMirror:
    def __init__(
        self, *, store: Store, jobs: Jobs, client: RegistryClient, cfg: OciOriginConfig, metrics: Metrics
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._client = client
        self._cfg = cfg
        self._metrics = metrics
        self._tags: dict[tuple[str, str, str], tuple[str, float]] = {}  # (registry, name, tag) -> digest, until
        self._manifests: collections.OrderedDict[str, FetchedManifest] = collections.OrderedDict()
        # blob digest -> (the mirror ref of a manifest that lists it, its size)
        self._blobs: dict[tuple[str, str, str], tuple[ModelRef, int]] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/v2/{tail:.*}", self.handle)
        app.router.add_route("*", "/v2", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.method not in _PULL:
                raise MirrorError(405, "UNSUPPORTED", f"this mirror is read-only: {request.method} is not allowed")
            raw = request.raw_path.split("?", 1)[0].lower()
            if ".." in raw or "%2e" in raw or "%2f" in raw or "//" in raw:
                raise MirrorError(400, "NAME_INVALID", "path traversal or encoded separators in the name")
            tail = request.match_info.get("tail", "")
            if tail == "":
                return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})
            name, kind, reference = _split(tail)
            registry = self._upstream(request, name)
            if kind == "manifests":
                return await self._manifest(request, registry, name, reference)
            return await self._blob(request, registry, name, reference)
        except MirrorError as e:
            self._metrics.api_errors.labels("v2_" + e.code.lower()).inc()
            resp = oci_error(e.status, e.code, e.message, e.detail)
            if e.status == 405:
                resp.headers["Allow"] = "GET, HEAD"
            return resp
        except OriginError as e:
            status, code = _origin_status(e)
            self._metrics.api_errors.labels("v2_" + code.lower()).inc()
            return oci_error(status, code, str(e)[:1000])
        except CachedError as e:
            self._metrics.api_errors.labels("v2_" + e.code).inc()
            return oci_error(400, "UNSUPPORTED", str(e)[:1000])

    def _upstream(self, request: web.Request, name: str) -> str:
        ns = request.query.get("ns") or self._cfg.default_registry
        if not ns:
            raise MirrorError(404, "NAME_UNKNOWN", "no upstream: pass ?ns=REGISTRY or set origins.oci.default_registry")
        if ns == "docker.io":
            ns = "registry-1.docker.io"  # containerd's name for Docker Hub; its API host is this
        try:
            ModelRef.parse(f"oci://{ns}/{name}:latest")
        except RefError as e:
            raise MirrorError(400, "NAME_INVALID", str(e)[:500]) from None
        return ns

    # --- manifests -----------------------------------------------------------------------------

    async def _manifest(self, request: web.Request, registry: str, name: str, reference: str) -> web.StreamResponse:
        if is_digest(reference):
            m = await self._by_digest(registry, name, reference)
        elif _TAG.match(reference):
            m = await self._by_tag(registry, name, reference)
        else:
            raise MirrorError(400, "MANIFEST_INVALID", f"{reference[:200]!r} is neither a tag nor a sha256 digest")
        self._remember(registry, name, m)
        headers = {
            "Content-Type": m.media_type,
            "Docker-Content-Digest": m.digest,
            "Docker-Distribution-API-Version": "registry/2.0",
            "Content-Length": str(len(m.data)),
        }
        if request.method == "HEAD":
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)
            return resp
        self._metrics.local_served_bytes.labels("v2").inc(len(m.data))
        return web.Response(body=m.data, headers=headers)

    async def _by_tag(self, registry: str, name: str, tag: str) -> FetchedManifest:
        key = (registry, name, tag)
        cached = self._tags.get(key)
        if cached is not None and cached[1] > time.monotonic() and cached[0] in self._manifests:
            return self._manifests[cached[0]]
        m = await self._client.manifest(registry, name, tag)
        self._tags[key] = (m.digest, time.monotonic() + self._cfg.tag_ttl_s)
        if len(self._tags) > MAX_MANIFESTS:
            self._tags.pop(next(iter(self._tags)))
        return m

    async def _by_digest(self, registry: str, name: str, digest: str) -> FetchedManifest:
        m = self._manifests.get(digest)
        if m is not None:
            return m
        stored = await self._stored_manifest(registry, name, digest)
        if stored is not None:
            return stored
        return await self._client.manifest(registry, name, digest)

    async def _stored_manifest(self, registry: str, name: str, digest: str) -> FetchedManifest | None:
        """The manifest from the mirror's model of it, if this node has it."""
        rec = self._store.model(mirror_ref(registry, name, digest))
        entry = rec and next((f for f in rec.manifest.files if f.path == blob_path(digest)), None)
        if entry is None:
            return None
        data = await self._store.read_verified(blob_hex=entry.blob.hex, offset=0, length=entry.size)
        if data is None or len(data) != entry.size:
            return None
        try:
            media = FetchedManifest(data=data, media_type="", digest=digest).json().get("mediaType")
        except OriginError:
            return None
        return FetchedManifest(data=data, media_type=str(media or ""), digest=digest)

    def _remember(self, registry: str, name: str, m: FetchedManifest) -> None:
        """Keep the manifest, learn its blobs, and start fetching them through the swarm."""
        self._manifests[m.digest] = m
        self._manifests.move_to_end(m.digest)
        while len(self._manifests) > MAX_MANIFESTS:
            self._manifests.popitem(last=False)
        ref = mirror_ref(registry, name, m.digest)
        try:
            doc = m.json()
        except OriginError:
            doc = {}
        descs = [doc.get("config")] + list(doc.get("layers") or []) if isinstance(doc.get("layers"), list) else []
        for d in descs:
            if isinstance(d, dict) and isinstance(d.get("digest"), str) and is_digest(d["digest"]):
                size = d.get("size")
                if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                    self._blobs[(registry, name, d["digest"])] = (ref, size)
        if len(self._blobs) > MAX_MANIFESTS * 64:
            self._blobs.pop(next(iter(self._blobs)))
        if self._store.model(ref) is None:
            self._jobs.submit(ref, Priority.HIGH)

    # --- blobs ---------------------------------------------------------------------------------

    async def _blob(self, request: web.Request, registry: str, name: str, digest: str) -> web.StreamResponse:
        if not is_digest(digest):
            raise MirrorError(400, "DIGEST_INVALID", f"{digest[:200]!r} is not a sha256 digest")
        known = self._blobs.get((registry, name, digest)) or self._stored_blob(registry, name, digest)
        if known is None:
            raise MirrorError(404, "BLOB_UNKNOWN", f"{digest} is in no manifest this node served for {name}")
        ref, size = known
        hex_ = digest.removeprefix("sha256:")
        key = OriginFile(path="", size=size, identity=f"sha256|{hex_}|{size}").key
        headers = {
            "Docker-Content-Digest": digest,
            "Docker-Distribution-API-Version": "registry/2.0",
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
        }
        start, length, status = 0, size, 200
        rng = parse_range(request.headers.get("Range"))
        if rng is not None:
            span = rng.span(size)
            if span is None:
                return web.Response(status=416, headers={**headers, "Content-Range": unsatisfiable(size)})
            start, length, status = span.start, span.end - span.start + 1, 206
            headers["Content-Range"] = span.content_range
        headers["Content-Length"] = str(length)
        blob_hex = await self._verified_blob(ref, key)
        # Opened before the headers go: a blob evicted while it streams still sends this inode.
        source = await self._store.open_verified(blob_hex=blob_hex)
        if source is None:
            # It left the node between the check and the open (evicted): the fetch brings it back.
            source = await self._store.open_verified(blob_hex=await self._verified_blob(ref, key))
            if source is None:
                raise MirrorError(503, "TOOMANYREQUESTS", "the blob left this node; retry")
        with source:
            return await self._send(request, source, digest, headers, status, start, length)

    async def _send(
        self,
        request: web.Request,
        source: VerifiedFile,
        digest: str,
        headers: dict[str, str],
        status: int,
        start: int,
        length: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers=headers)
        try:
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            count = self._metrics.local_served_bytes.labels("v2").inc
            if await send_blob(request, resp, source, start, length, count) < length:
                # The headers are gone: cut the connection so the client sees a short body.
                log.warning("v2 blob shorter than its entry digest=%s", digest)
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write_eof()
        except ConnectionResetError:
            # The client went away (a cancelled pull): normal, not an error of ours.
            resp.force_close()
            self._metrics.api_errors.labels("client_closed").inc()
        except OSError as e:
            # A socket or disk error after the headers went: cut the connection so the client sees
            # a short body (and its digest check fails) rather than a 500 it cannot have any more.
            log.warning("v2 blob stream failed digest=%s error=%s", digest, e)
            resp.force_close()
            if request.transport is not None:
                request.transport.close()
        return resp

    def _stored_blob(self, registry: str, name: str, digest: str) -> tuple[ModelRef, int] | None:
        """A mirror model of ``registry/name`` in the store that holds ``digest`` (after a restart)."""
        prefix = f"oci://{registry}/{name}@"
        for rec in self._store.models():
            if rec.ref.startswith(prefix) and rec.ref.endswith("?path=" + MIRROR_PATH):
                for f in rec.manifest.files:
                    if f.path == blob_path(digest):
                        return ModelRef.parse(rec.ref), f.size
        return None

    async def _verified_blob(self, ref: ModelRef, key: str) -> str:
        """The blob, complete and verified in the store: fetched by the mirror model's job."""
        deadline = time.monotonic() + BLOB_WAIT_S
        submitted = False
        while True:
            blob_hex = self._store.blob_for_identity(key)
            if blob_hex is not None:
                return blob_hex
            job = self._jobs.get(ref)
            if job is None or not job.active:
                if submitted and job is not None and job.state is JobState.FAILED:
                    raise _job_failed(job.error)
                if self._store.model(ref) is not None and submitted:
                    raise MirrorError(404, "BLOB_UNKNOWN", "the blob is not part of the artifact")
                job = self._jobs.submit(ref, Priority.HIGH)
                submitted = True
            if time.monotonic() > deadline:
                raise MirrorError(503, "TOOMANYREQUESTS", "the blob did not arrive in time")
            await self._jobs.wait(job, 0.25)


def _split(tail: str) -> tuple[str, str, str]:
    """``<name>/manifests/<ref>`` or ``<name>/blobs/<digest>`` -> (name, kind, reference)."""
    for kind in ("manifests", "blobs"):
        name, sep, ref = tail.rpartition(f"/{kind}/")
        if sep and name and ref and "/" not in ref:
            return name, kind, ref
    raise MirrorError(404, "NAME_UNKNOWN", "not a pull route (/v2/<name>/manifests/<ref> or /v2/<name>/blobs/<digest>)")


def _origin_status(e: OriginError) -> tuple[int, str]:
    if isinstance(e, OriginNotFound):
        return 404, "MANIFEST_UNKNOWN"
    if isinstance(e, OriginDenied):
        return 403, "DENIED"
    if e.retryable:
        return 503, "UNAVAILABLE"
    return 400, "MANIFEST_INVALID"  # the upstream's manifest is unusable (malformed, too large, unsupported)


def _job_failed(error: object) -> MirrorError:
    text = str(error)[:1000]
    if isinstance(error, IntegrityError) or "sha256" in text:
        return MirrorError(400, "BLOB_UNKNOWN", f"the upstream blob failed verification: {text}")
    return MirrorError(404 if "not found" in text.lower() else 503, "BLOB_UNKNOWN", f"the blob fetch failed: {text}")
