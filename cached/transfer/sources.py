"""Where a blob's pieces can come from: peers that hold it (complete or partial) and the origin.

``Swarm`` looks at the cluster for one blob, through a ``PeerDirectory`` that the composition
root builds over gossip: which live peers hold the blob complete (any piece, checked against the
piece table verified against the blob id), which hold some verified pieces of the same origin file
(checked against the digests they published), and which pieces this node may take from the origin.

Origin single-flight (``transfer.wants``): before its first origin read, ``join`` registers this
node's want of the file and asks every live peer directly who else wants it and what they already
claimed (hold or are reading from the origin). Piece ``i`` is then read from the origin only by
its rendezvous owner among the live wanters, and never when another wanter claimed it; the
others take it from peers once it is verified. Nothing waits on a clock: a node that is alone
starts at once. A wanter that dies is dropped by membership, one that gives up says so; when this
node has waited ``stall_timeout_s`` with nothing to do, it asks the owners again (``recheck``)
rather than guessing from their progress. With zones, a node whose zone has no origin piece
left to start asks another zone's owner to hand one over (``steal_candidate``, ``steal``). This
module holds no sockets of its own; reads go through ``PeerClient``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cached.errors import StoreError
from cached.peers.client import PeerClient, PeerError
from cached.peers.holdings import HoldingsView
from cached.placement import rank
from cached.store.partial import decode_piece_log
from cached.transfer.wants import Want, WantAnswer, Wants
from cached.types import BlobId, piece_count

ASK_TICK_S = 0.1  # how often a want exchange looks whether a silent peer turned suspect
LEAVE_TIMEOUT_S = 2.0
T = TypeVar("T")
TELL_AT_ONCE = 16  # "piece done" messages in flight from one fetch
ORIGIN_WINDOW = (
    4  # pieces of one file in flight from the origin per zone (cluster-wide in one zone), while several nodes want it
)


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

    def zone(self, node_id: str) -> str:
        """A member's ``labels.zone`` ("" when it has none)."""
        ...


def healthy_first(node_ids: list[str], suspect: set[str]) -> list[str]:
    """Suspect members last: a request to a host that vanished waits out the connect timeout."""
    return sorted(node_ids, key=lambda n: n in suspect)


async def unless_suspect(directory: PeerDirectory, node_id: str, aw: Awaitable[T]) -> T:
    """``aw`` (a request to ``node_id``), given up with a ``PeerError`` as soon as that peer turns
    suspect or dead: a peer that stopped answering costs no read timeout."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=ASK_TICK_S)
            if done:
                return task.result()
            if node_id in directory.suspect() or node_id not in dict(directory.alive()):
                raise PeerError(f"peer {node_id} stopped answering (suspect)")
    finally:
        task.cancel()


@dataclass(frozen=True, slots=True)
class PeerSource:
    node_id: str
    address: str
    kind: str  # "blobs" (complete) or "partials"
    name: str  # blob hex or partial key
    pieces: frozenset[int] | None  # None: every piece (a complete blob)
    digests: dict[int, bytes]  # what each served piece must hash to
    cross_zone: bool = False  # in another zone than this node (``labels.zone``)


class Swarm:
    def __init__(
        self,
        directory: PeerDirectory,
        *,
        key: str,
        piece_size: int,
        size: int,
        stall_timeout_s: float = 10.0,
        wants: Wants | None = None,
    ) -> None:
        self._dir = directory
        self._wants = wants
        self._want: Want | None = None
        self.key = key
        self._piece_size = piece_size
        self._size = size
        self._stall_timeout_s = stall_timeout_s
        self.blob_hex: str | None = None
        self.table: list[bytes] | None = None  # piece digests of the finished blob, once known
        self._round: _Round | None = None  # who is alive and wants the file, as of this planning round
        self._telling: set[asyncio.Task[None]] = set()  # "piece done" messages on their way
        self._tell_slots = asyncio.Semaphore(TELL_AT_ONCE)
        self._granted: set[int] = set()  # pieces another zone's owner handed to this node
        self._not_granted: set[int] = set()  # asked for and refused: not asked again (no answer: asked again)

    @property
    def client(self) -> PeerClient:
        return self._dir.client

    @property
    def stall_timeout_s(self) -> float:
        return self._stall_timeout_s

    # --- the want exchange -------------------------------------------------------------------------

    async def join(self, held: Iterable[int]) -> None:
        """Register this node's want and ask every live peer who else wants the file; returns once
        each answered, failed, or turned suspect (a node alone returns at once)."""
        if self._wants is None:
            return
        self._want = self._wants.register(self.key, self._size, self._piece_size, held)
        self._want.owns = self._owns
        await self._ask([(n, a) for n, a in self._dir.alive() if n != self._dir.me])

    async def leave(self, held: Iterable[int]) -> None:
        """This node no longer wants the file: tell the wanters it knows, with the pieces it holds
        (best effort; gossip says the same a little later)."""
        for t in self._telling:
            t.cancel()
        if self._wants is None or self._want is None:
            return
        self._want = None
        tell = set(self._wants.release(self.key))
        if not tell:
            return
        msg = self._wants.message(self.key, want=False, held=held).to_json()
        addresses = [a for n, a in self._dir.alive() if n in tell]
        await asyncio.gather(
            *(asyncio.wait_for(self._dir.client.want(a, msg), LEAVE_TIMEOUT_S) for a in addresses),
            return_exceptions=True,
        )

    async def recheck(self) -> None:
        """Ask the other wanters again whether they still want the file (one may have given up
        without being able to say so): exact, where judging by their progress would guess."""
        if self._want is None:
            return
        alive = dict(self._dir.alive())
        ask = [n for n in {*self._want.others, *self._want.holders} if n in alive]
        self._want.holders.clear()  # re-learned from the answers (a holder that gave up may serve nothing)
        await self._ask([(n, alive[n]) for n in ask], drop_silent=True)

    async def _ask(self, peers: list[tuple[str, str]], *, drop_silent: bool = False) -> None:
        assert self._wants is not None
        if not peers:
            return
        msg = self._wants.message(self.key)
        asked_at = self._wants.clock()
        body = msg.to_json()
        tasks = {asyncio.create_task(self._dir.client.want(a, body), name=f"want:{n}"): n for n, a in peers}
        pending = set(tasks)
        deadline = asyncio.get_running_loop().time() + self._stall_timeout_s
        try:
            while pending:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                done, pending = await asyncio.wait(pending, timeout=min(left, ASK_TICK_S))
                for t in done:
                    try:
                        answer = WantAnswer.from_json(t.result())
                    except Exception:  # noqa: BLE001 - a peer that cannot answer does not count as a wanter
                        continue
                    if answer.key == self.key:
                        self._wants.take_answer(tasks[t], answer, asked_at)
                # A peer that turned suspect (or died) while we asked costs no further wait.
                gone = self._dir.suspect() | ({tasks[t] for t in pending} - {n for n, _ in self._dir.alive()})
                pending = {t for t in pending if tasks[t] not in gone}
        finally:
            for t in tasks:
                t.cancel()
        if drop_silent and self._want is not None:
            for t, n in tasks.items():
                if not t.done() or t.cancelled() or t.exception() is not None:
                    self._want.others.pop(n, None)

    def announce(self, index: int, digest: bytes) -> None:
        """Tell the other wanters that piece ``index`` is verified here (fire and forget, a few
        at a time): the origin window moves on and the piece spreads without waiting for gossip."""
        if self._wants is None or self._want is None or not self._want.others:
            return
        self._tell_wanters(
            self._wants.message(self.key, done={index: digest}).to_json(), "want-done", self._dir.suspect()
        )

    def _tell_wanters(self, body: dict[str, Any], name: str, skip: set[str]) -> None:
        """Send ``body`` to every live wanter we know but ``skip`` (fire and forget, a few at a time)."""
        assert self._want is not None
        alive = dict(self._dir.alive())
        for n in self._want.others:
            if n in alive and n not in skip:
                t = asyncio.create_task(self._tell(alive[n], body), name=f"{name}:{n}")
                self._telling.add(t)
                t.add_done_callback(self._telling.discard)

    async def _tell(self, address: str, body: dict[str, Any]) -> None:
        async with self._tell_slots:
            with contextlib.suppress(Exception):  # best effort: gossip tells the same a little later
                await asyncio.wait_for(self._dir.client.want(address, body), LEAVE_TIMEOUT_S)

    def suspects(self) -> set[str]:
        return self._dir.suspect()

    def claim(self, index: int) -> None:
        """This node starts bringing piece ``index`` in from the origin or from another zone
        (told to later askers)."""
        if self._want is not None:
            self._want.claimed.add(index)

    # --- sources -------------------------------------------------------------------------------------

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
                raw = await unless_suspect(self._dir, node_id, self._dir.client.piece_table(alive[node_id], blob_hex))
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
        out = self._with_told(out, alive, banned)
        out = self._zoned(out, alive)
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

    def _with_told(self, sources: list[PeerSource], alive: dict[str, str], banned: set[str]) -> list[PeerSource]:
        """Add the pieces other wanters told us they verified, which gossip may not show yet."""
        if self._want is None:
            return sources
        by_node = {p.node_id: p for p in sources}
        for n, w in self._want.others.items():
            if not w.done or n not in alive or n in banned:
                continue
            cur = by_node.get(n)
            if cur is None:
                by_node[n] = PeerSource(n, alive[n], "partials", self.key, frozenset(w.done), dict(w.done))
            elif cur.pieces is not None and not w.done.keys() <= cur.pieces:
                by_node[n] = dataclasses.replace(
                    cur, pieces=cur.pieces | frozenset(w.done), digests={**w.done, **cur.digests}
                )
        return list(by_node.values())

    def _zoned(self, sources: list[PeerSource], alive: dict[str, str]) -> list[PeerSource]:
        """Zone single-flight: a piece held only outside this node's zone is pulled across by one
        wanter of the zone (its rendezvous owner there); the others take it inside the zone."""
        zone = self._dir.zone(self._dir.me)
        if not any(self._dir.zone(p.node_id) != zone for p in sources):
            return sources
        mates = [self._dir.me] + [n for n in self._other_wanters(set(alive)) if self._dir.zone(n) == zone]
        every = frozenset(range(piece_count(self._size, self._piece_size)))
        inside = frozenset().union(
            *((every if p.pieces is None else p.pieces) for p in sources if self._dir.zone(p.node_id) == zone),
            # and what a zone mate is bringing in already (from the origin or across)
            *(self._want.others[n].claimed for n in mates[1:] if self._want is not None),
        )
        mine = frozenset(i for i in every - inside if rank(f"{self.key}:{i}:zone", mates)[0] == self._dir.me)
        out = []
        for p in sources:
            if self._dir.zone(p.node_id) == zone:
                out.append(p)
                continue
            pieces = (every if p.pieces is None else p.pieces) & mine
            if pieces:
                out.append(dataclasses.replace(p, pieces=pieces, cross_zone=True))
        return out

    # --- origin single-flight ----------------------------------------------------------------------

    def plan_round(self, refused: set[str] = frozenset(), missing: Iterable[int] = ()) -> None:  # type: ignore[assignment]
        """Take one look at who is alive and who wants the file, for this planning round's
        ``origin_allowed`` calls (``refused``: peers not to count on: banned; ``missing``: the
        pieces this node lacks)."""
        alive = {n for n, _ in self._dir.alive()} - set(refused)
        held = frozenset().union(
            *(
                frozenset(info.pieces)
                for n, info in self._dir.view.with_partial(self.key)
                if n in alive and (info.size, info.piece_size) == (self._size, self._piece_size)
            )
        )
        complete = (
            frozenset(n for n in self._dir.view.with_blob(self.blob_hex) if n in alive)
            if self.blob_hex is not None
            else frozenset()
        )
        wanters = self._other_wanters(alive)
        claimed: set[int] = set()
        if self._want is not None:
            for n in wanters:
                claimed |= self._want.others[n].claimed
                held |= frozenset(self._want.others[n].done)
            for n, theirs in self._want.holders.items():
                if n in alive:
                    claimed |= theirs
                    held |= theirs
        everyone = [*wanters, self._dir.me]
        unfinished = sorted(i for i in missing if i not in held)
        self._round = _Round(
            complete=complete,
            wanters=everyone,
            claimed=frozenset(claimed),
            unfinished=self._owned_in_zone(unfinished, everyone),
            unheld=unfinished,
        )

    def _owned_in_zone(self, unfinished: list[int], wanters: list[str]) -> list[int]:
        """The unfinished pieces whose origin owner is in this node's zone: each zone has its own
        origin window. A piece read across a busy zone link is slow, and with one window for the
        cluster it held every other zone's origin reads back behind it (the two-zone run's origin
        link idled in bursts: 1.27x its bound)."""
        zone = self._dir.zone(self._dir.me)
        if all(self._dir.zone(n) == zone for n in wanters):
            return unfinished
        return [i for i in unfinished if self._dir.zone(rank(f"{self.key}:{i}", wanters)[0]) == zone]

    def origin_allowed(self, index: int, refused: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
        """Single-flight: may this node ask the origin for piece ``index`` now? ``refused``:
        peers not to count on for it (they sent bad bytes for this piece)."""
        if self._wants is not None and self._want is None:
            return False  # not joined: the others do not know of us yet
        r = self._round
        if r is None:
            self.plan_round()
            r = self._round
            assert r is not None
        if r.complete - refused:
            return False  # a live peer has it all: no reason to touch the origin
        if index in self._granted:
            return True  # its owner handed it over: nobody else starts it
        wanters = [n for n in r.wanters if n not in refused]
        if index in r.claimed and not (refused and self._claimed_only_by(index, refused)):
            return False  # another wanter holds it or is reading it from the origin
        if rank(f"{self.key}:{index}", wanters)[0] != self._dir.me:
            return False
        # The origin window (per zone): a piece starts only while fewer than ORIGIN_WINDOW pieces
        # before it, owned in this zone, are unfinished everywhere, so the origin's bandwidth goes to a few pieces at a
        # time, each finishes early and is relayed while the next ones come in (with every piece
        # in flight at once, all would land at the very end and only then spread).
        return len(wanters) < 2 or bisect.bisect_left(r.unfinished, index) < ORIGIN_WINDOW

    def steal_candidate(self, busy: Iterable[int] = ()) -> tuple[int, str] | None:
        """A piece to ask another zone's owner for, and that owner: only once every origin piece
        owned in this node's zone is started or done (so each zone reads its own share first), the
        last unstarted piece of another zone's share (its owner reads from the front, so the two
        rarely want the same one). None without zones, or when nothing is left to take."""
        r = self._round
        if r is None or self._want is None or r.complete or len(r.wanters) < 2:
            return None
        zone = self._dir.zone(self._dir.me)
        if all(self._dir.zone(n) == zone for n in r.wanters):
            return None
        mine = self._want.claimed
        if any(i not in r.claimed and i not in mine for i in r.unfinished):
            return None  # this zone still has pieces of its own to start
        skip = r.claimed | mine | self._not_granted | frozenset(busy)
        for i in reversed(r.unheld):
            if i in skip:
                continue
            owner = rank(f"{self.key}:{i}", r.wanters)[0]
            if self._dir.zone(owner) != zone:
                return i, owner
        return None

    async def steal(self, index: int, owner: str) -> bool:
        """Ask ``owner`` to hand piece ``index`` over (``transfer.wants``). True: it is this node's
        to read from the origin now."""
        address = dict(self._dir.alive()).get(owner)
        if self._wants is None or self._want is None or address is None:
            return False
        asked_at = self._wants.clock()
        body = self._wants.message(self.key, steal=index).to_json()
        try:
            answer = WantAnswer.from_json(await asyncio.wait_for(self._dir.client.want(address, body), LEAVE_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - no answer: the owner may have granted it, so ask again later
            return False
        if answer.key != self.key:
            return False
        self._wants.take_answer(owner, answer, asked_at)
        if not answer.granted or self._want is None:
            self._not_granted.add(index)  # refused: not asked again
            return False
        self._granted.add(index)
        self.claim(index)
        # Tell the other wanters now, not at the next piece done: if the owner leaves, the piece's
        # next owner must already know it is taken.
        self._tell_wanters(self._wants.message(self.key).to_json(), "want-claim", {owner})
        return True

    def _owns(self, index: int) -> bool:
        """Whether this node is piece ``index``'s origin owner among the live wanters it knows."""
        alive = {n for n, _ in self._dir.alive()}
        return rank(f"{self.key}:{index}", [*self._other_wanters(alive), self._dir.me])[0] == self._dir.me

    def _claimed_only_by(self, index: int, refused: set[str]) -> bool:
        if self._want is None:
            return False
        return all(n in refused for n, w in self._want.others.items() if index in w.claimed) and all(
            n in refused for n, held in self._want.holders.items() if index in held
        )

    def _other_wanters(self, alive: set[str]) -> list[str]:
        """Live nodes besides this one that want the file, as the want exchange told us. Without
        a registry (a repair of this node's own blob) nobody else counts: a partial someone
        announces says nothing about whether it is still being fetched."""
        if self._want is None:
            return []
        return sorted(n for n in self._want.others if n in alive and n != self._dir.me)

    def wanting(self) -> int:
        """How many live nodes, this one included, are fetching this same file."""
        return 1 + len(self._other_wanters({n for n, _ in self._dir.alive()}))


@dataclass(frozen=True, slots=True)
class _Round:
    complete: frozenset[str]  # live peers that hold the whole blob
    wanters: list[str]  # live wanters, this node included
    claimed: frozenset[int]  # pieces other live wanters hold or are reading from the origin
    # sorted: missing here and at every live peer, and owned (origin) by a wanter of this node's zone
    unfinished: list[int] = dataclasses.field(default_factory=list)
    unheld: list[int] = dataclasses.field(default_factory=list)  # the same, whoever owns them


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
