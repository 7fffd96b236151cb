"""Ranged HTTP GETs whose bodies go straight to a sink on a worker thread: the bulk byte path.

Every piece the node downloads (from an http:// origin, the hub or its CDN, or a peer) comes
through here. One worker thread per request reads the body with ``readinto`` into a reused
128 KiB buffer and hands each batch to the caller's sink (hash, then ``pwrite`` at the offset),
so the event loop never touches the bytes. Measured on a 2-CPU VM against nginx: this path moved
2 GiB in 1.6-2.4 s where aiohttp's ``readexactly`` with hand-offs to a thread took 5-7 s; most
of the difference is the size of each ``pwrite`` (large writes cost far more kernel time per
byte there) and the loop's own copies. See docs/benchmarks.md.

Invariant: once ``read_into`` has returned or raised (including when its task was cancelled),
the sink is not running and will never be called again for that request, so a partial blob can
be closed or a piece recorded right after.

This module speaks HTTP/1.1 through the standard library (keep-alive pool per host, TLS through
an ``ssl.SSLContext``). It does not follow redirects (it raises ``Redirected``; callers decide
whether a token may follow), retry, or map statuses to domain errors: ``check`` does that.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from urllib.parse import quote, urlsplit, urlunsplit

from cached.ranges import content_range

BATCH_BYTES = 128 << 10
_REDIRECTS = (301, 302, 303, 307, 308)
_DRAIN_LIMIT = 64 << 10  # an error body up to this size is read so the connection can be reused

Sink = Callable[[memoryview, int], None]  # (bytes, absolute offset); runs on the worker thread
Check = Callable[[int, Message], None]  # (status, headers); raise to refuse the answer


class RangeIOError(Exception):
    """A transport failure: ``kind`` is connect, timeout, incomplete, protocol or ignored-range."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Redirected(Exception):
    """A 3xx answer; the caller decides whether and how to follow ``location``."""

    def __init__(self, status: int, location: str) -> None:
        super().__init__(f"HTTP {status} to {location}")
        self.status = status
        self.location = location


class _Call:
    """One request in flight: how the event loop stops its worker thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the worker while it checks ``aborted`` and runs the sink
        self.sock_lock = threading.Lock()  # guards ``sock``; never held across I/O, so abort() may wait on it
        self.aborted = False
        self.sock: socket.socket | None = None

    def abort(self) -> bool:
        """Stop the worker. True if the sink can no longer run; False if a batch is in the sink
        right now (it is the last one: the worker checks the flag before the next)."""
        self.aborted = True
        idle = self.lock.acquire(blocking=False)  # never blocks the event loop on a slow write
        if idle:
            self.lock.release()
        with self.sock_lock:
            sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked on the worker thread
            except OSError:
                pass
        return idle


class ThreadedRangeReader:
    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        user_agent: str,
        threads: int = 64,
        ssl_context: ssl.SSLContext | None = None,
        idle_per_host: int = 32,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._user_agent = user_agent
        self._ssl = ssl_context
        self._idle_per_host = idle_per_host
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rangeio")
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._idle_lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._closed = False

    async def read_into(
        self,
        url: str,
        offset: int,
        length: int,
        sink: Sink,
        *,
        check: Check,
        headers: Mapping[str, str] | None = None,
        batch: int = BATCH_BYTES,
    ) -> None:
        """GET ``url`` for bytes [offset, offset+length) and feed them to ``sink`` in order.

        ``check(status, headers)`` runs first and raises to refuse the answer; after it, a 206
        must carry exactly the asked range, and a 200 (the whole file) is taken only for a range
        at offset 0 (its first ``length`` bytes). 3xx raises ``Redirected``."""
        if self._closed:
            raise RangeIOError("protocol", "reader closed")
        if length == 0:
            return
        call = _Call()
        self._calls.add(call)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            self._pool, self._read_sync, call, url, offset, length, sink, check, dict(headers or {}), batch
        )
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_consume)  # the thread ends on its own; its error is moot
            if fut.cancelled() and not _being_cancelled():
                raise RangeIOError(
                    "protocol", f"{_redact(url)}: reader closed"
                ) from None  # close() dropped it from the queue
            if not call.abort():
                # One batch is being written: wait for that single write (the shut socket ends
                # the thread right after) so that nothing lands once this call has returned,
                # even if the task is cancelled again meanwhile.
                while not fut.done():
                    try:
                        await asyncio.wait({fut})
                    except asyncio.CancelledError:
                        pass
            raise
        finally:
            self._calls.discard(call)

    async def read(
        self, url: str, offset: int, length: int, *, check: Check, headers: Mapping[str, str] | None = None
    ) -> bytearray:
        """The same request, collected in memory."""
        buf = bytearray(length)
        view = memoryview(buf)

        def sink(data: memoryview, pos: int) -> None:
            view[pos - offset : pos - offset + len(data)] = data

        await self.read_into(url, offset, length, sink, check=check, headers=headers, batch=min(length, 1 << 20) or 1)
        return buf

    def close(self) -> None:
        self._closed = True
        for call in list(self._calls):
            call.abort()
        with self._idle_lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- worker thread --------------------------------------------------------------------------

    def _read_sync(
        self,
        call: _Call,
        url: str,
        offset: int,
        length: int,
        sink: Sink,
        check: Check,
        headers: dict[str, str],
        batch: int,
    ) -> None:
        shown = _redact(url)  # messages never carry a signed query or credentials
        if call.aborted:
            raise RangeIOError("protocol", f"{shown}: aborted")
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("not an http(s) URL")
            key = (scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))
            # A Location header may carry raw non-ASCII; escapes already there are kept.
            target = quote(
                (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe="!#$%&'()*+,/:;=?@[]~"
            )
        except ValueError as e:
            raise RangeIOError("protocol", f"{shown}: bad URL: {e}") from None
        url = shown
        headers = {
            "Range": f"bytes={offset}-{offset + length - 1}",
            "Accept-Encoding": "identity",
            "User-Agent": self._user_agent,
            **headers,
        }
        conn, reused = self._take(key)
        handled = False  # the connection went back to the pool or was closed
        try:
            try:
                resp = self._send(call, conn, target, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused or call.aborted:
                    raise
                # A kept-alive connection the server had already closed: one fresh try.
                conn.close()
                conn = self._new(key)
                resp = self._send(call, conn, target, headers)
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                redirect = Redirected(resp.status, resp.getheader("Location", ""))
                self._finish(call, key, conn, resp, drain=True)
                handled = True
                raise redirect
            try:
                check(resp.status, resp.msg)
            except BaseException:
                self._finish(call, key, conn, resp, drain=True)
                handled = True
                raise
            self._check_span(url, resp, offset, length)
            self._body(call, url, resp, offset, length, sink, batch)
            self._finish(call, key, conn, resp)
            handled = True
        except BaseException as e:
            if not handled:
                conn.close()
            mapped = self._transport_error(e, call, url, key)
            if mapped is e:
                raise
            raise mapped from None

    def _transport_error(self, e: BaseException, call: _Call, url: str, key: tuple[str, str, int]) -> BaseException:
        """The socket and http.client failures as RangeIOError; anything else unchanged."""
        where = f"{key[1]}:{key[2]}"
        if not isinstance(e, (OSError, http.client.HTTPException)):
            return e
        if call.aborted:
            return RangeIOError("protocol", f"{url}: aborted")
        if isinstance(e, socket.timeout):
            if call.sock is None:
                return RangeIOError(
                    "connect", f"{url}: connecting to {where} timed out after {self._connect_timeout_s:g}s"
                )
            return RangeIOError("timeout", f"{url}: timed out: no bytes for {self._read_timeout_s:g}s")
        if isinstance(e, http.client.HTTPException):
            return RangeIOError("protocol", f"{url}: bad HTTP answer: {type(e).__name__}: {e}")
        if isinstance(e, (ConnectionRefusedError, socket.gaierror)) or call.sock is None:
            return RangeIOError("connect", f"{url}: cannot connect to {where}: {e.strerror or e}")
        return RangeIOError("incomplete", f"{url}: connection lost: {e.strerror or e}")

    def _send(
        self, call: _Call, conn: http.client.HTTPConnection, target: str, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        with call.sock_lock:
            call.sock = None  # a connect timeout after a stale pooled socket is a connect failure
        if conn.sock is None:
            conn.connect()
            conn.sock.settimeout(self._read_timeout_s)
        with call.sock_lock:
            if call.aborted:
                raise RangeIOError("protocol", "aborted")
            call.sock = conn.sock
        conn.request("GET", target, headers=headers)
        return conn.getresponse()

    def _check_span(self, url: str, resp: http.client.HTTPResponse, offset: int, length: int) -> None:
        if resp.status == 206:
            span = content_range(resp.msg)
            if span is None or span[0] != offset or span[1] != offset + length - 1:
                raise RangeIOError(
                    "protocol", f"{url}: server answered a different range ({resp.getheader('Content-Range')!r})"
                )
            if resp.length is not None and resp.length != length:
                raise RangeIOError("protocol", f"{url}: Content-Length {resp.length} for a {length}-byte range")
        elif resp.status == 200:
            # The whole file: its first ``length`` bytes are the range asked for (any more are
            # left unread and the connection is closed).
            if offset != 0 or (resp.length is not None and resp.length < length):
                raise RangeIOError("ignored-range", f"{url}: the server ignored the Range header")
        else:
            raise RangeIOError("protocol", f"{url}: unexpected HTTP {resp.status} for a ranged read")

    def _body(
        self, call: _Call, url: str, resp: http.client.HTTPResponse, offset: int, length: int, sink: Sink, batch: int
    ) -> None:
        buf = memoryview(bytearray(min(batch, length) or 1))
        pos, end = offset, offset + length
        while pos < end:
            n = resp.readinto(buf[: min(len(buf), end - pos)])
            if not n:
                if call.aborted:
                    raise RangeIOError("protocol", f"{url}: aborted")
                raise RangeIOError("incomplete", f"{url}: body ended after {pos - offset} of {length} bytes")
            with call.lock:
                if call.aborted:
                    raise RangeIOError("protocol", f"{url}: aborted")
                sink(buf[:n], pos)
            pos += n

    def _finish(
        self,
        call: _Call,
        key: tuple[str, str, int],
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        *,
        drain: bool = False,
    ) -> None:
        """Keep the connection for the next request if its answer was read to the end."""
        if drain and resp.length is not None and resp.length <= _DRAIN_LIMIT:
            resp.read()
        with call.sock_lock:
            call.sock = None  # a late abort() must not shut a socket another request now uses
        if resp.isclosed() and not resp.will_close and not call.aborted:
            self._give_back(key, conn)
        else:
            conn.close()

    def _new(self, key: tuple[str, str, int]) -> http.client.HTTPConnection:
        scheme, host, port = key
        if scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=self._connect_timeout_s, context=self._ssl or ssl.create_default_context()
            )
        return http.client.HTTPConnection(host, port, timeout=self._connect_timeout_s)

    def _take(self, key: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
        with self._idle_lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        return self._new(key), False

    def _give_back(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._idle_lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._idle_per_host and not self._closed:
                idle.append(conn)
                return
        conn.close()


def _redact(url: str) -> str:
    """``url`` without its query and credentials: a CDN's signed query is a secret for a while."""
    try:
        p = urlsplit(url)
        return urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, "", ""))
    except ValueError:
        return "<unparsable URL>"


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
