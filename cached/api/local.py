"""The local control API (``/v1``), ``/metrics``, ``/healthz`` and ``/readyz``.

JSON in and out. Every failure is ``{"error": code, "message": text}`` with a 4xx/5xx status
chosen here (``STATUS``) from the ``CachedError`` subclass; a malformed body, parameter or ref is
a 400 and never a 500. Handlers parse strings into types at this edge and call the components;
they hold no logic of their own beyond shaping answers: a model object is the JSON of
``cached.status.ModelStatus``, and the scheduler extender routes are ``cached.api.k8s``'s.

Before any handler, ``_guard`` refuses what no local client needs (``cached.api.access``): a
``Host`` that is not a name of this daemon (421: DNS rebinding), an ``Origin`` of a foreign web
page (403: cross-site requests), a non-JSON body on a ``/v1`` POST/DELETE (415: an HTML form can
send text/plain without a preflight), and admin routes without an admin credential (401/403).
Every refusal is counted in ``cached_api_errors_total`` by its code.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cached import __version__
from cached.api import openapi
from cached.api.access import (
    AdminPolicy,
    Caller,
    Forbidden,
    ForeignOrigin,
    HostPolicy,
    MisdirectedHost,
    Unauthenticated,
    caller_of,
)
from cached.api.body import read_object
from cached.api.hf import HfEndpoint
from cached.api.k8s import K8sExtender
from cached.api.registry import RegistryMirror
from cached.api.ui import StatusPage
from cached.cluster import Catalog, Locator, Reconciler, local_only
from cached.errors import (
    CachedError,
    ConflictError,
    FetchCancelled,
    IntegrityError,
    NotFoundError,
    OriginChanged,
    OriginDenied,
    OriginError,
    OriginNotFound,
    RefError,
    RequestError,
    StoreFullError,
)
from cached.jobs import Jobs
from cached.metrics import Metrics
from cached.origins.local import FileNotAllowed, LocalOrigin
from cached.status import StatusSource
from cached.store import Store
from cached.transfer.model import ModelFetcher
from cached.transfer.refresh import COMMIT
from cached.types import JobState, ModelRef, Priority, RefKind

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
EVENTS_KEEPALIVE_S = 15.0
# A positive file:// check of a ready model stands this long for the same caller and ref: the
# walk of the source took a quarter of the daemon's CPU under scripts/bench_load.py when done on
# every prefetch. A revoked permission is honoured within this time (the store's own files are
# readable by the cached group regardless; docs/security.md).
FILE_DECISION_TTL_S = 5.0
# ...and is still taken, for this long past that, by requests that arrive while another request of
# the same caller re-checks it.
FILE_DECISION_STALE_S = 30.0
MAX_FILE_DECISIONS = 4096
# Destructive or cluster-wide: need an admin credential (evict needs one only with force).
ADMIN_ROUTES = frozenset(
    {("POST", "/v1/pin"), ("POST", "/v1/unpin"), ("POST", "/v1/replicate"), ("POST", "/v1/gc"), ("POST", "/v1/verify")}
)
JSON_TYPES = frozenset({"application/json"})


class UnsupportedMediaType(CachedError):
    code = "unsupported_media_type"


class Unavailable(CachedError):
    code = "unavailable"


STATUS: list[tuple[type[CachedError], int]] = [
    (Unavailable, 503),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (ForeignOrigin, 403),
    (MisdirectedHost, 421),
    (UnsupportedMediaType, 415),
    (FileNotAllowed, 403),
    (RefError, 400),
    (RequestError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
    (FetchCancelled, 409),
    (StoreFullError, 507),
    (IntegrityError, 502),  # the origin's bytes failed its own checksum
    (OriginNotFound, 404),
    (OriginDenied, 403),
    (OriginChanged, 409),
    (OriginError, 502),
]


def status_for(e: CachedError) -> int:
    for cls, status in STATUS:
        if isinstance(e, cls):
            return status
    return 500


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


class LocalApi:
    def __init__(
        self,
        *,
        node_id: str,
        labels: Mapping[str, str] | None = None,
        store: Store,
        jobs: Jobs,
        status: StatusSource,
        fetcher: ModelFetcher,
        metrics: Metrics,
        hf: HfEndpoint | None = None,
        peers: Callable[[], list[dict[str, Any]]] = lambda: [],
        catalog: Catalog | None = None,
        reconciler: Reconciler | None = None,
        locator: Locator | None = None,
        clock: Callable[[], float] = time.time,
        files: LocalOrigin | None = None,
        admin: AdminPolicy | None = None,
        hosts: HostPolicy | None = None,
        mirror: RegistryMirror | None = None,
    ) -> None:
        self._labels = dict(labels or {})  # this node's (labels.zone, labels.rack), shown by locate
        self._hf = hf
        self._mirror = mirror
        self._files = files
        self._admin = admin if admin is not None else AdminPolicy(token=None)
        self._hosts = hosts if hosts is not None else HostPolicy()
        # Who is on each connection, looked up once per connection: a socket's owner cannot change,
        # and the loopback TCP lookup reads /proc/net/tcp, which took 40% of the event loop under
        # scripts/bench_load.py when it ran for every request.
        self._callers: weakref.WeakKeyDictionary[Any, Caller] = weakref.WeakKeyDictionary()
        # (uid, gids, ref) -> until when a positive file:// check of a ready model stands.
        self._file_decisions: collections.OrderedDict[tuple[Any, ...], float] = collections.OrderedDict()
        self._file_checks: dict[tuple[Any, ...], tuple[asyncio.Lock, int]] = {}  # key -> (lock, waiters)
        self._peers = peers
        self._catalog = catalog
        self._reconciler = reconciler
        self._locator = locator
        self._status = status
        self._k8s = K8sExtender(node_id=node_id, status=status, locator=locator)
        self._ui = StatusPage(node_id=node_id, status=status, peers=peers, catalog=catalog, locator=locator)
        self._node_id = node_id
        self._store = store
        self._jobs = jobs
        self._fetcher = fetcher
        self._metrics = metrics
        self._clock = clock
        self._closing = asyncio.Event()
        self.ready = False

    def close(self) -> None:
        """Before the server stops: end long-lived responses (event streams)."""
        self._closing.set()
        self.ready = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._guard])
        r = app.router
        r.add_post("/v1/prefetch", self.prefetch)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/status", self.status)
        r.add_post("/v1/evict", self.evict)
        r.add_post("/v1/pin", self.pin)
        r.add_post("/v1/unpin", self.unpin)
        r.add_get("/v1/leases", self.leases)
        r.add_post("/v1/leases", self.take_lease)
        r.add_delete("/v1/leases/{lease_id}", self.release_lease)
        r.add_post("/v1/leases/{lease_id}/renew", self.renew_lease)
        r.add_post("/v1/verify", self.verify)
        r.add_post("/v1/gc", self.gc)
        r.add_get("/v1/node", self.node)
        r.add_get("/v1/openapi.json", self.openapi)
        r.add_get("/v1/peers", self.peers)
        r.add_get("/v1/locate", self.locate)
        r.add_get("/v1/events", self.events)
        r.add_post("/v1/replicate", self.replicate)
        r.add_get("/v1/catalog", self.catalog)
        r.add_get("/metrics", self.metrics)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        self._k8s.add_routes(app)
        self._ui.add_routes(app)  # GET /ui, /ui/{name}, /v1/cluster
        if self._hf is not None:
            self._hf.add_routes(app)
        if self._mirror is not None:
            self._mirror.add_routes(app)
        return app

    # --- plumbing ------------------------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except CachedError as e:
            status = status_for(e)
            self._metrics.api_errors.labels(e.code).inc()
            if status >= 500 and not isinstance(e, (OriginError, StoreFullError)):
                log.error("request failed path=%s error=%s", request.path, e)
            return error_response(status, e.code, e.message)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status, "bad_request")
            self._metrics.api_errors.labels(code).inc()
            resp = error_response(
                e.status, code, e.reason if e.status != 404 else f"no route {request.method} {request.path}"
            )
            for k, v in e.headers.items():
                if k.lower().startswith("x-error-"):
                    resp.headers[k] = v  # the HF endpoint's error codes
            return resp
        except asyncio.CancelledError:
            if request.transport is None:
                # handler_cancellation: the client hung up (reset) while we answered. Normal.
                log.debug("client closed the connection path=%s", request.path)
                self._metrics.api_errors.labels("client_closed").inc()
            raise
        except ConnectionResetError as e:
            # The client closed or reset its connection mid-answer (aria2c drops its extra
            # connections, a download is cancelled): normal, and nothing can be sent any more.
            log.debug("client closed the connection path=%s error=%s", request.path, e)
            self._metrics.api_errors.labels("client_closed").inc()
            return web.Response(status=499)
        except Exception as e:  # noqa: BLE001 - a bug answers 500 with no traceback, and is logged
            log.exception("unhandled error path=%s", request.path)
            self._metrics.api_errors.labels("internal").inc()
            return error_response(500, "internal", f"internal error ({type(e).__name__}); see the daemon log")

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """What is refused before any handler runs (see the module docstring)."""
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        unix = sock is not None and sock.family == socket.AF_UNIX
        local = request.transport.get_extra_info("sockname") if request.transport is not None and not unix else None
        self._hosts.check(
            host=request.headers.get("Host"),
            origin=request.headers.get("Origin"),
            unix=unix,
            local_ip=local[0] if isinstance(local, tuple) and local else None,
        )
        if (request.method, request.path) in ADMIN_ROUTES:
            self._require_admin(request)
        if request.path.startswith("/v1/") and request.method in ("POST", "PUT", "PATCH", "DELETE"):
            # An empty body carries nothing to forge; any other body must be JSON.
            has_body = (request.content_length or 0) > 0 or "chunked" in request.headers.get(
                "Transfer-Encoding", ""
            ).lower()
            if has_body and request.content_type not in JSON_TYPES:
                raise UnsupportedMediaType(
                    f"request bodies must be JSON (Content-Type: application/json), not {request.content_type!r}"
                )
        return await handler(request)

    def _caller(self, request: web.Request) -> Caller:
        transport = request.transport
        if transport is None:
            return caller_of(None)
        caller = self._callers.get(transport)
        if caller is None:
            caller = self._callers[transport] = caller_of(transport)
        return caller

    def _require_admin(self, request: web.Request) -> None:
        self._admin.check(request.headers.get("Authorization"), self._caller(request))

    async def _body(self, request: web.Request) -> dict[str, Any]:
        return await read_object(request)

    def _model(self, ref: ModelRef) -> dict[str, Any]:
        return self._status.of(ref).to_json()

    @staticmethod
    def _ref(value: Any) -> ModelRef:
        if value is None:
            raise RequestError("missing 'ref'")
        if not isinstance(value, str):
            raise RequestError("'ref' must be a string")
        return ModelRef.parse(value)

    @staticmethod
    def _opt(body: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any) -> Any:
        value = body.get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
            raise RequestError(f"'{key}' has the wrong type")
        if not isinstance(value, typ):
            raise RequestError(f"'{key}' has the wrong type")
        return value

    async def _wait_or_close(self, waiting: Awaitable[bool]) -> bool | None:
        """``waiting``'s result, or None if the daemon starts stopping first."""
        task = asyncio.ensure_future(waiting)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not task.done():
                task.cancel()
        return task.result() if task.done() and not task.cancelled() else None

    # --- models --------------------------------------------------------------------------------

    async def prefetch(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ref = self._ref(body.get("ref"))
        include = self._opt(body, "include", list, [])
        exclude = self._opt(body, "exclude", list, [])
        if include or exclude:
            if not all(isinstance(p, str) for p in include + exclude):
                raise RequestError("'include' and 'exclude' must be lists of strings")
            ref = ref.with_patterns(include, exclude)
        refresh = self._opt(body, "refresh", bool, False)
        wait = self._opt(body, "wait", bool, False)
        try:
            priority = Priority.parse(self._opt(body, "priority", str, "normal"))
        except ValueError as e:
            raise RequestError(str(e)) from None
        timeout_s = self._opt(body, "timeout_s", (int, float), None)
        if timeout_s is not None and not 0 < timeout_s <= 86400:
            raise RequestError("'timeout_s' must be between 0 and 86400")
        if ref.kind is RefKind.FILE:
            await self._authorize_file(request, ref, ready=self._store.model(ref) is not None)
        current = self._jobs.get(ref)
        rec = self._store.model(ref)
        # A model /hf pulled file by file is ready only for what it holds: a prefetch fetches the rest.
        whole = rec is not None and self._store.pulled_missing(ref, rec.manifest) == ()
        if not refresh and whole and (current is None or not current.active):
            # Ready here: answer at once, whatever queue the download jobs are in.
            await self._store.touch(ref)
            self._metrics.prefetch_jobs.labels("ok").inc()  # a prefetch that found it ready is one that succeeded
            return web.json_response(self._model(ref), status=200 if wait else 202)
        job = self._jobs.submit(ref, priority if not wait else min(priority, Priority.HIGH), refresh=refresh)
        if not wait:
            return web.json_response(self._model(ref), status=202)
        finished = await self._wait_or_close(self._jobs.wait(job, timeout_s))
        if finished is None:
            raise Unavailable("the daemon is stopping; the fetch will resume when it is back")
        if finished and job.state is JobState.FAILED and self._store.model(ref) is None:
            obj = self._model(ref)
            status = 409 if job.error_code == FetchCancelled.code else _status_for_code(job.error_code)
            return web.json_response({"error": job.error_code, "message": job.error, "model": obj}, status=status)
        return web.json_response(self._model(ref), status=200 if finished else 202)

    async def _authorize_file(self, request: web.Request, ref: ModelRef, *, ready: bool) -> None:
        """file:// refs: only what the caller could read itself, under the allowed roots.

        A launcher asks for its ready model again and again; the answer for the same caller and
        ref is kept for FILE_DECISION_TTL_S, so those calls cost no walk of the source. Only for a
        ready model: an import always checks the files it is about to copy."""
        if self._files is None:
            raise FileNotAllowed(f"{ref}: file:// imports are off on this daemon")
        caller = self._caller(request)
        key = (caller.uid, caller.gids, ref.canonical)
        until = self._file_decisions.get(key)
        if ready and until is not None:
            now = time.monotonic()
            # Fresh; or just run out while another request of this caller re-checks it: that one
            # waits for the walk, the others go on (under load a walk on worker threads takes
            # hundreds of ms, and two hundred launchers must not all stop for it every 5 s).
            if until > now or (key in self._file_checks and until + FILE_DECISION_STALE_S > now):
                return
        lock, users = self._file_checks.get(key, (asyncio.Lock(), 0))
        self._file_checks[key] = (lock, users + 1)
        try:
            async with lock:
                if ready and self._file_decisions.get(key, 0.0) > time.monotonic():
                    return
                try:
                    await self._files.authorize(ref, uid=caller.uid, gids=caller.gids)
                except CachedError:
                    self._file_decisions.pop(key, None)  # revoked: nobody goes on with the old answer
                    raise
                self._file_decisions[key] = time.monotonic() + FILE_DECISION_TTL_S
                self._file_decisions.move_to_end(key)
                while len(self._file_decisions) > MAX_FILE_DECISIONS:
                    self._file_decisions.popitem(last=False)
        finally:
            lock, users = self._file_checks[key]
            if users <= 1:
                del self._file_checks[key]
            else:
                self._file_checks[key] = (lock, users - 1)

    async def models(self, request: web.Request) -> web.Response:
        # ?all=1: failed prefetches past jobs.failed_ttl_s too (cachectl ls --all).
        every = request.query.get("all", "").lower() in ("1", "true", "yes")
        return web.json_response([self._model(r) for r in self._status.known(all=every)])

    def _held_ref(self, value: Any) -> ModelRef:
        """The ref that a read or a claim names. A branch ref whose repo this node only holds
        as a pull through /hf (``hf://org/m`` while /hf pulled ``hf://org/m@<commit>``) stands
        for that commit, the one the branch last resolved to; a prefetch never goes through
        here (it resolves the branch at the hub)."""
        ref = self._ref(value)
        if ref.kind is not RefKind.HF or ref.include or ref.exclude or COMMIT.fullmatch(ref.revision):
            return ref
        if self._store.model(ref) is not None or self._jobs.get(ref) is not None:
            return ref
        commit = self._store.pulls.branch(ref.repo, ref.revision)
        if commit is None:
            return ref
        pulled = ModelRef.parse(f"hf://{ref.repo}@{commit}")
        return pulled if self._store.model(pulled) is not None else ref

    async def status(self, request: web.Request) -> web.Response:
        ref = self._held_ref(request.query.get("ref"))
        return web.json_response(self._model(ref))

    async def evict(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        force = self._opt(body, "force", bool, False)
        if force:
            self._require_admin(request)
        ref = self._held_ref(body.get("ref"))
        freed = await self._jobs.evict(ref, force=force)
        return web.json_response({**self._model(ref), "freed_bytes": freed})

    async def pin(self, request: web.Request) -> web.Response:
        ref = self._held_ref((await self._body(request)).get("ref"))
        await self._store.claims.pin(ref)
        return web.json_response(self._model(ref))

    async def unpin(self, request: web.Request) -> web.Response:
        ref = self._held_ref((await self._body(request)).get("ref"))
        await self._store.claims.unpin(ref)
        return web.json_response(self._model(ref))

    # --- leases --------------------------------------------------------------------------------

    async def leases(self, request: web.Request) -> web.Response:
        return web.json_response([lease.to_json() for lease in self._store.claims.active_leases()])

    async def take_lease(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ref = self._held_ref(body.get("ref"))
        holder = self._opt(body, "holder", str, "")
        if not holder or len(holder) > 256:
            raise RequestError("'holder' must be a non-empty string (who runs the model, e.g. 'vllm@pod-1')")
        ttl_s = self._opt(body, "ttl_s", (int, float), 3600)
        if not 0 < ttl_s <= 10 * 365 * 86400:
            raise RequestError("'ttl_s' must be a number of seconds, more than 0 and at most ten years")
        rec = self._store.model(ref)
        if rec is None:
            raise ConflictError(f"{ref} is not ready on this node; prefetch it first")
        lease = await self._store.claims.take_lease(ref, holder, float(ttl_s), manifest=rec.manifest.digest)
        await self._store.touch(ref)
        self._metrics.leases.set(len(self._store.claims.active_leases()))
        # For hf refs the per-commit snapshot: it stays valid after a refresh moves the ref on.
        snapshot = self._store.hf_snapshot(rec.manifest)
        path = snapshot if snapshot is not None else rec.path
        return web.json_response(
            {**lease.to_json(), "path": str(path), "hf_path": str(self._store.hf_dir) if snapshot else None}, status=201
        )

    async def renew_lease(self, request: web.Request) -> web.Response:
        # The heartbeat of a launcher (`cachectl run`): a short TTL kept alive while the engine runs.
        body = await self._body(request)
        ttl_s = self._opt(body, "ttl_s", (int, float), 3600)
        lease = await self._store.claims.renew(request.match_info["lease_id"], float(ttl_s))
        return web.json_response(lease.to_json())

    async def release_lease(self, request: web.Request) -> web.Response:
        lease = await self._store.claims.release(request.match_info["lease_id"])
        self._metrics.leases.set(len(self._store.claims.active_leases()))
        await self._store.release_unretained()
        return web.json_response(lease.to_json())

    # --- maintenance ---------------------------------------------------------------------------

    async def verify(self, request: web.Request) -> web.Response:
        raw = await request.read()
        ref = None
        if raw.strip():
            body = await self._body(request)
            if body.get("ref") is not None:
                ref = self._ref(body["ref"])
                if self._store.model(ref) is None:
                    raise NotFoundError(f"{ref} is not ready on this node")
        report = await self._fetcher.verify(ref)
        return web.json_response(
            {
                "checked_bytes": report.checked_bytes,
                "bad_pieces": report.bad_pieces,
                "repaired_blobs": report.repaired_blobs,
                "errors": list(report.errors),
            }
        )

    async def gc(self, request: web.Request) -> web.Response:
        freed, evicted = await self._store.gc()
        self._metrics.evictions.inc(len(evicted))
        return web.json_response({"freed_bytes": freed, "evicted": evicted})

    # --- node ----------------------------------------------------------------------------------

    def node_object(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "node_id": self._node_id,
            "version": __version__,
            "pid": os.getpid(),
            "cache_dir": str(self._store.root),
            "used_bytes": self._store.used_bytes,
            "capacity_bytes": self._store.capacity_bytes,
            # Set when store.max_bytes is larger than the filesystem (null otherwise).
            "capacity_warning": self._store.capacity_warning,
            "reserved_bytes": self._store.reserved_bytes,
            "blobs": self._store.blob_count(),
            "models": {state.value: n for state, n in self._status.counts().items()},
            "transfers": [
                {
                    "ref": j.ref.canonical,
                    "state": j.state.value,
                    "bytes_done": j.progress.bytes_done,
                    "bytes_total": j.progress.bytes_total,
                    "rate_bps": round(j.rate_bps(now)),
                }
                for j in self._jobs.active()
            ],
            "pins": sum(1 for r in self._status.known() if self._store.claims.is_pinned(r.canonical)),
            "leases": len(self._store.claims.active_leases()),
            "peers": self._peers(),
        }

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    async def node(self, request: web.Request) -> web.Response:
        return web.json_response(self.node_object())

    async def peers(self, request: web.Request) -> web.Response:
        return web.json_response(self._peers())

    async def locate(self, request: web.Request) -> web.Response:
        ref = self._held_ref(request.query.get("ref"))
        if self._locator is not None:
            return web.json_response({"ref": ref.canonical, "nodes": await self._locator.locate(ref)})
        here = self._status.of(ref)
        nodes = []
        if here.state is JobState.READY or here.in_flight:
            remaining = here.bytes_total - here.bytes_done
            rate = here.rate_bps or 0
            eta = 0 if here.state is JobState.READY else (round(remaining / rate, 1) if rate > 0 else None)
            nodes.append(
                {
                    "node_id": self._node_id,
                    "state": here.state.value,
                    "bytes_done": here.bytes_done,
                    "bytes_total": here.bytes_total,
                    "eta_s": eta,
                    "zone": self._labels.get("zone"),
                    "rack": self._labels.get("rack"),
                }
            )
        return web.json_response({"ref": ref.canonical, "nodes": nodes})

    # --- cluster -------------------------------------------------------------------------------

    def _cluster(self) -> tuple[Catalog, Reconciler]:
        if self._catalog is None or self._reconciler is None:
            raise ConflictError("this node is not in a cluster (start it with --cluster-token-file)")
        return self._catalog, self._reconciler

    def _entry_object(self, ref: str) -> dict[str, Any]:
        catalog, reconciler = self._cluster()
        entry = catalog.get(ref)
        return {
            "ref": ref,
            "replicas": entry.replicas if entry else 0,
            "labels": dict(entry.labels) if entry else {},
            "owners": reconciler.owners(ref),
        }

    async def replicate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ref = self._ref(body.get("ref"))
        if ref.kind is RefKind.FILE:  # internal http(s) URLs are refused by the catalog itself
            raise RequestError(f"cannot replicate {ref}: {local_only(ref)}")
        replicas = body.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise RequestError("'replicas' must be an integer (0 removes the entry)")
        labels = self._opt(body, "labels", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise RequestError("'labels' must map strings to strings")
        catalog, reconciler = self._cluster()
        catalog.set(ref, replicas, labels)
        reconciler.reconcile()
        return web.json_response(self._entry_object(ref.canonical))

    async def catalog(self, request: web.Request) -> web.Response:
        catalog, _ = self._cluster()
        return web.json_response([self._entry_object(e.ref) for e in catalog.entries()])

    async def events(self, request: web.Request) -> web.StreamResponse:
        """NDJSON: one event per line; ``?ref=`` filters to one model."""
        only = self._ref(request.query["ref"]).canonical if "ref" in request.query else None
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            await self._stream_events(resp, only)
        except ConnectionError:
            # The client hung up: an ordinary end of a stream, not an error.
            log.debug("event stream closed by the client")
        return resp

    async def _stream_events(self, resp: web.StreamResponse, only: str | None) -> None:
        async with self._jobs.events.subscribe() as queue:
            if only is not None:
                first = self._model(ModelRef.parse(only))
                await resp.write(json.dumps({"event": "snapshot", **first}).encode() + b"\n")
            while not self._closing.is_set():
                getter = asyncio.ensure_future(queue.get())
                closing = asyncio.ensure_future(self._closing.wait())
                try:
                    await asyncio.wait(
                        {getter, closing}, timeout=EVENTS_KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    closing.cancel()
                    if not getter.done():
                        getter.cancel()
                if not getter.done() or getter.cancelled():
                    # Nothing happened for a while: an empty line keeps proxies from timing the
                    # stream out and tells us when the client has gone.
                    await resp.write(b"\n")
                    continue
                event = getter.result()
                if only is None or event.get("ref") == only:
                    await resp.write(json.dumps(event).encode() + b"\n")
        await resp.write_eof()

    # --- health and metrics --------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        m = self._metrics
        m.store_bytes.set(self._store.used_bytes)
        m.store_capacity.set(self._store.capacity_bytes)
        for state, n in self._status.counts().items():
            m.models.labels(state.value).set(n)
        m.leases.set(len(self._store.claims.active_leases()))

    async def metrics(self, request: web.Request) -> web.Response:
        self.refresh_gauges()
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ready"})


_CODE_STATUS = {cls.code: status for cls, status in STATUS}


def _status_for_code(code: str | None) -> int:
    return _CODE_STATUS.get(code or "", 500)
