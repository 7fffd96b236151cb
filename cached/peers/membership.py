"""Cluster membership: who exists, who is alive. Pure merge rules; no I/O, clock injected.

Every node gossips what it knows of every member: (incarnation, heartbeat) and a few facts
(address, cluster, holdings version, capacity). A member's entry is replaced only by a strictly
newer (incarnation, heartbeat); its status is decided locally from how long ago its heartbeat last
advanced: alive, then suspect after ``suspect_after_s``, then dead after ``dead_after_s``, then
forgotten after ``forget_after_s``. A restarted node comes back with a higher incarnation, which
beats any heartbeat of its previous life. Members of another cluster are ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping


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

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "MemberInfo":
        """Strict: a malformed entry raises ValueError (the caller counts and drops it)."""
        try:
            info = cls(
                node_id=str(d["node_id"]),
                address=str(d["address"]),
                cluster=str(d["cluster"]),
                incarnation=int(d["incarnation"]),
                heartbeat=int(d.get("heartbeat", 0)),
                holdings_version=int(d.get("holdings_version", 0)),
                capacity_bytes=int(d.get("capacity_bytes", 0)),
                labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
            )
        except (KeyError, TypeError, AttributeError, OverflowError) as e:
            raise ValueError(f"bad member entry: {e}") from None
        if not info.node_id or len(info.node_id) > 253 or not 0 < len(info.address) <= 300:
            raise ValueError("bad member entry: node_id or address")
        if min(info.incarnation, info.heartbeat, info.holdings_version, info.capacity_bytes) < 0:
            raise ValueError("bad member entry: negative counter")
        return info


@dataclass(slots=True)
class Member:
    info: MemberInfo
    last_progress: float  # local clock when (incarnation, heartbeat) last advanced
    status: Status = Status.ALIVE


class Membership:
    def __init__(
        self,
        me: MemberInfo,
        *,
        suspect_after_s: float,
        dead_after_s: float,
        forget_after_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.me = me
        self._suspect_after_s = suspect_after_s
        self._dead_after_s = dead_after_s
        self._forget_after_s = forget_after_s
        self._clock = clock
        self._members: dict[str, Member] = {}

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

    def merge(self, infos: Iterable[MemberInfo]) -> list[str]:
        """Apply gossip. Returns the ids whose entry changed (new, newer, or back to life)."""
        now = self._clock()
        changed: list[str] = []
        for info in infos:
            if info.cluster != self.me.cluster:
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

    def refresh(self) -> list[tuple[str, Status]]:
        """Re-derive statuses from heartbeat age; forget long-dead members. Returns transitions."""
        now = self._clock()
        moves: list[tuple[str, Status]] = []
        for node_id, m in list(self._members.items()):
            age = now - m.last_progress
            status = Status.ALIVE if age < self._suspect_after_s else Status.SUSPECT if age < self._dead_after_s else Status.DEAD
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
