"""mDNS discovery: announce this node as ``_cached._tcp.local.`` and find the others on the LAN.

TXT records carry node id, cluster name, peer address and a holdings summary (version, count);
the announcement is refreshed when holdings change (at most once per ``min_update_s``), so LAN
peers learn at once that there is something new, then fetch the detail over gossip. Nodes of
another cluster are ignored. A goodbye is sent on stop. This module only finds addresses; the
membership itself is gossip's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from typing import Callable

from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE = "_cached._tcp.local."


class MdnsDiscovery:
    def __init__(
        self,
        *,
        node_id: str,
        cluster: str,
        address: str,
        on_peer: Callable[[str, str], None],
        summary: Callable[[], tuple[int, int]],
        min_update_s: float = 1.0,
    ) -> None:
        self._node_id = node_id
        self._cluster = cluster
        self._address = address
        self._on_peer = on_peer  # (node_id, HOST:PORT)
        self._summary = summary  # (holdings version, holdings count)
        self._min_update_s = min_update_s
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._announced: tuple[int, int] = (-1, -1)
        self._last_update = 0.0

    def _service_info(self) -> AsyncServiceInfo:
        host, _, port = self._address.rpartition(":")
        version, count = self._summary()
        self._announced = (version, count)
        addresses = []
        with contextlib.suppress(ValueError):
            addresses.append(ipaddress.ip_address(host.strip("[]")).packed)
        return AsyncServiceInfo(
            SERVICE,
            f"{self._node_id}.{SERVICE}",
            addresses=addresses,
            port=int(port),
            properties={"node_id": self._node_id, "cluster": self._cluster, "addr": self._address, "hv": str(version), "hc": str(count)},
            server=f"{self._node_id.replace('.', '-')}.local.",
        )

    async def __aenter__(self) -> "MdnsDiscovery":
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._aiozc = AsyncZeroconf()
        self._info = self._service_info()
        await (await self._aiozc.async_register_service(self._info, allow_name_change=True))
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE, handlers=[self._on_change])
        log.info("mdns announcing service=%s address=%s", self._info.name, self._address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._aiozc is not None:
            with contextlib.suppress(Exception):
                if self._info is not None:
                    await (await self._aiozc.async_unregister_service(self._info))  # goodbye packets
            await self._aiozc.async_close()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            await tg.__aexit__(None, None, None)

    async def refresh(self) -> None:
        """Re-announce if the holdings summary moved (rate-limited)."""
        if self._aiozc is None or self._summary() == self._announced:
            return
        if time.monotonic() - self._last_update < self._min_update_s:
            return
        self._last_update = time.monotonic()
        self._info = self._service_info()
        await (await self._aiozc.async_update_service(self._info))

    def _on_change(self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed or self._tg is None:
            return
        if name == f"{self._node_id}.{SERVICE}":
            return
        self._tg.create_task(self._resolve(service_type, name), name="mdns.resolve")

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._aiozc is not None
        try:
            info = await self._aiozc.async_get_service_info(service_type, name, timeout=3000)
        except Exception as e:  # noqa: BLE001 - one bad answer on the LAN is not our problem
            log.debug("mdns resolve failed name=%s error=%s", name, e)
            return
        if info is None:
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        if props.get("cluster") != self._cluster or props.get("node_id") in (None, self._node_id):
            return  # another cluster on the same LAN, or ourselves
        address = props.get("addr") or ""
        if not address and info.parsed_addresses():
            address = f"{info.parsed_addresses()[0]}:{info.port}"
        if address:
            self._on_peer(props["node_id"], address)

