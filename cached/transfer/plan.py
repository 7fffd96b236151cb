"""Which missing piece to ask of which source next. Pure: no I/O, no clock, no randomness.

Rules, in order: a piece already in flight is not asked again (except in endgame, where the last
pieces may go to a second source); among the rest, rarest first (held by the fewest peers); each
goes to the nearest (same zone), then least-loaded, peer that holds it and has a free slot; the origin is the last resort,
used only for pieces no peer holds. Per-source limits and a global limit bound what is in flight.
The blob fetcher (``transfer.blob``) calls ``assign`` every time a request finishes and runs what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ORIGIN = "origin"


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceView:
    name: str
    is_origin: bool
    limit: int
    inflight: int = 0
    # Piece indices this source can serve; None means every piece (an origin, a complete blob).
    pieces: frozenset[int] | None = None
    near: bool = True  # in this node's zone: preferred over a peer across a zone boundary

    def holds(self, index: int) -> bool:
        return self.pieces is None or index in self.pieces

    @property
    def free(self) -> int:
        return max(0, self.limit - self.inflight)


@dataclass(frozen=True, slots=True)
class Assignment:
    piece: int
    source: str


def assign(
    *,
    missing: Sequence[int],
    inflight: dict[int, set[str]],
    sources: Sequence[SourceView],
    global_free: int,
    endgame_pieces: int = 0,
) -> list[Assignment]:
    """Requests to start now. ``inflight`` maps piece -> sources already asked for it."""
    free = {s.name: s.free for s in sources}
    peers = [s for s in sources if not s.is_origin]
    origins = [s for s in sources if s.is_origin]

    def rarity(index: int) -> tuple[int, int]:
        return (sum(1 for p in peers if p.holds(index)), index)

    out: list[Assignment] = []
    todo = sorted((i for i in missing if i not in inflight), key=rarity)
    for index in todo:
        if global_free <= 0:
            break
        src = _pick(index, peers, free) or (None if any(p.holds(index) for p in peers) else _pick(index, origins, free))
        if src is not None:
            out.append(Assignment(index, src))
            free[src] -= 1
            global_free -= 1

    # Endgame: when only a few pieces remain and all are in flight, ask a second source for each,
    # so one slow source cannot hold the whole blob back. The blob fetcher cancels the loser.
    still_missing = set(missing)
    if not todo and 0 < len(inflight) <= endgame_pieces:
        # Only pieces still missing: a finished piece whose losing copy is being cancelled must
        # never be asked again (that would loop forever at the end of a blob).
        for index in sorted(i for i in inflight if i in still_missing):
            if global_free <= 0:
                break
            if len(inflight[index]) >= 2:
                continue
            others = [s for s in sources if s.name not in inflight[index]]
            src = _pick(index, [s for s in others if not s.is_origin], free) or _pick(
                index, [s for s in others if s.is_origin], free
            )
            if src is not None:
                out.append(Assignment(index, src))
                free[src] -= 1
                global_free -= 1
    return out


def _pick(index: int, candidates: Sequence[SourceView], free: dict[str, int]) -> str | None:
    best: SourceView | None = None
    for s in candidates:
        if free[s.name] <= 0 or not s.holds(index):
            continue
        if best is None or _rank(s, free) < _rank(best, free):
            best = s
    return best.name if best else None


def _rank(s: SourceView, free: dict[str, int]) -> tuple[bool, float]:
    """Nearer first (same zone), then the least loaded."""
    return (not s.near, (s.limit - free[s.name]) / max(1, s.limit))
