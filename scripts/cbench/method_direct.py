"""The swarm's ``direct`` method: every node runs ``curl`` against the origin at once (the
``_direct`` role), then BLAKE3-checks its file. The baseline without any sharing."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from cbench.bench import Bench, Model, origin_stats
from cbench.common import MODEL_NAME, MODEL_URL, node_ns
from cbench.measure import MethodResult, measuring


async def run_direct(bench: Bench, model: Model, stats_file: Path) -> MethodResult:
    res = MethodResult("direct")
    kids = []
    for i in range(1, bench.args.nodes + 1):
        out = bench.work / "direct" / f"n{i}" / MODEL_NAME
        kids.append(
            await bench.spawn_role(
                f"direct-n{i}",
                node_ns(i),
                "_direct",
                "--url",
                MODEL_URL,
                "--out",
                str(out),
                "--expect",
                model.digest,
                "--max-seconds",
                str(int(bench.remaining())),
                stdin=True,
            )
        )
    for k in kids:
        await bench.procs.expect(k, "ready", 60)
    before = await origin_stats(stats_file)
    async with measuring(res, bench.args.timeout):
        res.extra["t_go"] = t_go = time.monotonic()
        await bench.procs.go(kids)
        budget = bench.method_budget("direct")
        res.extra["budget_s"] = round(budget, 1)
        msgs = await asyncio.gather(*(bench.procs.expect(k, "done", budget) for k in kids), return_exceptions=True)
    after = await origin_stats(stats_file)
    res.origin_payload = after["bytes"] - before["bytes"]
    oks = []
    for m in msgs:
        if isinstance(m, BaseException):
            res.node_s.append(None)
            res.notes.append(str(m))
            oks.append(False)
        else:
            res.node_s.append(m["t_done"] - t_go)
            oks.append(bool(m["ok"]))
            if not m["ok"]:
                res.notes.append(f"direct: {m.get('err') or 'hash mismatch'}")
    res.ok = all(oks)
    await bench.procs.stop(kids)
    shutil.rmtree(bench.work / "direct", ignore_errors=True)
    return res
