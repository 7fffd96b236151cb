"""Cluster membership: who exists, who is alive. Pure merge rules; no I/O, clock injected.

Every node gossips what it knows of every member: (incarnation, heartbeat) and a few facts
(address, cluster, holdings version, capacity). A member's entry is replaced only by a strictly
newer (incarnation, heartbeat); its status is decided locally from how long ago its heartbeat last
advanced: alive, then suspect after ``suspect_after_s``, then dead after ``dead_after_s``, then
forgotten after ``forget_after_s``. A restarted node comes back with a higher incarnation, which
beats any heartbeat of its previous life. Members of another cluster are ignored.

Everything a peer tells us is bounded, because any token holder can say anything: integers are
0 <= n < 2**63 (a 4,300-digit incarnation would make our own jump past it and then fail to
encode); an incarnation (start time in ms) more than ``MAX_FUTURE_MS`` past our wall clock is
refused, so nobody can push our own incarnation out of reach; ids, addresses, cluster names and
labels have length caps; and at most ``max_members`` members are kept (new ones beyond it are
dropped and counted, unless the caller vouches for them: then an unproven member makes room).
A member is *proven* when it answered one of our own signed requests with a signed answer
(``prove``); gossip prefers proven members as targets, so fake members cannot crowd out real ones.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cached.types import MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS, MAX_LABELS

MAX_INT = 2**63 - 1
MAX_FUTURE_MS = 86_400_000  # an incarnation is a start time in ms; a day ahead of us is a lie
MAX_MEMBERS = 10_000
MAX_ID_CHARS = 253
MAX_ADDRESS_CHARS = 300


class Status(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberInfo:
    """What travels in gossip about one node."""

    node_id: str
    address: str  # HOST:PORT of its peer API
    cluster: str
    incarnation: int
    heartbeat: int = 0
    holdings_version: int = 0
    capacity_bytes: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def age(self) -> tuple[int, int]:
        return (self.incarnation, self.heartbeat)

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "cluster": self.cluster,
            "incarnation": self.incarnation,
            "heartbeat": self.heartbeat,
            "holdings_version": self.holdings_version,
            "capacity_bytes": self.capacity_bytes,
            "labels": dict(self.labels),
        }

    def __post_init__(self) -> None:
        for name in ("incarnation", "heartbeat", "holdings_version", "capacity_bytes"):
            n = getattr(self, name)
            if type(n) is not int or not 0 <= n <= MAX_INT:
                raise ValueError(f"bad member entry: {name} must be an integer in [0, 2**63)")
        for name, cap in (("node_id", MAX_ID_CHARS), ("address", MAX_ADDRESS_CHARS), ("cluster", MAX_ID_CHARS)):
            v = getattr(self, name)
            if not isinstance(v, str) or len(v) > cap or (name == "node_id" and not v):
                raise ValueError(f"bad member entry: {name}")
        if len(self.labels) > MAX_LABELS or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and 0 < len(k) <= MAX_LABEL_KEY_CHARS
            and len(v) <= MAX_LABEL_VALUE_CHARS
            for k, v in self.labels.items()
        ):
            raise ValueError(
                f"bad member entry: labels (at most {MAX_LABELS}, key <= {MAX_LABEL_KEY_CHARS}, value <= {MAX_LABEL_VALUE_CHARS} chars)"
            )

    @property
    def wire_size(self) -> int:
        """About how many bytes ``to_json`` takes in a message (for message budgets)."""
        return (
            200
            + len(self.node_id)
            + len(self.address)
            + len(self.cluster)
            + sum(len(k) + len(v) + 6 for k, v in self.labels.items())
        )

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MemberInfo:
        """Strict: a malformed entry raises ValueError (the caller counts and drops it). Strings
        must be strings and integers integers (never coerced: ``int("9"*4300)`` is a weapon)."""
        if not isinstance(d, Mapping) or not d.get("address"):
            raise ValueError("bad member entry: not an object with an address")
        try:
            labels = d.get("labels") or {}
            if not isinstance(labels, Mapping):
                raise TypeError("labels must be an object")
            return cls(
                node_id=d["node_id"],
                address=d["address"],
                cluster=d["cluster"],
                incarnation=d["incarnation"],
                heartbeat=d.get("heartbeat", 0),
                holdings_version=d.get("holdings_version", 0),
                capacity_bytes=d.get("capacity_bytes", 0),
                labels=dict(labels),
            )
        except (KeyError, TypeError, AttributeError, OverflowError) as e:
            raise ValueError(f"bad member entry: {e}") from None


@dataclass(slots=True)
class Member:
    info: MemberInfo
    last_progress: float  # local clock when (incarnation, heartbeat) last advanced
    status: Status = Status.ALIVE
    last_proven: float | None = None  # local clock when it last answered us with a signed answer


class Membership:
    def __init__(
        self,
        me: MemberInfo,
        *,
        suspect_after_s: float,
        dead_after_s: float,
        forget_after_s: float,
        clock: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
        max_members: int = MAX_MEMBERS,
    ) -> None:
        self.me = me
        self._suspect_after_s = suspect_after_s
        self._dead_after_s = dead_after_s
        self._forget_after_s = forget_after_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_members = max_members
        self._members: dict[str, Member] = {}
        # Entries refused so far, by reason ("full", "future"); the caller turns deltas into metrics.
        self.refused: dict[str, int] = {"full": 0, "future": 0}

    # --- this node -----------------------------------------------------------------------------

    def beat(self, *, holdings_version: int | None = None, capacity_bytes: int | None = None) -> MemberInfo:
        """Advance our heartbeat (once per gossip round) and publish our latest facts."""
        self.me = replace(
            self.me,
            heartbeat=self.me.heartbeat + 1,
            holdings_version=self.me.holdings_version if holdings_version is None else holdings_version,
            capacity_bytes=self.me.capacity_bytes if capacity_bytes is None else capacity_bytes,
        )
        return self.me

    # --- merging -------------------------------------------------------------------------------

    def merge(self, infos: Iterable[MemberInfo], *, vouched: frozenset[str] = frozenset()) -> list[str]:
        """Apply gossip. Returns the ids whose entry changed (new, newer, or back to life).
        ``vouched`` ids (the signed sender of this message) are admitted even when full."""
        now = self._clock()
        horizon = int(self._wall_clock() * 1000) + MAX_FUTURE_MS
        changed: list[str] = []
        for info in infos:
            if info.cluster != self.me.cluster:
                continue
            if info.incarnation > horizon:
                self.refused["future"] += 1
                continue
            if info.node_id == self.me.node_id:
                if info.incarnation > self.me.incarnation:
                    # Someone remembers a later life of this node id than ours (a clock that went
                    # back): jump past it so our own entries win again. (Two live processes with
                    # one node id are a misconfiguration this does not try to settle.)
                    self.me = replace(self.me, incarnation=info.incarnation + 1, heartbeat=0)
                continue
            cur = self._members.get(info.node_id)
            if cur is None:
                if len(self._members) >= self._max_members and not (info.node_id in vouched and self._make_room()):
                    self.refused["full"] += 1
                    continue
                self._members[info.node_id] = Member(info=info, last_progress=now)
                changed.append(info.node_id)
            elif info.age > cur.info.age:
                revived = cur.status is not Status.ALIVE
                cur.info = info
                cur.last_progress = now
                if revived:
                    cur.status = Status.ALIVE
                changed.append(info.node_id)
        return changed

    def _make_room(self) -> bool:
        """Forget the unproven member heard of longest ago (dead first). False if all are proven."""
        rank = {Status.DEAD: 0, Status.SUSPECT: 1, Status.ALIVE: 2}
        victims = [m for m in self._members.values() if m.last_proven is None]
        if not victims:
            return False
        victim = min(victims, key=lambda m: (rank[m.status], m.last_progress))
        del self._members[victim.info.node_id]
        return True

    def prove(self, address: str) -> list[str]:
        """The member(s) at ``address`` just answered a signed request with a signed answer."""
        now = self._clock()
        out = []
        for m in self._members.values():
            if m.info.address == address:
                m.last_proven = now
                out.append(m.info.node_id)
        return out

    def clock(self) -> float:
        return self._clock()

    def proven(self, m: Member) -> bool:
        """Answered us, signed, within the time it takes a silent member to be declared dead."""
        return m.last_proven is not None and self._clock() - m.last_proven < self._dead_after_s

    def refresh(self) -> list[tuple[str, Status]]:
        """Re-derive statuses from heartbeat age; forget long-dead members. Returns transitions."""
        now = self._clock()
        moves: list[tuple[str, Status]] = []
        for node_id, m in list(self._members.items()):
            age = now - m.last_progress
            status = (
                Status.ALIVE
                if age < self._suspect_after_s
                else Status.SUSPECT
                if age < self._dead_after_s
                else Status.DEAD
            )
            if status is Status.DEAD and age >= self._dead_after_s + self._forget_after_s:
                del self._members[node_id]
                continue
            if status is not m.status:
                m.status = status
                moves.append((node_id, status))
        return moves

    # --- queries -------------------------------------------------------------------------------

    def members(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.info.node_id)

    def get(self, node_id: str) -> Member | None:
        return self._members.get(node_id)

    def alive(self) -> list[Member]:
        return [m for m in self.members() if m.status is Status.ALIVE]

    def snapshot(self) -> list[MemberInfo]:
        """Everything we know, ourselves included, for a gossip message."""
        return [self.me] + [m.info for m in self.members()]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for m in self._members.values():
            out[m.status.value] += 1
        return out
