"""The cluster every scenario runs in: logs and an empty cwd under WORKDIR, the model file, the
namespaces and links, and the origin server. Entered once per run; the teardown of the network is
``__main__``'s (it runs on every exit path, this context only stops the origin on success)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cbench.bench import Bench, Model, prepare_model
from cbench.common import fmt_size, log
from cbench.netns import setup_network


@dataclass(frozen=True)
class Cluster:
    model: Model
    stats_file: Path  # the origin server's counters (bytes, gets, heads)


@asynccontextmanager
async def cluster(bench: Bench) -> AsyncIterator[Cluster]:
    a = bench.args
    shutil.rmtree(bench.work / "logs", ignore_errors=True)
    (bench.work / "logs").mkdir(parents=True, exist_ok=True)
    (bench.work / "cwd").mkdir(parents=True, exist_ok=True)
    model = await asyncio.to_thread(prepare_model, bench.work, a.size)
    log(f"model {fmt_size(a.size)} blake3={model.digest[:16]}..")
    zones = getattr(a, "zones", 1)
    log(
        f"network: origin {a.origin_rate / 1e6:.0f} Mbit/s, {a.nodes} nodes at {a.node_rate / 1e6:.0f} Mbit/s"
        + (f", {zones} zones joined at {a.zone_link_rate / 1e6:.0f} Mbit/s" if zones > 1 else "")
    )
    await asyncio.to_thread(setup_network, a.nodes, a.origin_rate, a.node_rate, zones, a.zone_link_rate)
    stats_file = bench.work / "origin-stats.json"
    origin = await bench.start_origin(model, stats_file)
    yield Cluster(model, stats_file)
    await bench.procs.stop([origin])


async def sync_disks() -> None:
    """Earlier writes off the page cache before a timed step."""
    await asyncio.to_thread(subprocess.run, ["sync"], timeout=120)
