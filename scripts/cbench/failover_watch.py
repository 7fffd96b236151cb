"""What the failover scenario watches, each bounded in time: ready copies in ``/v1/locate``, the
job events of ``/v1/events`` on every survivor, the survivors' ``/v1/peers`` views of the victim,
and the daemons' own log lines (read back from their log files)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

from cbench.common import FAILOVER_POLL_S


async def wait_ready_copies(s: Any, ref: str, want: int, budget: float) -> list[str]:
    """Poll ``GET /v1/locate`` (every 0.5 s, bounded) until ``want`` nodes hold a ready copy."""
    import aiohttp

    nodes: list[dict[str, Any]] = []
    for _ in range(int(budget / 0.5) + 1):
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            async with s.get("http://node/v1/locate", params={"ref": ref}, timeout=aiohttp.ClientTimeout(total=5)) as r:
                nodes = (await r.json()).get("nodes", [])
        ready = sorted(n["node_id"] for n in nodes if n.get("state") == "ready")
        if len(ready) >= want:
            return ready
        await asyncio.sleep(0.5)
    raise TimeoutError(f"fewer than {want} ready copies after {budget:.0f}s: {nodes}")


async def follow_events(
    s: Any,
    node: str,
    ref: str,
    out: list[dict[str, Any]],
    opened: asyncio.Event,
    done: asyncio.Event,
    holders: set[str],
) -> None:
    """``GET /v1/events?ref=`` on one node: every job event (with the daemon's wall-clock time).
    Ends when the caller cancels it (the caller bounds it in time)."""
    async with s.get("http://node/v1/events", params={"ref": ref}) as resp:
        async for raw in resp.content:
            line = raw.strip()
            if not line:
                continue
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                ev["node"], ev["t_recv"] = node, time.time()
                out.append(ev)
                if ev.get("event") == "snapshot":
                    opened.set()
                if node not in holders and ev.get("event") in ("ready", "failed"):
                    done.set()


async def watch_peers(
    sessions: dict[str, Any], victim: str, t0_wall: float, until: float, out: dict[str, dict[str, float]]
) -> None:
    """Poll every survivor's ``GET /v1/peers`` every FAILOVER_POLL_S (bounded by ``until``, a
    monotonic time): when it first shows the victim suspect, dead (seconds after the kill)."""
    for _ in range(int(max(0.0, until - time.monotonic()) / FAILOVER_POLL_S) + 1):
        await asyncio.gather(*(_view(n, s, victim, t0_wall, out) for n, s in sessions.items()))
        if all("dead" in out.get(n, {}) for n in sessions) or time.monotonic() > until:
            return
        await asyncio.sleep(FAILOVER_POLL_S)


async def _view(node: str, s: Any, victim: str, t0_wall: float, out: dict[str, dict[str, float]]) -> None:
    import aiohttp

    try:
        async with s.get("http://node/v1/peers", timeout=aiohttp.ClientTimeout(total=2)) as r:
            peers = await r.json()
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return
    t = time.time() - t0_wall
    state = next((p["state"] for p in peers if p["node_id"] == victim), "absent")
    out.setdefault(node, {}).setdefault(state, round(t, 3))


def log_events(path: Path, since_wall: float) -> list[tuple[float, str]]:
    """(wall time, message) of a daemon's log lines (text format: ``asctime LEVEL logger: msg``)
    from ``since_wall`` on; asctime has millisecond resolution."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (.*)", line)
            if not m:
                continue
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            if t >= since_wall - 0.001:
                out.append((t, m.group(3)))
    return out


async def get_json(s: Any, path: str, ref: str, timeout: float) -> Any:
    """``GET path?ref=`` on one daemon's API; None when it does not answer with JSON in time."""
    import aiohttp

    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        async with s.get(
            f"http://node{path}", params={"ref": ref}, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return await resp.json()
    return None
