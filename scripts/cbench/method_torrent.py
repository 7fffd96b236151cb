"""The swarm's ``torrent`` method: the origin seeds with libtorrent (``_seed``), every node leeches
(``_leech``) from the origin and from each other, trackerless. Skipped when libtorrent is not
importable here."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

from cbench.bench import Bench, Model, model_matches
from cbench.common import MODEL_NAME, ORIGIN_IP, ORIGIN_NS, node_ip, node_ns
from cbench.measure import MethodResult, measuring, record_done
from cbench.processes import Child
from cbench.role_torrent import piece_length


async def run_torrent(
    bench: Bench, model: Model, name: str = "torrent", torrent: Path | None = None, content: Path | None = None
) -> MethodResult:
    """The swarm of ``torrent`` (default: the model file's) whose content is ``content`` (default:
    the model file; a directory for a multi-file torrent), seeded from ``content``'s directory."""
    res = MethodResult(name)
    torrent = torrent or model.torrent
    content = content or model.path
    try:
        import libtorrent  # noqa: F401
    except ImportError as e:
        res.skipped = f"libtorrent not importable in {sys.executable}: {e}"
        return res
    stats = bench.work / "seed-stats.json"
    stats.unlink(missing_ok=True)
    seed = await bench.spawn_role(
        "seed",
        ORIGIN_NS,
        "_seed",
        "--torrent",
        str(torrent),
        "--save",
        str(content.parent),
        "--bind",
        ORIGIN_IP,
        "--stats",
        str(stats),
        "--max-seconds",
        str(int(bench.remaining())),
        stdin=True,
    )
    await bench.procs.expect(seed, "ready", 60)
    kids = await start_leechers(bench, torrent)
    await asyncio.sleep(1.0)  # listeners up everywhere
    before = json.loads(stats.read_text())["bytes"] if stats.exists() else 0
    async with measuring(res, bench.args.timeout):
        res.extra["t_go"] = t_go = time.monotonic()
        await bench.procs.go(kids)
        budget = bench.method_budget("torrent")
        res.extra["budget_s"] = round(budget, 1)
        msgs = await asyncio.gather(*(bench.procs.expect(k, "done", budget) for k in kids), return_exceptions=True)
    await asyncio.sleep(0.6)  # the seed writes its counters every 0.2 s
    res.origin_payload = json.loads(stats.read_text())["bytes"] - before
    res.extra["piece_size"] = piece_length(torrent)
    record_done(res, msgs, t_go)
    await bench.procs.stop(kids + [seed])
    res.ok = all(s is not None for s in res.node_s)
    check_files(bench, model, res, content.name)
    shutil.rmtree(bench.work / "torrent", ignore_errors=True)
    return res


async def start_leechers(bench: Bench, torrent: Path) -> list[Child]:
    n = bench.args.nodes
    kids = []
    for i in range(1, n + 1):
        peers = [ORIGIN_IP] + [node_ip(j) for j in range(1, n + 1) if j != i]
        save = bench.work / "torrent" / f"n{i}"
        save.mkdir(parents=True, exist_ok=True)
        kids.append(
            await bench.spawn_role(
                f"leech-n{i}",
                node_ns(i),
                "_leech",
                "--torrent",
                str(torrent),
                "--save",
                str(save),
                "--bind",
                node_ip(i),
                "--peers",
                ",".join(peers),
                "--max-seconds",
                str(int(bench.remaining())),
                stdin=True,
            )
        )
    for k in kids:
        await bench.procs.expect(k, "ready", 60)
    return kids


def check_files(bench: Bench, model: Model, res: MethodResult, content: str = MODEL_NAME) -> None:
    """libtorrent checked every piece; check the whole files as well (not timed)."""
    for i in range(1, bench.args.nodes + 1):
        f = bench.work / "torrent" / f"n{i}" / content
        if not f.exists() or not model_matches(f, model):
            res.ok = False
            res.notes.append(f"torrent n{i}: file missing or wrong after completion")
