"""Claims that keep a model from eviction: operators' pins and launchers' leases.

Both are files under ``<cache_dir>/claims`` so they survive a daemon restart: a launcher that is
still running when the daemon is restarted keeps its model. A lease ends on release or when its
TTL passes (the clock is injected). This module decides nothing about eviction itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cached.errors import NotFoundError, RequestError
from cached.store import durable
from cached.types import ModelRef

log = logging.getLogger(__name__)

MAX_LEASE_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    lease_id: str
    ref: str
    holder: str
    expires_at: float
    manifest: str = ""  # the exact revision leased: it stays on disk even if the ref moves on

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "lease_id": self.lease_id,
            "ref": self.ref,
            "holder": self.holder,
            "expires_at": self.expires_at,
        }
        if self.manifest:
            out["manifest"] = f"blake3:{self.manifest}"
        return out


class Claims:
    def __init__(self, root: Path, *, clock: Callable[[], float]) -> None:
        self._pins_dir = root / "pins"
        self._leases_dir = root / "leases"
        self._clock = clock
        self._pins: set[str] = set()
        self._leases: dict[str, Lease] = {}
        self.skipped = 0  # unreadable claim files dropped by load_sync

    def load_sync(self) -> None:
        durable.make_dirs(self._pins_dir)
        durable.make_dirs(self._leases_dir)
        for p in self._pins_dir.iterdir():
            try:
                self._pins.add(ModelRef.parse(p.read_text().strip()).canonical)
            except Exception:  # noqa: BLE001 - a damaged claim file must not stop the daemon
                log.warning("dropping unreadable pin file=%s", p)
                self.skipped += 1
                p.unlink(missing_ok=True)
        for p in self._leases_dir.glob("*.json"):
            try:
                d = json.loads(p.read_text())
                lease = Lease(
                    lease_id=d["lease_id"],
                    ref=d["ref"],
                    holder=d["holder"],
                    expires_at=float(d["expires_at"]),
                    manifest=str(d.get("manifest", "")).removeprefix("blake3:"),
                )
                self._leases[lease.lease_id] = lease
            except Exception:  # noqa: BLE001
                log.warning("dropping unreadable lease file=%s", p)
                self.skipped += 1
                p.unlink(missing_ok=True)

    # --- pins ----------------------------------------------------------------------------------

    def is_pinned(self, ref: str) -> bool:
        return ref in self._pins

    async def pin(self, ref: ModelRef) -> None:
        await asyncio.to_thread(durable.atomic_write, self._pins_dir / ref.escaped, ref.canonical.encode())
        self._pins.add(ref.canonical)

    async def unpin(self, ref: ModelRef) -> None:
        self._pins.discard(ref.canonical)
        await asyncio.to_thread((self._pins_dir / ref.escaped).unlink, True)

    # --- leases --------------------------------------------------------------------------------

    def leases_for(self, ref: str) -> list[Lease]:
        now = self._clock()
        return [lease for lease in self._leases.values() if lease.ref == ref and lease.expires_at > now]

    def active_leases(self) -> list[Lease]:
        now = self._clock()
        return [lease for lease in self._leases.values() if lease.expires_at > now]

    async def take_lease(self, ref: ModelRef, holder: str, ttl_s: float, *, manifest: str = "") -> Lease:
        if not 1 <= ttl_s <= MAX_LEASE_TTL_S:
            raise RequestError(f"ttl_s must be between 1 and {MAX_LEASE_TTL_S} seconds, got {ttl_s}")
        lease = Lease(
            lease_id=secrets.token_hex(8),
            ref=ref.canonical,
            holder=holder,
            expires_at=self._clock() + ttl_s,
            manifest=manifest,
        )
        await asyncio.to_thread(
            durable.atomic_write, self._leases_dir / f"{lease.lease_id}.json", json.dumps(lease.to_json()).encode()
        )
        self._leases[lease.lease_id] = lease
        return lease

    async def renew(self, lease_id: str, ttl_s: float) -> Lease:
        """Move a live lease's expiry to ``ttl_s`` from now (a launcher's heartbeat). A lease that
        was released or has expired is gone: the holder must take a new one."""
        if not 1 <= ttl_s <= MAX_LEASE_TTL_S:
            raise RequestError(f"ttl_s must be between 1 and {MAX_LEASE_TTL_S} seconds, got {ttl_s}")
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires_at <= self._clock():
            raise NotFoundError(f"no lease {lease_id!r} (released or expired)")
        renewed = replace(lease, expires_at=self._clock() + ttl_s)
        path = self._leases_dir / f"{lease_id}.json"
        await asyncio.to_thread(durable.atomic_write, path, json.dumps(renewed.to_json()).encode())
        if lease_id not in self._leases:
            # Released while the file was being written: do not bring it back.
            await asyncio.to_thread(path.unlink, True)
            raise NotFoundError(f"no lease {lease_id!r} (released)")
        self._leases[lease_id] = renewed
        return renewed

    async def release(self, lease_id: str) -> Lease:
        lease = self._leases.pop(lease_id, None)
        if lease is None or not lease_id.isalnum():
            raise NotFoundError(f"no lease {lease_id!r}")
        await asyncio.to_thread((self._leases_dir / f"{lease_id}.json").unlink, True)
        return lease

    async def expire(self) -> list[Lease]:
        now = self._clock()
        gone = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in gone:
            del self._leases[lease.lease_id]
            await asyncio.to_thread((self._leases_dir / f"{lease.lease_id}.json").unlink, True)
        return gone
