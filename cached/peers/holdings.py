"""Holdings: which blobs, partial blobs (with verified pieces), manifests and refs a node has.

Pure bookkeeping, no I/O. ``LocalHoldings`` turns every change of this node's store (a
``cached.types.StoreEvent``) into a versioned delta and keeps a bounded log of them, so a peer that
has version ``v`` gets only the changes after ``v`` (a delta), or the whole state when ``v`` is too
old for the log. ``HoldingsView`` keeps the latest state of every other node and answers "who has
this blob / this piece".

What is announced is what peers may use: a ``file://`` ref names a path on this node only, so its
ref op and its manifest never enter ``LocalHoldings`` (a manifest is announced once a shareable
ref names it; the store always announces a manifest just before the ref that names it).

On the wire (``since`` answers, ``NodeHoldings.apply``) deltas are small lists, one per event:
``["blob+", hex, size, origin-identity-key]``, ``["blob-", hex]``, ``["manifest+", d]``,
``["manifest-", d]``, ``["ref", canonical, digest-or-null]``, ``["partial+", key, size,
piece_size]``, ``["piece", key, index, digest-hex]``, ``["partial-", key]``. ``wire_op`` is the
one place that maps an event to its list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cached.types import (
    BlobAdded,
    BlobRemoved,
    ManifestAdded,
    ManifestRemoved,
    PartialDropped,
    PartialStarted,
    PieceVerified,
    RefChanged,
    StoreEvent,
)

MAX_LOG = 20_000


@dataclass(slots=True)
class PartialInfo:
    size: int
    piece_size: int
    pieces: dict[int, str] = field(default_factory=dict)  # verified piece -> digest hex


@dataclass(slots=True)
class NodeHoldings:
    version: int = 0
    blobs: dict[str, int] = field(default_factory=dict)  # hex -> size
    blob_keys: dict[str, str] = field(default_factory=dict)  # origin identity key -> hex
    manifests: set[str] = field(default_factory=set)
    refs: dict[str, str] = field(default_factory=dict)  # canonical ref -> manifest digest
    partials: dict[str, PartialInfo] = field(default_factory=dict)

    def apply(self, op: list[Any]) -> None:
        """One delta. Raises ValueError/IndexError/TypeError on a malformed op."""
        kind = op[0]
        if kind == "blob+":
            self.blobs[str(op[1])] = int(op[2])
            if len(op) > 3 and op[3]:
                self.blob_keys[str(op[3])] = str(op[1])
        elif kind == "blob-":
            self.blobs.pop(str(op[1]), None)
            for k in [k for k, v in self.blob_keys.items() if v == op[1]]:
                del self.blob_keys[k]
        elif kind == "manifest+":
            self.manifests.add(str(op[1]))
        elif kind == "manifest-":
            self.manifests.discard(str(op[1]))
        elif kind == "ref":
            if op[2] is None:
                self.refs.pop(str(op[1]), None)
            else:
                self.refs[str(op[1])] = str(op[2])
        elif kind == "partial+":
            size, piece_size = int(op[2]), int(op[3])
            if size < 0 or piece_size <= 0:
                raise ValueError("bad partial size")
            cur = self.partials.get(str(op[1]))
            if cur is None or (cur.size, cur.piece_size) != (size, piece_size):
                self.partials[str(op[1])] = PartialInfo(size=size, piece_size=piece_size)
        elif kind == "piece":
            p = self.partials.get(str(op[1]))
            if p is not None:
                p.pieces[int(op[2])] = str(op[3])
        elif kind == "partial-":
            self.partials.pop(str(op[1]), None)
        else:
            raise ValueError(f"unknown holdings op {kind!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "blobs": self.blobs,
            "blob_keys": self.blob_keys,
            "manifests": sorted(self.manifests),
            "refs": self.refs,
            "partials": {
                k: {"size": p.size, "piece_size": p.piece_size, "pieces": {str(i): d for i, d in p.pieces.items()}}
                for k, p in self.partials.items()
            },
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> NodeHoldings:
        h = cls(
            version=int(d["version"]),
            blobs={str(k): int(v) for k, v in dict(d.get("blobs") or {}).items()},
            blob_keys={str(k): str(v) for k, v in dict(d.get("blob_keys") or {}).items()},
            manifests={str(m) for m in d.get("manifests") or []},
            refs={str(k): str(v) for k, v in dict(d.get("refs") or {}).items()},
        )
        for k, p in dict(d.get("partials") or {}).items():
            h.partials[str(k)] = PartialInfo(
                size=int(p["size"]),
                piece_size=int(p["piece_size"]),
                pieces={int(i): str(x) for i, x in dict(p.get("pieces") or {}).items()},
            )
        return h

    def summary(self) -> int:
        return len(self.blobs) + len(self.partials)


class LocalHoldings:
    """This node's holdings, versioned, with a bounded log of deltas."""

    def __init__(self, *, max_log: int = MAX_LOG) -> None:
        self.state = NodeHoldings()
        self._log: deque[tuple[int, list[Any]]] = deque(maxlen=max_log)
        self._unnamed: set[str] = set()  # manifests held back until a shareable ref names them

    @property
    def version(self) -> int:
        return self.state.version

    def record(self, event: StoreEvent) -> int:
        """One change of this node's store; returns the version (unchanged when the change stays
        local)."""
        for announced in self._announced(event):
            self.state.apply(announced)
            self.state.version += 1
            self._log.append((self.state.version, announced))
        return self.state.version

    def _announced(self, event: StoreEvent) -> list[list[Any]]:
        """What of ``event`` peers may see, as ops (none, it, or a held-back manifest and it)."""
        match event:
            case ManifestAdded(digest=d) if d not in self.state.manifests:
                self._unnamed.add(d)
                return []
            case ManifestRemoved(digest=d) if d in self._unnamed:
                self._unnamed.discard(d)
                return []
            case RefChanged(ref=ref) if local_ref(ref):
                return [["ref", ref, None]] if ref in self.state.refs else []
            case RefChanged(digest=d) if d is not None and d in self._unnamed:
                self._unnamed.discard(d)
                return [["manifest+", d], wire_op(event)]
        return [wire_op(event)]

    def since(self, version: int) -> dict[str, Any]:
        """What a peer that has ``version`` needs: a delta if the log reaches back, else all."""
        if version == self.state.version:
            return {"version": self.state.version, "base": version, "deltas": []}
        oldest = self._log[0][0] if self._log else self.state.version + 1
        if 0 < version < self.state.version and version >= oldest - 1:
            return {
                "version": self.state.version,
                "base": version,
                "deltas": [op for v, op in self._log if v > version],
            }
        return {"version": self.state.version, "snapshot": self.state.to_json()}


def wire_op(event: StoreEvent) -> list[Any]:
    """An event as the delta list peers exchange (the format in the module docstring)."""
    match event:
        case BlobAdded(blob_hex=h, size=size, identity_key=key):
            return ["blob+", h, size, key]
        case BlobRemoved(blob_hex=h):
            return ["blob-", h]
        case ManifestAdded(digest=d):
            return ["manifest+", d]
        case ManifestRemoved(digest=d):
            return ["manifest-", d]
        case RefChanged(ref=ref, digest=d):
            return ["ref", ref, d]
        case PartialStarted(key=key, size=size, piece_size=piece_size):
            return ["partial+", key, size, piece_size]
        case PieceVerified(key=key, index=i, digest=d):
            return ["piece", key, i, d.hex()]
        case PartialDropped(key=key):
            return ["partial-", key]
    raise TypeError(f"not a store event: {event!r}")


def local_ref(canonical: str) -> bool:
    """A ref only this node can name (``file://``): never announced."""
    return canonical[:7].lower() == "file://"


class HoldingsView:
    """The latest known holdings of every other node."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeHoldings] = {}

    def version(self, node_id: str) -> int:
        h = self._nodes.get(node_id)
        return h.version if h is not None else 0

    def update(self, node_id: str, answer: Mapping[str, Any]) -> None:
        """Apply an answer of ``LocalHoldings.since``. Raises ValueError if it does not fit."""
        if "snapshot" in answer:
            self._nodes[node_id] = NodeHoldings.from_json(answer["snapshot"])
            return
        cur = self._nodes.get(node_id)
        if cur is None or cur.version != int(answer["base"]):
            raise ValueError(
                f"delta for {node_id} is based on version {answer.get('base')}, we have {self.version(node_id)}"
            )
        for op in answer["deltas"]:
            cur.apply(list(op))
        cur.version = int(answer["version"])

    def forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def get(self, node_id: str) -> NodeHoldings | None:
        return self._nodes.get(node_id)

    def nodes(self) -> Iterable[tuple[str, NodeHoldings]]:
        return self._nodes.items()

    def with_blob(self, blob_hex: str) -> list[str]:
        return sorted(n for n, h in self._nodes.items() if blob_hex in h.blobs)

    def blob_for_key(self, key: str) -> str | None:
        """A complete blob some node made from the origin file with this identity key."""
        for _, h in sorted(self._nodes.items()):
            if key in h.blob_keys and h.blob_keys[key] in h.blobs:
                return h.blob_keys[key]
        return None

    def with_partial(self, key: str) -> list[tuple[str, PartialInfo]]:
        return sorted(((n, h.partials[key]) for n, h in self._nodes.items() if key in h.partials), key=lambda x: x[0])

    def with_ref(self, canonical: str) -> list[tuple[str, str]]:
        return sorted((n, h.refs[canonical]) for n, h in self._nodes.items() if canonical in h.refs)
