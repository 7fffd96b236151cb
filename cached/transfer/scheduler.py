"""Runs the plan for one blob: ranged reads, verification, writes at offsets, retries, limits.

Each piece's bytes are hashed (and checked against the expected digest when one is known) before
the piece is recorded; nothing unverified is ever marked. Retryable origin errors back off
exponentially with jitter; a non-retryable one (404, 403, a changed file) stops the blob at once
and cancels its other requests. A global semaphore bounds origin requests across all jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Callable

from cached.config import HttpOriginConfig
from cached.errors import IntegrityError, OriginChanged, OriginError
from cached.metrics import Metrics
from cached.origins import Origin
from cached.store.partial import PartialBlob
from cached.transfer.plan import ORIGIN, SourceView, assign
from cached.types import OriginFile, piece_span

log = logging.getLogger(__name__)

OnBytes = Callable[[str, int], None]


class Scheduler:
    def __init__(self, cfg: HttpOriginConfig, metrics: Metrics, *, rng: random.Random | None = None) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._origin_slots = asyncio.Semaphore(cfg.connections * 2)
        self._rng = rng or random.Random()

    def backoff_s(self, attempt: int) -> float:
        base = min(self._cfg.backoff_max_s, self._cfg.backoff_s * (2**attempt))
        return base * (0.5 + self._rng.random() / 2)

    async def fetch_blob(
        self,
        partial: PartialBlob,
        file: OriginFile,
        origin: Origin,
        *,
        on_bytes: OnBytes,
        expected: list[bytes] | None = None,
    ) -> None:
        """Bring every missing piece of ``partial`` in from ``origin``; returns when complete."""
        if partial.complete:
            pass  # resumed with every piece verified: only the whole-file checks remain
        elif not (expected is None and not partial.done and await self._try_clone(partial, file, origin, on_bytes)):
            if origin.supports_ranges(file):
                await self._fetch_ranges(partial, file, origin, on_bytes, expected)
            else:
                await self._fetch_stream(partial, file, origin, on_bytes, expected)
        await origin.check_unchanged(file)
        if expected is None:  # with expected digests every piece was already checked against them
            await origin.check_content(file, partial.data_path)

    async def _try_clone(self, partial: PartialBlob, file: OriginFile, origin: Origin, on_bytes: OnBytes) -> bool:
        path = origin.local_path(file)
        if path is None or file.size == 0:
            return False

        def clone_and_hash() -> bool:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return False
            try:
                if not partial.clone_from_sync(fd):
                    return False
            finally:
                os.close(fd)
            for i in range(partial.pieces):
                partial.adopt_piece_sync(i)
            return True

        if not await asyncio.to_thread(clone_and_hash):
            return False
        log.debug("imported by reflink path=%s", path)
        on_bytes(ORIGIN, file.size)
        return True

    async def _fetch_ranges(
        self, partial: PartialBlob, file: OriginFile, origin: Origin, on_bytes: OnBytes, expected: list[bytes] | None
    ) -> None:
        limit = self._cfg.connections
        tasks: dict[asyncio.Task[None], int] = {}
        try:
            while True:
                missing = partial.missing()
                if not missing and not tasks:
                    return
                inflight = {index: {ORIGIN} for index in tasks.values()}
                plan = assign(
                    missing=missing,
                    inflight=inflight,
                    sources=[SourceView(name=ORIGIN, is_origin=True, limit=limit, inflight=len(tasks))],
                    global_free=limit - len(tasks),
                )
                for a in plan:
                    t = asyncio.create_task(self._piece(partial, file, origin, a.piece, on_bytes, expected), name=f"piece:{a.piece}")
                    tasks[t] = a.piece
                if not tasks:
                    return
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    del tasks[t]
                    t.result()  # a permanent failure ends the blob; the finally cancels the rest
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _piece(
        self, partial: PartialBlob, file: OriginFile, origin: Origin, index: int, on_bytes: OnBytes, expected: list[bytes] | None
    ) -> None:
        off, length = piece_span(index, partial.size, partial.piece_size)
        attempt = 0
        while True:
            try:
                async with self._origin_slots:
                    data = await origin.read_range(file, off, length)
                break
            except OriginError as e:
                self._metrics.origin_errors.labels(_error_kind(e)).inc()
                if not e.retryable or attempt >= self._cfg.retries:
                    raise
                delay = self.backoff_s(attempt)
                log.warning("origin read failed, retrying piece=%d attempt=%d in=%.1fs error=%s", index, attempt + 1, delay, e)
                attempt += 1
                await asyncio.sleep(delay)
        await self._write(partial, index, data, expected, on_bytes)

    async def _write(
        self, partial: PartialBlob, index: int, data: bytes | bytearray, expected: list[bytes] | None, on_bytes: OnBytes
    ) -> None:
        try:
            await asyncio.to_thread(partial.write_piece_sync, index, data, expected[index] if expected else None)
        except IntegrityError:
            self._metrics.piece_verify_failures.labels(ORIGIN).inc()
            raise OriginChanged(
                f"piece {index} from the origin does not match the digest this node stored for it: "
                "the origin's content changed"
            ) from None
        self._metrics.fetched_bytes.labels(ORIGIN).inc(len(data))
        on_bytes(ORIGIN, len(data))

    async def _fetch_stream(
        self, partial: PartialBlob, file: OriginFile, origin: Origin, on_bytes: OnBytes, expected: list[bytes] | None
    ) -> None:
        """Servers without Range: one sequential stream, cut into pieces; restart from 0 on error."""
        attempt = 0
        while True:
            try:
                async with self._origin_slots:
                    await self._stream_once(partial, file, origin, on_bytes, expected)
                return
            except OriginError as e:
                self._metrics.origin_errors.labels(_error_kind(e)).inc()
                if not e.retryable or attempt >= self._cfg.retries:
                    raise
                delay = self.backoff_s(attempt)
                log.warning("origin stream failed, restarting attempt=%d in=%.1fs error=%s", attempt + 1, delay, e)
                attempt += 1
                await asyncio.sleep(delay)

    async def _stream_once(
        self, partial: PartialBlob, file: OriginFile, origin: Origin, on_bytes: OnBytes, expected: list[bytes] | None
    ) -> None:
        index = 0
        buf = bytearray()
        received = 0
        async for chunk in origin.stream(file):
            received += len(chunk)
            if received > file.size:
                raise OriginChanged(f"{file.locator}: origin sent more than the {file.size} bytes it announced")
            buf += chunk
            while index < partial.pieces:
                _, length = piece_span(index, partial.size, partial.piece_size)
                if len(buf) < length:
                    break
                piece = bytes(buf[:length])
                del buf[:length]
                if index not in partial.done:
                    await self._write(partial, index, piece, expected, on_bytes)
                index += 1
        if received != file.size:
            raise OriginError(f"{file.locator}: body ended after {received} of {file.size} bytes", retryable=True)


def _error_kind(e: OriginError) -> str:
    if e.status is None:
        return "connection" if e.retryable else "other"
    if e.status >= 500:
        return "5xx"
    if e.status == 429:
        return "throttled"
    return "4xx" if e.status >= 400 else "other"
