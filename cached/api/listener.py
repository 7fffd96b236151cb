"""Connection limits for the daemon's HTTP listeners: the local API (TCP or unix socket) and the
peer API (plain or TLS). One implementation serves both.

aiohttp closes a keep-alive connection that sits idle (``keepalive_timeout``), but it has no
deadline for a connection that never completes its request headers, no cap on how many
connections one address holds, and no bound on how long a request body may trickle in. Without
them, a few thousand idle sockets exhaust the process's file descriptors, and then every accept,
store open and peer connect fails. ``ListenerGuard`` adds, per listener (``ListenerLimits``):

* a global cap and a per-address cap (per uid on the unix socket): past either, the connection is
  closed at once, before aiohttp sees it;
* a header deadline from accept to the first complete request head (slowloris, idle sockets);
* a body deadline from the request head to the end of its body (a trickled body);
* the idle deadline between keep-alive requests, as aiohttp's ``keepalive_timeout``;
* for TLS, the handshake bounded by the header deadline.

File descriptors are kept in reserve: at start the soft RLIMIT_NOFILE is raised to the hard limit
and the caps of all listeners are clamped to leave ``RESERVE_FDS`` for store files, origin and
peer connections. Every refusal and timeout is counted; the log gets at most one line per
``WARN_EVERY_S`` per listener, never a traceback.

What this module does not do: authenticate, parse HTTP, or limit request rates (cached.api.*).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from cached.config import ListenerLimits
from cached.metrics import Metrics

log = logging.getLogger(__name__)

RESERVE_FDS = 256  # left to the store, origin and peer connections, whatever the listeners hold
WARN_EVERY_S = 10.0


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # RLIM_INFINITY above fs.nr_open, or a sandbox
            log.info("cannot raise the open-file limit soft=%d hard=%d error=%s", soft, hard, e)
    return soft


def clamp(limits: dict[str, ListenerLimits], fd_limit: int) -> dict[str, ListenerLimits]:
    """The listeners' caps, scaled down together so that RESERVE_FDS stay free of ``fd_limit``."""
    budget = max(len(limits), fd_limit - RESERVE_FDS)
    total = sum(lim.max_connections for lim in limits.values())
    out = {}
    for name, lim in limits.items():
        cap = lim.max_connections if total <= budget else max(1, lim.max_connections * budget // total)
        new = dataclasses.replace(lim, max_connections=cap, max_connections_per_ip=min(lim.max_connections_per_ip, cap))
        if new != lim:
            log.warning(
                "listener=%s connection caps clamped to keep %d file descriptors in reserve (open-file limit %d): "
                "max_connections %d -> %d, max_connections_per_ip %d -> %d",
                name,
                RESERVE_FDS,
                fd_limit,
                lim.max_connections,
                new.max_connections,
                lim.max_connections_per_ip,
                new.max_connections_per_ip,
            )
        out[name] = new
    return out


def listener_guards(metrics: Metrics, **limits: ListenerLimits | None) -> dict[str, ListenerGuard]:
    """One guard per listener that is on (``api=..., peer=...``), caps clamped to the fd budget."""
    on = {name: lim for name, lim in limits.items() if lim is not None}
    return {name: ListenerGuard(name, lim, metrics) for name, lim in clamp(on, raise_fd_limit()).items()}


class ListenerGuard:
    def __init__(self, name: str, limits: ListenerLimits, metrics: Metrics) -> None:
        self.name = name
        self.limits = limits
        self._metrics = metrics
        self._open = 0
        self._per_peer: Counter[str] = Counter()
        self._conns: dict[RequestHandler, _Connection] = {}
        self._last_warning = -WARN_EVERY_S
        self._unreported: Counter[str] = Counter()
        metrics.listener_max_connections.labels(name).set(limits.max_connections)
        metrics.listener_connections.labels(name).set(0)
        for reason in ("max_connections", "max_connections_per_ip"):
            metrics.listener_refused.labels(name, reason)
        for kind in ("header", "body"):
            metrics.listener_timeouts.labels(name, kind)

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``web.AppRunner`` (handed on to aiohttp's RequestHandler)."""
        return {"keepalive_timeout": self.limits.idle_timeout_s}

    async def start_tcp(
        self, runner: web.AppRunner, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._attach(runner)
        await _GuardedTCPSite(runner, host, port, guard=self, ssl_context=ssl_context).start()

    async def start_unix(self, runner: web.AppRunner, path: str) -> None:
        self._attach(runner)
        await _GuardedUnixSite(runner, path, guard=self).start()

    @property
    def open_connections(self) -> int:
        return self._open

    # --- the runner's server --------------------------------------------------------------------

    def _attach(self, runner: web.AppRunner) -> None:
        """Hear of each request head as aiohttp completes it: the request factory is the one
        place it calls for every parsed head, before the handler runs."""
        server = runner.server
        assert server is not None, "runner.setup() first"
        make_request = server.request_factory

        def request_factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
            conn = self._conns.get(protocol)
            if conn is not None:
                conn.request_started(payload)
            return make_request(message, payload, protocol, writer, task)

        server.request_factory = request_factory

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        return lambda: _Connection(self, server)

    # --- accounting -----------------------------------------------------------------------------

    def _admit(self, peer: str) -> str | None:
        """Take a slot for ``peer``, or say why not."""
        if self._open >= self.limits.max_connections:
            return "max_connections"
        if self._per_peer[peer] >= self.limits.max_connections_per_ip:
            return "max_connections_per_ip"
        self._open += 1
        self._per_peer[peer] += 1
        self._metrics.listener_connections.labels(self.name).set(self._open)
        return None

    def _release(self, peer: str) -> None:
        self._open -= 1
        self._per_peer[peer] -= 1
        if not self._per_peer[peer]:
            del self._per_peer[peer]
        self._metrics.listener_connections.labels(self.name).set(self._open)

    def _refused(self, reason: str, peer: str) -> None:
        self._metrics.listener_refused.labels(self.name, reason).inc()
        self._note(f"refused:{reason}", peer)

    def _timed_out(self, kind: str, peer: str) -> None:
        self._metrics.listener_timeouts.labels(self.name, kind).inc()
        self._note(f"timeout:{kind}", peer)

    def _note(self, what: str, peer: str) -> None:
        # A flood produces thousands of these a second: one summary line per WARN_EVERY_S.
        self._unreported[what] += 1
        now = time.monotonic()
        if now - self._last_warning < WARN_EVERY_S:
            return
        self._last_warning = now
        summary = " ".join(f"{k}={n}" for k, n in sorted(self._unreported.items()))
        self._unreported.clear()
        log.warning(
            "listener=%s closing connections over its limits (%s) last_peer=%s open=%d max_connections=%d max_connections_per_ip=%d",
            self.name,
            summary,
            peer,
            self._open,
            self.limits.max_connections,
            self.limits.max_connections_per_ip,
        )


class _Connection(asyncio.Protocol):
    """Admits one accepted connection, then hands it to aiohttp's RequestHandler (created only
    once admitted) and enforces the header and body deadlines around it."""

    def __init__(self, guard: ListenerGuard, server: web.Server) -> None:
        self._guard = guard
        self._server = server
        self._inner: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._peer = _peer_key(transport)
        reason = self._guard._admit(self._peer)
        if reason is not None:
            transport.abort()
            self._guard._refused(reason, self._peer)
            return
        self._transport = transport
        self._inner = self._server()
        self._guard._conns[self._inner] = self
        self._arm(self._guard.limits.header_timeout_s, "header")
        self._inner.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        inner = self._inner
        if inner is None:
            return
        self._inner = None
        self._transport = None
        self._disarm()
        self._guard._conns.pop(inner, None)
        self._guard._release(self._peer)
        inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def request_started(self, payload: Any) -> None:
        """A request head is complete: the header deadline is met; the body's starts now.
        Between requests aiohttp's keepalive_timeout (idle_timeout_s) takes over."""
        self._disarm()
        if not payload.is_eof():
            self._arm(self._guard.limits.body_timeout_s, "body")
            payload.on_eof(self._disarm)

    def _arm(self, delay: float, kind: str) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire, kind)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, kind: str) -> None:
        self._timer = None
        if self._transport is not None:
            self._guard._timed_out(kind, self._peer)
            # abort, not close: a TLS close would wait for the stalled peer's close_notify.
            self._transport.abort()


def _peer_key(transport: asyncio.BaseTransport) -> str:
    """The address the per-peer cap counts: the IP for TCP, the caller's uid on a unix socket."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            _, uid, _ = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
            return f"uid:{uid}"
        except OSError:
            pass
    return "local"


class _GuardedTCPSite(web.TCPSite):
    """aiohttp's TCPSite with the guard's protocol factory (its own start passes the runner's
    server directly, with no hook) and the TLS handshake bounded by the header deadline."""

    __slots__ = ("_guard",)

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, *, guard: ListenerGuard, ssl_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner (runner.addresses)
        server = self._runner.server
        assert server is not None
        extra = {"ssl_handshake_timeout": self._guard.limits.header_timeout_s} if self._ssl_context else {}
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            **extra,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


class _GuardedUnixSite(web.UnixSite):
    __slots__ = ("_guard",)

    def __init__(self, runner: web.AppRunner, path: str, *, guard: ListenerGuard) -> None:
        super().__init__(runner, path)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._guard.protocol_factory(server),
            self._path,
            backlog=self._backlog,
        )
