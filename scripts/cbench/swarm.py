"""The ``swarm`` scenario: every node wants the model at once; the methods (cached, its variants,
torrent, direct) run one after the other in the same cluster, each from a common start."""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

from cbench.bench import Bench
from cbench.cluster import Cluster, cluster, sync_disks
from cbench.common import fmt_size, log
from cbench.measure import MethodResult
from cbench.method_cached import run_cached
from cbench.method_direct import run_direct
from cbench.method_torrent import run_torrent


async def run_swarm(bench: Bench) -> list[MethodResult]:
    async with cluster(bench) as c:
        return [await run_one(bench, c, name) for name in bench.args.methods]


async def run_one(bench: Bench, c: Cluster, name: str) -> MethodResult:
    return await timed(bench, name, lambda: run_method(bench, c, name))


async def timed(bench: Bench, name: str, method: Callable[[], Awaitable[MethodResult]]) -> MethodResult:
    """One method from a common start (disks synced first): its result with ``all_done_s`` set
    when every node finished, a failure turned into a result that says why, and a log line."""
    a = bench.args
    if name.startswith("torrent") and a.skip_torrent:
        return MethodResult(name, skipped="--skip-torrent")
    await sync_disks()
    log(f"--- {name}: {a.nodes} nodes fetch {fmt_size(a.size)} at once")
    t = time.monotonic()
    try:
        r = await method()
    except (RuntimeError, TimeoutError, OSError) as e:
        r = MethodResult(name, notes=[f"failed: {e}"])
        log(f"{name}: FAILED: {e}")
    done = [s for s in r.node_s if s is not None]
    if done and len(done) == a.nodes:
        r.all_done_s = max(done)
    log(f"{name}: {'skipped: ' + r.skipped if r.skipped else summary_line(r, a)} (took {time.monotonic() - t:.0f}s)")
    return r


async def run_method(bench: Bench, c: Cluster, name: str) -> MethodResult:
    if name == "direct":
        return await run_direct(bench, c.model, c.stats_file)
    if name == "torrent":
        return await run_torrent(bench, c.model)
    if name == "cached":
        return await run_cached(bench, c.model, c.stats_file)
    label = name[len("cached:") :]
    return await run_cached(bench, c.model, c.stats_file, name=f"cached ({label})", variant=bench.args.variants[label])


def summary_line(r: MethodResult, a: argparse.Namespace) -> str:
    t = f"{r.all_done_s:.1f}s" if r.all_done_s is not None else "not all nodes done"
    return (
        f"all done {t}, origin sent {fmt_size(r.origin_payload)} payload ({r.origin_payload / a.size:.3f}x), ok={r.ok}"
    )
