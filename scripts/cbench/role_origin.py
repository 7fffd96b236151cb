"""The ``_origin`` role: a static HTTP server in the origin namespace with single-range Range,
a strong ETag and If-Range, that counts the body bytes, GETs and HEADs it served into a stats file
(every 0.2 s) for the driver. It serves one directory and nothing else."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from cbench.channel import emit

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` -> (start, end) inclusive, or None when it is unsatisfiable."""
    m = RANGE_RE.match(header.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    return None if start > end else (start, end)


class Origin:
    """Serves files under ``root``; ``stats`` are what the driver reads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stats = {"bytes": 0, "gets": 0, "heads": 0}

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        path = (self.root / request.match_info["path"]).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            return web.Response(status=404)
        st = path.stat()
        size = st.st_size
        etag = '"' + hashlib.sha1(f"{size}-{st.st_mtime_ns}-{st.st_ino}".encode()).hexdigest()[:20] + '"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        start, end, status = 0, size - 1, 200
        rng, if_range = request.headers.get("Range"), request.headers.get("If-Range")
        if rng and (if_range is None or if_range == etag):
            span = byte_range(rng, size)
            if span is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            (start, end), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            self.stats["heads"] += 1
            return resp
        self.stats["gets"] += 1
        await self.send(resp, path, start, end)
        await resp.write_eof()
        return resp

    async def send(self, resp: Any, path: Path, start: int, end: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = start
            while pos <= end:
                chunk = os.pread(fd, min(1 << 20, end - pos + 1), pos)
                if not chunk:
                    break
                await resp.write(chunk)
                pos += len(chunk)
                self.stats["bytes"] += len(chunk)
        finally:
            os.close(fd)

    def dump(self, stats_file: Path) -> None:
        tmp = stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"t": time.monotonic(), **self.stats}))
        os.replace(tmp, stats_file)


async def serve(a: argparse.Namespace) -> None:
    from aiohttp import web

    origin = Origin(a.root)
    app = web.Application()
    app.router.add_get("/{path:.+}", origin.handle)  # add_get answers HEAD too
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, a.bind, a.port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit({"ready": True})
    while not stop.is_set():  # ends on SIGTERM; the driver bounds its life
        origin.dump(a.stats)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    origin.dump(a.stats)
    await runner.cleanup()


def role_origin(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="_origin")
    p.add_argument("root", type=Path)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--stats", type=Path, required=True)
    asyncio.run(serve(p.parse_args(argv)))
