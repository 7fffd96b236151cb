"""Who wants which origin file right now: the agreement behind origin single-flight.

A node that starts fetching an origin file (its identity ``key``) registers its want here, then
asks every live peer directly, with a signed ``POST /p2p/v1/wants`` ("I want ``key``; here is
what I hold or am reading from the origin"), before it reads any piece from the origin. Each side
records the other at the moment it handles the message, in the event loop, so for any two nodes
A and B that want the same file the exchange ends with both knowing the other: either A's question
reaches B after B registered (B answers "I want it too") or before (B records A and, registering
later, asks A, who is registered by then). No clock is involved: a node that is alone asks nobody
and starts at once; a node with peers waits one round trip.

A wanter also tells the others of each piece it verifies (``done``, with its digest), so the
next pieces start from the origin and the finished one spreads without waiting for gossip.

Each message and answer carries the sender's *claims*: the pieces it holds or has started reading
from the origin (or pulling across a zone boundary, which zone mates treat the same way). A node reads piece ``i`` from the origin only if no live wanter claimed it and it
is the rendezvous owner of ``i`` among the live wanters it knows (``placement.rank``). A wanter
that learns of a newcomer does so atomically with telling it its claims, and from then on starts
only pieces it owns in a set that includes the newcomer; adding a node to a rendezvous set only
moves pieces to that node; so two nodes never both start the same piece from the origin.

A piece changes hands only with its owner's consent: a node whose own zone has no piece left to
start may ask the owner of a piece nobody has started for it (``steal``, answered ``granted``). The
owner decides when the message arrives, in one step: granted only if it has not started the piece
and nobody it knows holds, reads or was handed it; from then on the piece is the asker's claim.
With zones, the zone whose origin reads are faster (its link to the origin is not shared with the
pulls across the zone boundary) thereby takes over the slower zone's last pieces instead of
leaving the origin idle. Only the owner grants (as it sees the live wanters), and a
granted asker tells the other wanters its claims at once, so a node that inherits the piece's
ownership (the owner left) knows it is taken. An asker that got no answer asks again later (the
owner answers the same). One window is not covered: a node that becomes the piece's owner within
that round trip may start it too (a piece read twice, never wrong bytes).

A wanter leaves with ``want: false`` (its fetch ended); one that dies is dropped by membership.
This module is bookkeeping only (no I/O, clock injected); ``transfer.sources.Swarm`` sends the
messages through ``PeerClient`` and the peer API hands incoming ones to ``Wants.receive``.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_KEY = re.compile(r"^[0-9a-f]{64}$")
MAX_PIECES = 1 << 20  # claims per message: 16 TiB at 16 MiB pieces
MAX_HEARD_KEYS = 4096  # files peers asked about that this node does not want (yet)
HEARD_TTL_S = 3600.0


@dataclass(slots=True)
class PeerWant:
    """What one other node told us about its want of a file."""

    since: float  # when we learned it (our clock): an older "not wanting" answer cannot undo it
    claimed: set[int] = field(default_factory=set)
    done: dict[int, bytes] = field(default_factory=dict)  # pieces it verified and told us of (digests)


@dataclass(slots=True)
class Want:
    """This node's want of one origin file, and the other wanters it knows."""

    key: str
    size: int
    piece_size: int
    claimed: set[int] = field(default_factory=set)  # pieces held here or being read from the origin
    others: dict[str, PeerWant] = field(default_factory=dict)
    # Nodes that do not (or no longer) want it but hold pieces of it: a wanter that just finished
    # says so as it leaves, before gossip shows its blob.
    holders: dict[str, frozenset[int]] = field(default_factory=dict)
    users: int = 1
    # Whether this node is piece i's origin owner among the live wanters it knows (set by the
    # fetch, ``transfer.sources``): only the owner may hand a piece over.
    owns: Callable[[int], bool] | None = None


@dataclass(frozen=True, slots=True)
class WantMessage:
    key: str
    want: bool
    size: int
    piece_size: int
    claimed: frozenset[int]
    done: Mapping[int, bytes] = field(default_factory=dict)  # pieces just verified: index -> BLAKE3
    steal: int | None = None  # asks the receiver, the piece's origin owner, to hand this piece over

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "want": self.want,
            "size": self.size,
            "piece_size": self.piece_size,
            "claimed": sorted(self.claimed),
        }
        if self.done:
            out["done"] = {str(i): d.hex() for i, d in self.done.items()}
        if self.steal is not None:
            out["steal"] = self.steal
        return out

    @classmethod
    def from_json(cls, d: Any) -> WantMessage:
        """Raises ValueError on anything malformed (the peer API answers 400)."""
        if not isinstance(d, Mapping):
            raise ValueError("want message must be an object")
        key, want, size, piece_size = d.get("key"), d.get("want"), d.get("size"), d.get("piece_size")
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError("want message: key must be 64 lowercase hex digits")
        if not isinstance(want, bool):
            raise ValueError("want message: want must be true or false")
        for name, n in (("size", size), ("piece_size", piece_size)):
            if type(n) is not int or not 0 <= n < 2**63:
                raise ValueError(f"want message: {name} must be a non-negative integer")
        steal = d.get("steal")
        if steal is not None and not (type(steal) is int and 0 <= steal < MAX_PIECES):
            raise ValueError("want message: steal must be a piece index (an integer >= 0)")
        return cls(key, want, size, piece_size, _claims(d.get("claimed")), _done(d.get("done")), steal)


@dataclass(frozen=True, slots=True)
class WantAnswer:
    key: str
    wants: bool
    claimed: frozenset[int]
    granted: bool | None = None  # the answer to a ``steal``; None when none was asked

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "wants": self.wants, "claimed": sorted(self.claimed)}
        if self.granted is not None:
            out["granted"] = self.granted
        return out

    @classmethod
    def from_json(cls, d: Any) -> WantAnswer:
        if not isinstance(d, Mapping) or not isinstance(d.get("key"), str) or not isinstance(d.get("wants"), bool):
            raise ValueError("want answer: expected {key, wants, claimed}")
        granted = d.get("granted")
        if granted is not None and not isinstance(granted, bool):
            raise ValueError("want answer: granted must be true or false")
        return cls(d["key"], d["wants"], _claims(d.get("claimed")), granted)


def _done(raw: Any) -> dict[int, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or len(raw) > MAX_PIECES:
        raise ValueError(f"want message: done must be an object of at most {MAX_PIECES} pieces")
    out = {}
    for i, d in raw.items():
        if not (isinstance(i, str) and i.isdigit() and len(i) <= 7 and isinstance(d, str) and _KEY.match(d)):
            raise ValueError("want message: done maps piece indices to 64 hex digit BLAKE3 digests")
        out[int(i)] = bytes.fromhex(d)
    return out


def _claims(raw: Any) -> frozenset[int]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list) or len(raw) > MAX_PIECES:
        raise ValueError(f"want message: claimed must be a list of at most {MAX_PIECES} piece indices")
    if not all(type(i) is int and 0 <= i < MAX_PIECES for i in raw):
        raise ValueError("want message: claimed holds piece indices (integers >= 0)")
    return frozenset(raw)


class Wants:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._mine: dict[str, Want] = {}
        # Peers that asked about a file we do not want: remembered, so that when we start
        # wanting it we count them without waiting for their next message.
        self._heard: OrderedDict[str, dict[str, PeerWant]] = OrderedDict()

    def clock(self) -> float:
        return self._clock()

    # --- this node ---------------------------------------------------------------------------------

    def register(self, key: str, size: int, piece_size: int, held: Iterable[int]) -> Want:
        """Start wanting ``key`` (or join a want already registered here)."""
        cur = self._mine.get(key)
        if cur is not None:
            cur.users += 1
            return cur
        heard = self._heard.pop(key, {})
        want = Want(key=key, size=size, piece_size=piece_size, claimed=set(held), others=heard)
        self._mine[key] = want
        return want

    def release(self, key: str) -> list[str]:
        """Stop wanting ``key``; the nodes to tell (the wanters we know)."""
        want = self._mine.get(key)
        if want is None:
            return []
        want.users -= 1
        if want.users > 0:
            return []
        del self._mine[key]
        if want.others:
            self._remember(key, want.others)
        return list(want.others)

    def get(self, key: str) -> Want | None:
        return self._mine.get(key)

    def message(
        self,
        key: str,
        *,
        want: bool = True,
        held: Iterable[int] = (),
        done: Mapping[int, bytes] | None = None,
        steal: int | None = None,
    ) -> WantMessage:
        """Our message about ``key``: our claims while we want it (and ``done``, pieces just
        verified; ``steal``, a piece we ask its owner for), else what we hold."""
        w = self._mine.get(key)
        if w is None:
            return WantMessage(key, want, 0, 0, frozenset(held))
        return WantMessage(key, want, w.size, w.piece_size, frozenset(w.claimed), dict(done or {}), steal)

    def take_answer(self, sender: str, answer: WantAnswer, asked_at: float) -> None:
        """``sender``'s answer to the message we sent at ``asked_at``."""
        w = self._mine.get(answer.key)
        if w is None:
            return
        if answer.wants:
            cur = w.others.get(sender)
            if cur is None:
                w.others[sender] = PeerWant(since=asked_at, claimed=set(answer.claimed))
            else:
                cur.claimed |= answer.claimed
            return
        if answer.claimed:
            w.holders[sender] = answer.claimed
        cur = w.others.get(sender)
        # "Not wanting" undoes only what we learned before we asked: its own question may have
        # overtaken this answer, and then it wants the file now.
        if cur is not None and cur.since <= asked_at:
            del w.others[sender]

    # --- other nodes -------------------------------------------------------------------------------

    def receive(self, sender: str, msg: WantMessage) -> WantAnswer:
        """A peer's message; our answer. Recording the sender and answering happen at once."""
        now = self._clock()
        w = self._mine.get(msg.key)
        others = w.others if w is not None else self._heard_for(msg.key, now)
        if msg.want:
            cur = others.get(sender)
            if cur is None and msg.done:
                # News of a finished piece from a node we no longer count: it left (its "no
                # longer wanting" overtook this message), so this must not make it a wanter again.
                return WantAnswer(msg.key, w is not None, frozenset(w.claimed) if w is not None else frozenset())
            if cur is None:
                others[sender] = PeerWant(since=now, claimed=set(msg.claimed), done=dict(msg.done))
            else:
                cur.since, cur.claimed = now, cur.claimed | msg.claimed
                cur.done.update(msg.done)
        else:
            others.pop(sender, None)
            if w is not None and msg.claimed:
                w.holders[sender] = msg.claimed  # it finished (or gave up) holding these
        if w is None:
            if not others:
                self._heard.pop(msg.key, None)
            return WantAnswer(msg.key, False, frozenset(), None if msg.steal is None else False)
        granted = None if msg.steal is None else (msg.want and self._hand_over(w, sender, msg.steal))
        return WantAnswer(msg.key, True, frozenset(w.claimed), granted)

    @staticmethod
    def _hand_over(w: Want, sender: str, index: int) -> bool:
        """``sender`` asks for piece ``index``, which it computed is ours to read from the origin.
        Granted only if nobody we know holds, reads or was handed it; from then on it is the
        sender's claim, so neither we nor a later asker start it. Deciding here, in one step of
        the event loop, is what keeps a handed-over piece single-flight."""
        if w.owns is not None and not w.owns(index):
            return False  # the asker's view of the wanters is not ours: the owner it meant may read it
        if index in w.claimed or any(index in h for h in w.holders.values()):
            return False
        if any(index in p.claimed or index in p.done for n, p in w.others.items() if n != sender):
            return False
        w.others[sender].claimed.add(index)
        return True

    def _heard_for(self, key: str, now: float) -> dict[str, PeerWant]:
        self._trim(now)
        others = self._heard.get(key)
        if others is None:
            others = self._heard[key] = {}
        self._heard.move_to_end(key)
        return others

    def _remember(self, key: str, others: dict[str, PeerWant]) -> None:
        self._heard[key] = dict(others)
        self._trim(self._clock())

    def _trim(self, now: float) -> None:
        while len(self._heard) > MAX_HEARD_KEYS:
            self._heard.popitem(last=False)
        for key in [k for k, o in self._heard.items() if o and all(now - p.since > HEARD_TTL_S for p in o.values())]:
            del self._heard[key]
