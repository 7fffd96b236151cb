"""mDNS discovery: announce this node as ``_cached._tcp.local.`` and find the others on the LAN.

TXT records carry node id, cluster name, peer address, a holdings summary (version, count), a
timestamp and a MAC under the cluster key over (node id, cluster, address, timestamp). The
announcement is refreshed when holdings change (at most once per ``min_update_s``) and every
``reannounce_s`` so its timestamp stays fresh; LAN peers learn at once that there is something
new, then fetch the detail over gossip. A goodbye is sent on stop.

Anyone on the LAN can announce anything, so an announcement is handed on (``on_peer``) only when
it is of our cluster, its MAC is valid, its timestamp is within ``window_s`` of our clock, and
its address is the source address of a packet that carried exactly this TXT record. Without the
last rule a token-less host could replay a node's signed TXT from anywhere; without the MAC it
could name any address and have us send gossip there. Everything else is counted by reason
(``on_reject``) and dropped. The address must be an IP literal (the one the node sends from on
this link), which is what nodes on one LAN announce.

This module only finds addresses; the membership itself is gossip's, and proving that the
address still holds the token when we talk to it is the peer client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zeroconf import RecordUpdateListener, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from cached.peers.auth import ClusterKey
from cached.periodic import every

log = logging.getLogger(__name__)

SERVICE = "_cached._tcp.local."
_TYPE_TXT = 16  # zeroconf.const._TYPE_TXT; the constant is private there
_MAX_SOURCES = 512  # (service name, TXT) pairs whose senders we remember; LRU
_MAX_SENDERS_PER_TXT = 8
REFRESH_S = 1.0  # how often the announcement is checked (it is re-sent only when due)
_MAX_RESOLVING = 32  # concurrent resolutions; a flood of service names must not spawn a task each


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    node_id: str
    address: str  # HOST:PORT, as signed


def announcement_mac(key: ClusterKey, node_id: str, cluster: str, address: str, ts: str) -> str:
    return key.sign("mdns", node_id, cluster, address, ts)


def check_announcement(
    props: Mapping[str, str], *, key: ClusterKey, cluster: str, senders: set[str], now: float, window_s: float
) -> Announcement | str:
    """The announcement if it may be used, else the reason to drop it (``metrics.MDNS_REJECT_REASONS``).
    ``senders`` are the source addresses of the packets that carried this exact TXT record."""
    if props.get("cluster") != cluster:
        return "other_cluster"
    if not props.get("mac"):
        return "unsigned"  # a host without the token, or a node from before announcements were signed
    node_id, address, ts = props.get("node_id") or "", props.get("addr") or "", props.get("ts") or ""
    if not node_id or not address or not ts:
        return "malformed"
    if not key.verify(props.get("mac"), "mdns", node_id, cluster, address, ts):
        return "bad_mac"
    try:
        stamp = int(ts)
    except ValueError:
        return "malformed"  # signed by a token holder, yet not a number: a bug, not an attack
    if abs(now - stamp) > window_s:
        return "stale"
    host = _ip(address.rpartition(":")[0])
    if host is None or host not in {_ip(s) for s in senders}:
        return "source_mismatch"
    return Announcement(node_id=node_id, address=address)


def reannounce_due(*, since_s: float, moved: bool, min_update_s: float, reannounce_s: float) -> bool:
    """Holdings news goes out at once (rate-limited); otherwise often enough that the timestamp
    never leaves the receivers' window."""
    return since_s >= reannounce_s or (moved and since_s >= min_update_s)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address without brackets or zone, or None if ``text`` is not an IP literal."""
    try:
        return ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None


class TxtSenders(RecordUpdateListener):
    """Remembers which source addresses sent each TXT record of our service type.

    zeroconf gives record listeners the records but not the packet. It calls them synchronously
    while its listener handles one datagram, after setting that listener's ``last_message``
    (whose ``source`` is the sender); the records we get are the very objects parsed from that
    message, so an identity match finds the packet they came in.
    """

    def __init__(self) -> None:
        self._senders: OrderedDict[tuple[str, bytes], set[str]] = OrderedDict()
        self.unknown = 0  # TXT records whose packet we could not find (a zeroconf change?)

    def senders(self, name: str, text: bytes) -> set[str]:
        return set(self._senders.get((name.lower(), text), ()))

    def async_update_records(self, zc: Any, now: float, records: list[Any]) -> None:
        for update in records:
            record = update.new
            if record.type != _TYPE_TXT or not record.name.lower().endswith("." + SERVICE.lower()):
                continue
            source = _packet_source(zc, record)
            if source is None:
                self.unknown += 1
                continue
            key = (record.name.lower(), bytes(record.text))
            seen = self._senders.setdefault(key, set())
            if source not in seen and len(seen) >= _MAX_SENDERS_PER_TXT:
                seen.pop()  # a TXT replayed from many hosts must not grow without bound
            seen.add(source)
            self._senders.move_to_end(key)
            while len(self._senders) > _MAX_SOURCES:
                self._senders.popitem(last=False)


def _packet_source(zc: Any, record: object) -> str | None:
    for protocol in getattr(getattr(zc, "engine", None), "protocols", ()):
        msg = getattr(protocol, "last_message", None)
        if msg is not None and msg.source and any(r is record for r in msg.answers()):
            return str(msg.source[0])
    return None


class MdnsDiscovery:
    def __init__(
        self,
        *,
        node_id: str,
        cluster: str,
        address: str,
        key: ClusterKey,
        on_peer: Callable[[str, str], None],
        summary: Callable[[], tuple[int, int]],
        on_reject: Callable[[str], None] = lambda reason: None,
        min_update_s: float = 1.0,
        reannounce_s: float = 60.0,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._node_id = node_id
        self._cluster = cluster
        self._address = address
        self._key = key
        self._on_peer = on_peer  # (node_id, HOST:PORT)
        self._on_reject = on_reject  # (reason)
        self._summary = summary  # (holdings version, holdings count)
        self._min_update_s = min_update_s
        self._reannounce_s = reannounce_s
        self._window_s = window_s
        self._clock = clock
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._txt_senders = TxtSenders()
        self._resolving: set[str] = set()
        self._logged: set[tuple[str, str]] = set()
        self._announced: tuple[int, int] = (-1, -1)
        self._last_update = 0.0

    def _service_info(self) -> AsyncServiceInfo:
        host, _, port = self._address.rpartition(":")
        version, count = self._summary()
        self._announced = (version, count)
        addresses = []
        with contextlib.suppress(ValueError):
            addresses.append(ipaddress.ip_address(host.strip("[]")).packed)
        ts = str(int(self._clock()))
        mac = announcement_mac(self._key, self._node_id, self._cluster, self._address, ts)
        return AsyncServiceInfo(
            SERVICE,
            f"{self._node_id}.{SERVICE}",
            addresses=addresses,
            port=int(port),
            properties={
                "node_id": self._node_id,
                "cluster": self._cluster,
                "addr": self._address,
                "hv": str(version),
                "hc": str(count),
                "ts": ts,
                "mac": mac,
            },
            server=f"{self._node_id.replace('.', '-')}.local.",
        )

    async def __aenter__(self) -> MdnsDiscovery:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._aiozc = AsyncZeroconf()
        # Before the browser, so the senders of the first answers are already recorded.
        self._aiozc.zeroconf.async_add_listener(self._txt_senders, None)
        self._info = self._service_info()
        self._last_update = time.monotonic()
        await (await self._aiozc.async_register_service(self._info, allow_name_change=True))
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE, handlers=[self._on_change])
        log.info("mdns announcing service=%s address=%s", self._info.name, self._address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._aiozc is not None:
            self._aiozc.zeroconf.async_remove_listener(self._txt_senders)
            with contextlib.suppress(Exception):
                if self._info is not None:
                    await (await self._aiozc.async_unregister_service(self._info))  # goodbye packets
            await self._aiozc.async_close()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            await tg.__aexit__(None, None, None)

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep the announcement current until ``stopping`` (the goodbye is ``__aexit__``'s)."""
        await every(REFRESH_S, stopping, self._refresh_quietly)

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as e:  # noqa: BLE001 - one failed re-announcement; the next tick retries
            log.debug("mdns refresh failed error=%s", e)

    async def refresh(self) -> None:
        """Re-announce if the holdings summary moved (rate-limited) or the timestamp ages."""
        if self._aiozc is None:
            return
        since = time.monotonic() - self._last_update
        if not reannounce_due(
            since_s=since,
            moved=self._summary() != self._announced,
            min_update_s=self._min_update_s,
            reannounce_s=self._reannounce_s,
        ):
            return
        self._last_update = time.monotonic()
        self._info = self._service_info()
        await (await self._aiozc.async_update_service(self._info))

    def _on_change(self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed or self._tg is None:
            return
        if name == f"{self._node_id}.{SERVICE}" or name in self._resolving:
            return
        if len(self._resolving) >= _MAX_RESOLVING:
            self._reject(name, "busy")
            return
        self._resolving.add(name)
        self._tg.create_task(self._resolve(service_type, name), name="mdns.resolve")

    async def _resolve(self, service_type: str, name: str) -> None:
        try:
            await self._resolve_one(service_type, name)
        finally:
            self._resolving.discard(name)

    async def _resolve_one(self, service_type: str, name: str) -> None:
        assert self._aiozc is not None
        try:
            info = await self._aiozc.async_get_service_info(service_type, name, timeout=3000)
        except Exception as e:  # noqa: BLE001 - one bad answer on the LAN is not our problem
            log.debug("mdns resolve failed name=%s error=%s", name, e)
            return
        if info is None:
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        if props.get("node_id") == self._node_id:
            return  # ourselves, heard back through another interface
        verdict = check_announcement(
            props,
            key=self._key,
            cluster=self._cluster,
            senders=self._txt_senders.senders(name, info.text or b""),
            now=self._clock(),
            window_s=self._window_s,
        )
        if isinstance(verdict, str):
            self._reject(name, verdict)
            return
        self._on_peer(verdict.node_id, verdict.address)

    def _reject(self, name: str, reason: str) -> None:
        self._on_reject(reason)
        if (name, reason) not in self._logged and len(self._logged) < 256:  # once per name, bounded
            self._logged.add((name, reason))
            log.warning(
                "mdns announcement ignored name=%s reason=%s unknown_senders=%d",
                name,
                reason,
                self._txt_senders.unknown,
            )
