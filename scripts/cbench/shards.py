"""The ``shards`` scenario: the same bytes as one file and as ``--shards`` files (default 16) of one
model, through the same origin in the same run: the project's Hub double (``_hub``) serves
``hf://bench/one`` and ``hf://bench/sharded``; cached fetches each on every node at once, and
libtorrent swarms a one-file and a multi-file torrent of the same bytes."""

from __future__ import annotations

import asyncio

from cbench.bench import Bench, prepare_shards
from cbench.cluster import cluster
from cbench.common import HUB_PORT, ORIGIN_IP, ORIGIN_NS, log
from cbench.measure import MethodResult
from cbench.method_cached import run_cached
from cbench.method_torrent import run_torrent
from cbench.role_hub import ONE_REPO, SHARDED_REPO
from cbench.swarm import timed


async def run_shards(bench: Bench) -> list[MethodResult]:
    a = bench.args
    out: list[MethodResult] = []
    async with cluster(bench) as c:
        content, torrent = await asyncio.to_thread(prepare_shards, bench.work, c.model, a.shards)
        stats = bench.work / "hub-stats.json"
        stats.unlink(missing_ok=True)
        hub = await bench.spawn_role(
            "hub",
            ORIGIN_NS,
            "_hub",
            str(c.model.path),
            "--shards",
            str(a.shards),
            "--bind",
            ORIGIN_IP,
            "--port",
            str(HUB_PORT),
            "--stats",
            str(stats),
        )
        await bench.procs.expect(hub, "ready", 300)
        log(f"hub: {ONE_REPO} (1 file) and {SHARDED_REPO} ({a.shards} files) at http://{ORIGIN_IP}:{HUB_PORT}")
        one, many = "cached (1 file)", f"cached ({a.shards} shards)"
        t_one, t_many = "torrent (1 file)", f"torrent ({a.shards} files)"
        for method in a.methods:
            if method == "cached":
                out.append(
                    await timed(bench, one, lambda: run_cached(bench, c.model, stats, one, ref=f"hf://{ONE_REPO}"))
                )
                out.append(
                    await timed(
                        bench, many, lambda: run_cached(bench, c.model, stats, many, ref=f"hf://{SHARDED_REPO}")
                    )
                )
            elif method == "torrent":
                out.append(await timed(bench, t_one, lambda: run_torrent(bench, c.model, t_one)))
                if torrent is None:
                    out.append(MethodResult(t_many, skipped="libtorrent not importable"))
                else:
                    out.append(
                        await timed(bench, t_many, lambda: run_torrent(bench, c.model, t_many, torrent, content))
                    )
            else:
                log(f"shards: method {method} does not apply (cached and torrent only)")
        await bench.procs.stop([hub])
    return out
