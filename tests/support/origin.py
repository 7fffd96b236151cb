"""A real HTTP origin on 127.0.0.1 for tests, the demo and the benchmarks.

Serves files from a directory with HEAD, GET and single-range ``Range`` requests (206 with
``Content-Range``), strong ETags and ``If-Range``. It counts requests and body bytes sent, and
injects faults on demand: no Range support, fixed error statuses, failures of the first N
requests, truncated bodies, a delay before the body, a per-request byte cap.

Run standalone: ``python -m tests.support.origin DIR [--port N]`` (binds 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 1 << 20


@dataclass
class Faults:
    no_ranges: bool = False  # ignore Range, never advertise it
    status: int | None = None  # answer every GET/HEAD with this status
    fail_first: int = 0  # the first N GETs answer fail_status
    fail_status: int = 503
    truncate_after: int | None = None  # close a body after this many bytes
    truncate_times: int = 0  # how many bodies to truncate (then serve normally)
    delay_s: float = 0.0  # sleep before sending any body
    no_head: bool = False  # HEAD answers 405
    rate_bps: int | None = None  # throttle each body to about this many bytes per second
    change_after_gets: int | None = None  # after N GETs, pretend the file changed (new ETag)
    # awaited with the range's first byte before a GET's body: a test holds back the ranges it chooses
    gate: Callable[[int], Awaitable[None]] | None = None


@dataclass
class Counters:
    requests: int = 0
    gets: int = 0
    heads: int = 0
    bytes_sent: int = 0
    ranges: list[str] = field(default_factory=list)


class Origin:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.faults = Faults()
        self.counters = Counters()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def file_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def reset(self) -> None:
        self.counters = Counters()

    async def start(self, port: int = 0) -> Origin:
        app = web.Application()
        app.router.add_get("/__counters", self._counters)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Origin:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @staticmethod
    def etag_of(path: Path) -> str:
        st = path.stat()
        return '"' + hashlib.sha1(f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}".encode()).hexdigest()[:20] + '"'

    async def _counters(self, request: web.Request) -> web.Response:
        """For the demo: what this origin has sent so far (not counted in the counters)."""
        c = self.counters
        return web.json_response({"requests": c.requests, "gets": c.gets, "heads": c.heads, "bytes_sent": c.bytes_sent})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        c, f = self.counters, self.faults
        c.requests += 1
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if request.method == "HEAD":
            c.heads += 1
            if f.no_head:
                return web.Response(status=405)
        else:
            c.gets += 1
        if f.status is not None:
            return web.Response(status=f.status, text=f"injected {f.status}\n")
        if request.method == "GET" and f.fail_first > 0:
            f.fail_first -= 1
            return web.Response(status=f.fail_status, headers={"Retry-After": "0"}, text="injected failure\n")
        rel = request.match_info["path"]
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            return web.Response(status=404, text="not found\n")
        size = path.stat().st_size
        etag = self.etag_of(path)
        if f.change_after_gets is not None and c.gets > f.change_after_gets:
            etag = etag[:-1] + '-v2"'
        headers = {"ETag": etag, "Last-Modified": "Sun, 29 Nov 2026 00:00:00 GMT"}
        if not f.no_ranges:
            headers["Accept-Ranges"] = "bytes"
        start, end, status = 0, size - 1, 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and not f.no_ranges and (if_range is None or if_range == etag):
            m = _RANGE.match(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            if start > end or start >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            c.ranges.append(f"{start}-{end}")
        length = end - start + 1 if size else 0
        headers["Content-Length"] = str(length)
        resp = web.StreamResponse(status=status, headers=headers)
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        if f.delay_s:
            await asyncio.sleep(f.delay_s)
        if f.gate is not None:
            await f.gate(start)
            if request.transport is None or request.transport.is_closing():
                return resp  # the client gave up while the range was held
        await resp.prepare(request)
        limit = length
        truncate = f.truncate_after is not None and f.truncate_times > 0
        if truncate:
            f.truncate_times -= 1
            limit = min(length, f.truncate_after or 0)
        step = CHUNK if not f.rate_bps else max(1024, min(CHUNK, f.rate_bps // 20))
        with open(path, "rb") as fh:
            fh.seek(start)
            sent = 0
            while sent < limit:
                if f.rate_bps:
                    await asyncio.sleep(step / f.rate_bps)
                chunk = fh.read(min(step, limit - sent))
                if not chunk:
                    break
                await resp.write(chunk)
                sent += len(chunk)
                c.bytes_sent += len(chunk)
        if truncate:
            # Drop the connection mid-body, as a failing server or proxy would.
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp


def write_random_file(path: Path, size: int, seed: int = 0) -> Path:
    """Deterministic pseudo-random content (fast: expands a hash stream)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.shake_256(f"seed-{seed}".encode()).digest(1 << 20)
    with open(path, "wb") as f:
        remaining, i = size, 0
        while remaining > 0:
            n = min(len(block), remaining)
            # Vary each MiB so pieces differ from one another.
            f.write(i.to_bytes(4, "little")[:n] + block[4:n])
            remaining -= n
            i += 1
    return path


def main() -> None:
    p = argparse.ArgumentParser(description="serve a directory on 127.0.0.1 with Range support")
    p.add_argument("root", type=Path)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()

    async def serve() -> None:
        origin = await Origin(args.root).start(args.port)
        print(origin.url, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await origin.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
