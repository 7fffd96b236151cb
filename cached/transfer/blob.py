"""Fetches one blob: runs the plan (peers first, then the origin); verification, retries, limits.

Piece bodies stream through ``cached.rangeio`` on worker threads: each batch is hashed and
written at its offset as it arrives, and the piece is recorded only once its whole digest is
known (and matches the expected one). Only one copy of a piece streams to disk at a time; a
second, endgame copy is read into memory and written only once verified, so the bytes on disk
are always the bytes whose digest was recorded. Origin requests are retried by ``OriginRetry``
(``transfer.retry``); a non-retryable error (404, 403, a changed file) stops the blob at once and
cancels its other requests, which all belong to one task group per blob. A global semaphore bounds origin requests across all jobs. A peer that sends
bytes that fail verification, or fails repeatedly, is banned for a while (and counted); a peer at
its serving limit (429) is skipped for a moment. Near the end the last pieces may be asked of two
sources; the slower copy is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import blake3

from cached.config import TransferConfig
from cached.errors import IntegrityError, OriginChanged, OriginError
from cached.metrics import Metrics
from cached.origins import Origin
from cached.peers.client import PeerBusy, PeerClient, PeerError
from cached.rangeio import Sink
from cached.store.partial import PartialBlob
from cached.transfer.budget import TokenBucket
from cached.transfer.plan import ORIGIN, SourceView, assign
from cached.transfer.retry import OriginRetry
from cached.transfer.sources import PeerSource, Swarm
from cached.types import OriginFile, piece_span

log = logging.getLogger(__name__)

WAIT_TICK_S = 0.05
PEER_NODE_LIMIT = 8  # requests (and reader threads) in flight to one peer, all blobs together
BUSY_COOL_S = 0.25  # a peer that answered 429 is skipped this long
PEER_FAULT_LIMIT = 3  # bad or failed answers from one peer before it is dropped
BAN_S = 300.0  # how long a banned peer stays out of every fetch

OnBytes = Callable[[str, int], None]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one piece request ended; a request task never raises (but may be cancelled), so one
    failed peer request does not tear down its siblings' task group."""

    recorded: bool = False
    error: BaseException | None = None


async def _outcome(coro: Awaitable[bool]) -> _Outcome:
    try:
        return _Outcome(recorded=await coro)
    except Exception as e:  # noqa: BLE001 - handed to the piece loop, which decides
        return _Outcome(error=e)


class BlobFetcher:
    def __init__(
        self,
        cfg: TransferConfig,
        metrics: Metrics,
        *,
        retry: OriginRetry | None = None,
        rng: random.Random | None = None,
        peer_limit: int = 4,
        peer_client: PeerClient | None = None,
    ) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self.retry = retry or OriginRetry(cfg, metrics, rng=rng)
        self._origin_slots = asyncio.Semaphore(cfg.connections * 2)
        self._peer_limit = peer_limit  # requests in flight to one peer for one blob
        # Requests in flight to each peer from every blob of this node: a peer that stops
        # answering holds at most PEER_NODE_LIMIT of them (and of the reader threads).
        self._peer_load: dict[str, int] = {}
        self.peer_peak: dict[str, int] = {}  # the most ever in flight to each peer (for tests and debugging)
        self.peer_client = peer_client
        self._bans: dict[str, float] = {}  # node -> monotonic time its ban ends
        self._origin_budget = TokenBucket(cfg.max_rate_bps)  # bytes/s from origins, node-wide

    async def fetch_blob(
        self,
        partial: PartialBlob,
        file: OriginFile,
        origin: Origin,
        *,
        on_bytes: OnBytes,
        expected: list[bytes] | None = None,
        swarm: Swarm | None = None,
    ) -> None:
        """Bring every missing piece of ``partial`` in, from peers in ``swarm`` first, then the
        origin; returns when complete."""
        from_origin = [False]
        outer = on_bytes

        def on_bytes(source: str, n: int) -> None:
            from_origin[0] |= source == ORIGIN
            outer(source, n)

        if partial.complete:
            pass  # resumed with every piece verified: only the whole-file checks remain
        elif swarm is None and not (
            expected is None and not partial.done and await self._try_clone(partial, file, origin, on_bytes)
        ):
            if origin.supports_ranges(file):
                await self._fetch_ranges(partial, file, origin, on_bytes, expected)
            else:
                await self._fetch_stream(partial, file, origin, on_bytes, expected)
        elif swarm is not None:
            if origin.supports_ranges(file) or await swarm.learn_table() or swarm.peer_sources(set()):
                await self._fetch_ranges(partial, file, origin, on_bytes, expected, swarm)
            else:
                await self._fetch_stream(partial, file, origin, on_bytes, expected)
        if swarm is not None and expected is None and swarm.table is not None:
            expected = swarm.table
        if swarm is not None and not from_origin[0] and expected is not None:
            return  # every piece came from peers and matched the finished blob's piece table
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
        self,
        partial: PartialBlob,
        file: OriginFile,
        origin: Origin,
        on_bytes: OnBytes,
        expected: list[bytes] | None,
        swarm: Swarm | None = None,
    ) -> None:
        """The piece loop: re-plan after every finished request, over the sources of the moment.
        Its requests are tasks of one group: however the loop ends, those still running are
        cancelled and awaited before this returns."""
        try:
            async with asyncio.TaskGroup() as group:
                await self._piece_loop(group, partial, file, origin, on_bytes, expected, swarm)
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None

    async def _piece_loop(
        self,
        group: asyncio.TaskGroup,
        partial: PartialBlob,
        file: OriginFile,
        origin: Origin,
        on_bytes: OnBytes,
        expected: list[bytes] | None,
        swarm: Swarm | None,
    ) -> None:
        limit = self._cfg.connections
        tasks: dict[asyncio.Task[_Outcome], tuple[int, str]] = {}
        faults: dict[str, int] = {}
        banned: set[str] = set()
        cooling: dict[str, float] = {}  # source -> monotonic time until which it is skipped (429)
        bad_from: dict[int, set[str]] = {}  # piece -> peers that sent it wrong
        idle_since = time.monotonic()  # since when nothing has been in flight
        asking: asyncio.Task[bool] | None = None  # a hand-over question to another zone's owner
        try:
            while True:
                missing = partial.missing()
                if not missing:
                    if tasks:
                        # Complete. A copy that recorded its piece is only counting it now; give
                        # it a moment. Losing endgame copies still reading are cancelled below.
                        await asyncio.wait(tasks, timeout=0.5)
                    return
                if swarm is not None and expected is None and await swarm.learn_table():
                    expected = swarm.table  # a peer finished it: every piece is now checkable
                now = time.monotonic()
                out = banned | self._banned_now()
                peers = [p for p in (swarm.peer_sources(out) if swarm else []) if cooling.get(p.node_id, 0) <= now]
                by_name = {p.node_id: p for p in peers}
                inflight: dict[int, set[str]] = {}
                load: dict[str, int] = {}
                streaming = {index for index, _ in tasks.values()}
                # A request to a suspect peer (its heartbeat stopped) does not hold its piece: the
                # piece is asked of another source now, not after the read timeout.
                suspect = swarm.suspects() if swarm is not None else set()
                for index, src in tasks.values():
                    load[src] = load.get(src, 0) + 1
                    if src not in suspect:
                        inflight.setdefault(index, set()).add(src)
                every = frozenset(range(partial.pieces))
                views = [
                    SourceView(
                        name=p.node_id,
                        is_origin=False,
                        limit=min(
                            self._peer_limit,
                            PEER_NODE_LIMIT - self._peer_load.get(p.node_id, 0) + load.get(p.node_id, 0),
                        ),
                        inflight=load.get(p.node_id, 0),
                        near=not p.cross_zone,
                        # never ask a peer again for a piece it already sent wrong
                        pieces=(every if p.pieces is None else p.pieces)
                        - frozenset(i for i, bad in bad_from.items() if p.node_id in bad),
                    )
                    for p in peers
                ]
                if swarm is not None:
                    swarm.plan_round(out, missing)
                origin_ok = [i for i in missing if swarm is None or swarm.origin_allowed(i, bad_from.get(i, set()))]
                # Sharing the origin with others who want the same file: ask it for few pieces at a
                # time, so each finishes early and can be relayed while the next ones come in
                # (all pieces in flight at once would all land at the very end).
                origin_limit = limit if swarm is None else max(1, limit // max(1, swarm.wanting()))
                views.append(
                    SourceView(
                        name=ORIGIN,
                        is_origin=True,
                        limit=origin_limit,
                        inflight=load.get(ORIGIN, 0),
                        pieces=frozenset(origin_ok),
                    )
                )
                plan = assign(
                    missing=missing,
                    inflight=inflight,
                    sources=views,
                    global_free=origin_limit + len(peers) * self._peer_limit - len(tasks),
                    endgame_pieces=2 if swarm is not None else 0,
                )
                for a in plan:
                    # One copy of a piece streams into place; a second one (endgame) is read into
                    # memory and written only once verified, so the bytes on disk are always the
                    # bytes whose digest gets recorded.
                    stream = a.piece not in streaming
                    streaming.add(a.piece)
                    if a.source == ORIGIN:
                        if swarm is not None:
                            swarm.claim(a.piece)  # told to wanters that ask from now on
                        coro = self._piece(partial, file, origin, a.piece, on_bytes, expected, stream=stream)
                    else:
                        if swarm is not None and by_name[a.source].cross_zone:
                            swarm.claim(a.piece)  # zone single-flight: this node brings it into the zone
                        coro = self._peer_piece(partial, by_name[a.source], a.piece, on_bytes, stream=stream)
                    t = group.create_task(_outcome(coro), name=f"piece:{a.piece}:{a.source}")
                    if a.source != ORIGIN:
                        self._count_peer_request(a.source, t)
                    tasks[t] = (a.piece, a.source)
                if asking is not None and asking.done():
                    asking = None  # a piece granted is in the swarm's plan from this round on
                if (
                    swarm is not None
                    and asking is None
                    and load.get(ORIGIN, 0) == 0
                    and all(a.source != ORIGIN for a in plan)
                ):
                    # Our origin slot is idle: with zones, the other zone's last pieces may be ours.
                    # Asked in the background: finished peer requests are collected meanwhile.
                    candidate = swarm.steal_candidate(streaming)
                    if candidate is not None:
                        asking = group.create_task(swarm.steal(*candidate), name=f"steal:{candidate[0]}")
                if not tasks:
                    # Nothing to ask anyone right now (pieces owned by a peer still fetching them):
                    # look again shortly, as the peers' holdings move on.
                    if swarm is not None and time.monotonic() - idle_since > swarm.stall_timeout_s:
                        # Waited long with nothing to do: ask the owners whether they still want it.
                        await swarm.recheck()
                        idle_since = time.monotonic()
                    await asyncio.sleep(WAIT_TICK_S)
                    continue
                idle_since = time.monotonic()
                done, _ = await asyncio.wait(
                    [*tasks, *([asking] if asking is not None else [])],
                    timeout=WAIT_TICK_S * 5 if swarm else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for t in done:
                    if t is asking:
                        continue  # its answer counts at the top of the loop
                    index, src = tasks.pop(t)
                    if t.cancelled():
                        continue
                    outcome = t.result()
                    exc = outcome.error
                    if exc is None:
                        if outcome.recorded and swarm is not None and index in partial.done:
                            swarm.announce(index, partial.done[index])
                        for other, (i, _) in list(tasks.items()):
                            # Only the copy that recorded the piece cancels the other: a loser that
                            # found it done must not cancel the winner before it counted its bytes.
                            if i == index and outcome.recorded:
                                other.cancel()  # endgame: the slower copy of a finished piece
                        continue
                    if src == ORIGIN:
                        raise exc  # retries are inside _piece: this one is final
                    if isinstance(exc, PeerBusy) or (isinstance(exc, PeerError) and exc.status == 404):
                        # Busy, or its holdings moved on (a partial just became a blob): not a fault.
                        # Busy is short-lived (a piece being fanned out to others, who serve it next).
                        cooling[src] = time.monotonic() + (BUSY_COOL_S if isinstance(exc, PeerBusy) else 0.2)
                    elif isinstance(exc, (PeerError, IntegrityError)):
                        if isinstance(exc, IntegrityError):
                            bad_from.setdefault(index, set()).add(src)
                        faults[src] = faults.get(src, 0) + 1
                        if faults[src] >= PEER_FAULT_LIMIT and src not in banned:
                            banned.add(src)
                            self._ban(src)
                            log.warning("peer banned for repeated faults peer=%s faults=%d", src, faults[src])
                    else:
                        raise exc
        finally:
            if asking is not None:
                asking.cancel()
            for t in tasks:
                t.cancel()  # the group awaits them

    def _count_peer_request(self, node_id: str, task: asyncio.Task[_Outcome]) -> None:
        """``task``, a request to ``node_id``, counted in that peer's node-wide load from now until
        it ends (counted here, not when it starts running, so that the piece loops of other blobs
        planning in the same moment see it)."""
        n = self._peer_load[node_id] = self._peer_load.get(node_id, 0) + 1
        self.peer_peak[node_id] = max(self.peer_peak.get(node_id, 0), n)

        def done(_: asyncio.Task[_Outcome]) -> None:
            self._peer_load[node_id] -= 1
            if not self._peer_load[node_id]:
                del self._peer_load[node_id]

        task.add_done_callback(done)

    async def _peer_piece(
        self, partial: PartialBlob, src: PeerSource, index: int, on_bytes: OnBytes, *, stream: bool
    ) -> bool:
        """One piece from a peer. True if this copy is the one recorded."""
        off, length = piece_span(index, partial.size, partial.piece_size)
        assert self.peer_client is not None, "peer sources need a PeerClient"
        expected = src.digests[index]
        try:
            if stream:
                client = self.peer_client
                digest = await _stream_into(
                    partial,
                    index,
                    lambda sink: client.read_range_into(src.address, src.kind, src.name, off, length, sink),
                )
                if digest is None:
                    return False  # the other copy of an endgame pair won
                if digest != expected:
                    raise IntegrityError(f"piece {index}: BLAKE3 mismatch")
                recorded = await asyncio.to_thread(partial.record_sync, index, digest)
            else:
                data = await self.peer_client.read_range(src.address, src.kind, src.name, off, length)
                if index in partial.done:
                    return False
                recorded = await asyncio.to_thread(partial.write_piece_sync, index, data, expected) is not None
        except IntegrityError:
            self._metrics.piece_verify_failures.labels("peer").inc()
            log.warning("piece from peer failed verification peer=%s piece=%d", src.node_id, index)
            raise
        if not recorded:
            return False
        self._count("peer", length, on_bytes)
        self._metrics.peer_bytes.labels("cross_zone" if src.cross_zone else "zone").inc(length)
        return True

    def _count(self, source: str, n: int, on_bytes: OnBytes) -> None:
        self._metrics.fetched_bytes.labels(source).inc(n)
        on_bytes(source, n)

    def _ban(self, node_id: str) -> None:
        self._bans[node_id] = time.monotonic() + BAN_S

    def _banned_now(self) -> set[str]:
        now = time.monotonic()
        return {n for n, until in self._bans.items() if until > now}

    async def _piece(
        self,
        partial: PartialBlob,
        file: OriginFile,
        origin: Origin,
        index: int,
        on_bytes: OnBytes,
        expected: list[bytes] | None,
        *,
        stream: bool = True,
    ) -> bool:
        off, length = piece_span(index, partial.size, partial.piece_size)
        if stream:
            return await self._streamed_piece(partial, file, origin, index, on_bytes, expected)
        data = await self._origin_read(index, length, lambda: origin.read_range(file, off, length))
        return await self._write(partial, index, data, expected, on_bytes)

    async def _origin_read(self, index: int, length: int, read: Callable[[], Awaitable[T]]) -> T:
        """``read()`` within the origin limits (slots, byte budget), retried while the error
        allows; the backoff waits outside the slot."""

        async def limited() -> T:
            async with self._origin_slots:
                await self._origin_budget.take(length)
                return await read()

        return await self.retry.call(limited, what=f"read piece={index}")

    async def _streamed_piece(
        self,
        partial: PartialBlob,
        file: OriginFile,
        origin: Origin,
        index: int,
        on_bytes: OnBytes,
        expected: list[bytes] | None,
    ) -> bool:
        """A piece hashed and written batch by batch on a worker thread as it arrives; recorded
        only once its digest is known (and matches ``expected``). Bytes of a failed attempt stay
        unrecorded."""
        off, length = piece_span(index, partial.size, partial.piece_size)
        # Each attempt starts a fresh hash; bytes of a failed attempt stay unrecorded.
        digest = await self._origin_read(
            index,
            length,
            lambda: _stream_into(partial, index, lambda sink: origin.read_range_into(file, off, length, sink)),
        )
        if digest is None:
            return False  # the other copy of an endgame pair won
        if expected is not None and digest != expected[index]:
            raise self._origin_mismatch(index)
        if not await asyncio.to_thread(partial.record_sync, index, digest):
            return False  # a duplicate of a piece already in: not counted twice
        self._count(ORIGIN, length, on_bytes)
        return True

    def _origin_mismatch(self, index: int) -> OriginChanged:
        self._metrics.piece_verify_failures.labels(ORIGIN).inc()
        return OriginChanged(
            f"piece {index} from the origin does not match the digest this node stored for it: the origin's content changed"
        )

    async def _write(
        self, partial: PartialBlob, index: int, data: bytes | bytearray, expected: list[bytes] | None, on_bytes: OnBytes
    ) -> bool:
        try:
            recorded = await asyncio.to_thread(
                partial.write_piece_sync, index, data, expected[index] if expected else None
            )
        except IntegrityError:
            raise self._origin_mismatch(index) from None
        if recorded is None:
            return False  # a duplicate of a piece already in: not counted twice
        self._count(ORIGIN, len(data), on_bytes)
        return True

    async def _fetch_stream(
        self, partial: PartialBlob, file: OriginFile, origin: Origin, on_bytes: OnBytes, expected: list[bytes] | None
    ) -> None:
        """Servers without Range: one sequential stream, cut into pieces; restart from 0 on error."""

        async def once() -> None:
            async with self._origin_slots:
                await self._stream_once(partial, file, origin, on_bytes, expected)

        await self.retry.call(once, what="stream")

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


class _PieceDone(Exception):
    """Raised in a sink: another copy of the piece was recorded, this stream can stop."""


async def _stream_into(partial: PartialBlob, index: int, read_into: Callable[[Sink], Awaitable[None]]) -> bytes | None:
    """Piece ``index`` hashed and written at its offsets batch by batch, on the reader's worker
    thread, as ``read_into(sink)`` delivers it. Its digest, or None if another copy of the piece
    was recorded meanwhile (this stream stopped)."""
    hasher = blake3.blake3()

    def sink(data: memoryview, pos: int) -> None:
        hasher.update(data)
        if not partial.write_at_sync(data, pos, index):
            raise _PieceDone

    try:
        await read_into(sink)
    except _PieceDone:
        return None
    return hasher.digest()


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first error of a task group, as its callers expect it (not wrapped in a group)."""
    first = group.exceptions[0]
    return first_error(first) if isinstance(first, BaseExceptionGroup) else first
