"""The service manager's side channel: sd_notify datagrams and the watchdog ping.

Written without libsystemd: ``notify`` sends one datagram to ``$NOTIFY_SOCKET`` and is a no-op
when it is unset (tests, a shell). ``Watchdog.run`` pings from the event loop itself, so a stuck
loop stops the pings and systemd restarts the service. Nothing here reads the environment at
import time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from cached.periodic import every

log = logging.getLogger(__name__)


def notify(*lines: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (no-op when unset)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
    except OSError as e:
        log.warning("sd_notify failed socket=%s error=%s", addr, e)


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of $WATCHDOG_USEC when the watchdog is meant for this process, else None."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


class Watchdog:
    """Pings systemd's watchdog every ``interval_s`` (half its timeout) while the loop runs."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self._interval_s, stopping, lambda: notify("WATCHDOG=1"), now=True)
