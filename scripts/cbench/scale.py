"""The ``scale`` scenario: the swarm (cached and libtorrent, or ``--methods``) at every node count
of ``--curve`` (default 4,8,16), one cluster built and torn down per point, in one run, so the
curve's points share the machine's state and the code. Rates are the run's (``--node-rate``,
``--origin-rate``): scaled down so the CPU is not what bounds the time."""

from __future__ import annotations

import asyncio

from cbench.bench import Bench
from cbench.common import log
from cbench.measure import MethodResult
from cbench.netns import teardown_network
from cbench.swarm import run_swarm

Point = tuple[int, list[MethodResult]]


async def run_scale(bench: Bench) -> list[Point]:
    points: list[Point] = []
    for n in bench.args.curve:
        bench.args.nodes = n
        await asyncio.to_thread(teardown_network, True)  # the previous point's namespaces
        log(f"=== scale: {n} nodes")
        points.append((n, await run_swarm(bench)))
    return points
