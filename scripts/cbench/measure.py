"""What one swarm method measured (``MethodResult``, written to results.json as it is) and the
sampler of the switch-side link counters that gives the origin's wire bytes over time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cbench.common import SAMPLE_S
from cbench.netns import Counters, switch_counters

Samples = list[tuple[float, Counters]]  # (monotonic time, switch counters)


@dataclass
class MethodResult:
    name: str
    ok: bool = False
    skipped: str = ""
    node_s: list[float | None] = field(default_factory=list)  # per node, seconds from go
    all_done_s: float | None = None
    origin_payload: int = 0
    origin_wire: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s from go, origin wire bytes)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


async def sampler(out: Samples, stop: asyncio.Event, timeout: float) -> None:
    """Append the counters every SAMPLE_S until ``stop`` (and once more then), at most ``timeout``."""
    for _ in range(int(timeout / SAMPLE_S) + 1):  # bounded in count, like every loop here
        out.append((time.monotonic(), await asyncio.to_thread(switch_counters)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_S)
        if stop.is_set():
            out.append((time.monotonic(), await asyncio.to_thread(switch_counters)))
            return


@contextlib.asynccontextmanager
async def measuring(res: MethodResult, timeout: float) -> AsyncIterator[None]:
    """Sample the origin link around the body; fill ``res.samples`` (from ``res.extra['t_go']``)
    and ``res.origin_wire``."""
    samples: Samples = []
    stop = asyncio.Event()
    task = asyncio.create_task(sampler(samples, stop, timeout))
    await asyncio.sleep(SAMPLE_S * 1.5)  # a baseline sample before go
    try:
        yield
    finally:
        stop.set()
        await task
        t0 = res.extra.get("t_go", samples[0][0] if samples else 0.0)
        base = samples[0][1].get("s-origin", (0, 0))[0] if samples else 0
        res.samples = [(t - t0, c.get("s-origin", (0, 0))[0] - base) for t, c in samples]
        if samples and "s-zone-a" in samples[0][1]:
            # The zone link's egress towards zone b (tx of its zone-a end): what crossed into b.
            zb = samples[0][1]["s-zone-a"][1]
            res.extra["into_zone_b"] = [(t - t0, c.get("s-zone-a", (0, 0))[1] - zb) for t, c in samples]
        if samples:
            res.origin_wire = res.samples[-1][1]
            first, last = samples[0][1], samples[-1][1]
            # Every switch-side link's (rx, tx) bytes over the method: the zone link's tx is what
            # crossed it, in each direction.
            res.extra["links"] = {
                dev: (rx - first.get(dev, (0, 0))[0], tx - first.get(dev, (0, 0))[1]) for dev, (rx, tx) in last.items()
            }


def record_done(res: MethodResult, msgs: list[Any], t_go: float) -> None:
    """Per-node times from the roles' ``done`` lines (an exception: that node did not finish)."""
    for m in msgs:
        if isinstance(m, BaseException):
            res.node_s.append(None)
            res.notes.append(str(m))
        else:
            res.node_s.append(m["t_done"] - t_go)
