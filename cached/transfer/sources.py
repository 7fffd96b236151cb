"""Where a blob's pieces can come from: peers that hold it (complete or partial) and the origin.

``Swarm`` looks at the cluster for one blob, through a ``PeerDirectory`` that the composition
root builds over gossip: which live peers hold the blob complete (any piece, checked against the
piece table verified against the blob id), which hold some verified pieces of the same origin file
(checked against the digests they published), and which pieces this node may take from the origin.

Origin single-flight: among the nodes that want the same origin file (they hold a partial of it),
piece ``i`` is fetched from the origin by its rendezvous-hash owner only; the others take it from
that owner once it is verified. A node falls back to the origin for a piece whose owner is gone
or has made no progress for ``stall_timeout_s``. The origin is therefore read about once per piece
for the whole cluster. This module holds no sockets of its own; reads go through ``PeerClient``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cached.errors import StoreError
from cached.peers.client import PeerClient
from cached.peers.holdings import HoldingsView
from cached.placement import rank
from cached.store.partial import decode_piece_log
from cached.types import BlobId, piece_count


class PeerDirectory(Protocol):
    me: str
    view: HoldingsView
    client: PeerClient

    def alive(self) -> list[tuple[str, str]]:
        """(node id, peer address) of every live member."""
        ...

    def suspect(self) -> set[str]:
        """The members among ``alive()`` whose heartbeat has stopped (not dead yet)."""
        ...


def healthy_first(node_ids: list[str], suspect: set[str]) -> list[str]:
    """Suspect members last: a request to a host that vanished waits out the connect timeout."""
    return sorted(node_ids, key=lambda n: n in suspect)


@dataclass(frozen=True, slots=True)
class PeerSource:
    node_id: str
    address: str
    kind: str  # "blobs" (complete) or "partials"
    name: str  # blob hex or partial key
    pieces: frozenset[int] | None  # None: every piece (a complete blob)
    digests: dict[int, bytes]  # what each served piece must hash to


class Swarm:
    def __init__(
        self,
        directory: PeerDirectory,
        *,
        key: str,
        piece_size: int,
        size: int,
        stall_timeout_s: float = 10.0,
        grace_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dir = directory
        self._start = clock()
        self._grace_s = grace_s
        self.key = key
        self._piece_size = piece_size
        self._size = size
        self._stall_timeout_s = stall_timeout_s
        self._clock = clock
        self.blob_hex: str | None = None
        self.table: list[bytes] | None = None  # piece digests of the finished blob, once known
        self._progress: dict[str, tuple[int, float]] = {}  # node -> (pieces held, when it last grew)

    @property
    def client(self) -> PeerClient:
        return self._dir.client

    async def learn_table(self) -> bool:
        """If some peer finished this file, fetch and verify its piece table. True when known."""
        if self.table is not None:
            return True
        blob_hex = self.blob_hex or self._dir.view.blob_for_key(self.key)
        if blob_hex is None:
            return False
        alive = dict(self._dir.alive())
        for node_id in healthy_first(self._dir.view.with_blob(blob_hex), self._dir.suspect()):
            if node_id not in alive:
                continue
            try:
                raw = await self._dir.client.piece_table(alive[node_id], blob_hex)
                table = parse_piece_table(raw, blob_hex)
            except Exception:  # noqa: BLE001 - a bad table from one peer: try the next
                continue
            if table is not None:
                self.blob_hex, self.table = blob_hex, table
                return True
        return False

    def peer_sources(self, banned: set[str]) -> list[PeerSource]:
        out: list[PeerSource] = []
        alive = dict(self._dir.alive())
        if self.blob_hex is not None and self.table is not None:
            digests = dict(enumerate(self.table))
            for node_id in self._dir.view.with_blob(self.blob_hex):
                if node_id in alive and node_id not in banned:
                    out.append(PeerSource(node_id, alive[node_id], "blobs", self.blob_hex, None, digests))
        complete = {s.node_id for s in out}
        for node_id, info in self._dir.view.with_partial(self.key):
            if node_id in alive and node_id not in banned and node_id not in complete:
                if (info.size, info.piece_size) != (self._size, self._piece_size):
                    continue  # a different piece size: its pieces do not line up with ours
                digests = {i: bytes.fromhex(d) for i, d in info.pieces.items() if _is_hex32(d)}
                out.append(PeerSource(node_id, alive[node_id], "partials", self.key, frozenset(digests), digests))
        suspect = self._dir.suspect()
        if not suspect:
            return out
        # A suspect peer (its heartbeat stopped; it may be gone) only for pieces no healthy peer
        # holds: requests to a vanished host hang until the connect timeout.
        healthy = [p for p in out if p.node_id not in suspect]
        if any(p.pieces is None for p in healthy):
            return healthy
        covered = frozenset().union(*(p.pieces or frozenset() for p in healthy))
        every = frozenset(range(piece_count(self._size, self._piece_size)))
        rest = [
            dataclasses.replace(p, pieces=(every if p.pieces is None else p.pieces) - covered)
            for p in out
            if p.node_id in suspect
        ]
        return healthy + [p for p in rest if p.pieces]

    def origin_allowed(self, index: int, refused: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
        """Single-flight: may this node ask the origin for piece ``index`` now? ``refused``:
        peers not to count on for it (banned, or they sent bad bytes for this piece)."""
        alive = {n for n, _ in self._dir.alive()} - set(refused)
        if alive and self._clock() - self._start < self._grace_s:
            # Others may want this file too; give gossip a moment to tell us before anyone
            # reads the origin, or every node would fetch the first pieces itself.
            return False
        wanting = [n for n, _ in self._dir.view.with_partial(self.key) if n in alive]
        if self.blob_hex is not None and any(n in alive for n in self._dir.view.with_blob(self.blob_hex)):
            return False  # a live peer has it all: no reason to touch the origin
        owner = rank(f"{self.key}:{index}", wanting + [self._dir.me])[0]
        if owner == self._dir.me:
            return True
        return self._stalled(owner)

    def wanting(self) -> int:
        """How many live nodes, this one included, are fetching this same file."""
        alive = {n for n, _ in self._dir.alive()}
        return 1 + sum(1 for n, _ in self._dir.view.with_partial(self.key) if n in alive and n != self._dir.me)

    def _stalled(self, node_id: str) -> bool:
        held = next((len(p.pieces) for n, p in self._dir.view.with_partial(self.key) if n == node_id), 0)
        now = self._clock()
        count, since = self._progress.get(node_id, (-1, now))
        if held != count:
            self._progress[node_id] = (held, now)
            return False
        return now - since > self._stall_timeout_s


def _is_hex32(d: str) -> bool:
    return len(d) == 64 and all(c in "0123456789abcdef" for c in d)


def parse_piece_table(raw: bytes, blob_hex: str) -> list[bytes] | None:
    """A blob's ``.pieces`` sidecar, accepted only if it hashes to the blob id."""
    try:
        header, records = decode_piece_log(raw)
    except StoreError:
        return None
    n = len(records)
    if sorted(records) != list(range(n)):
        return None
    table = [records[i] for i in range(n)]
    if BlobId.compute(header.size, header.piece_size, table).hex != blob_hex:
        return None
    return table
