"""The swarm's ``cached`` method (and each ``--cached-variant``): one daemon per node, all nodes
``POST /v1/prefetch {"wait": true}`` at once; done = the daemon answered ``ready``. The files are
BLAKE3-checked again afterwards, untimed."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from cbench.bench import Bench, Model, model_matches, origin_stats
from cbench.common import MODEL_URL, log
from cbench.daemons import await_membership, launch_cached, write_cluster_files
from cbench.measure import MethodResult, measuring


async def run_cached(
    bench: Bench,
    model: Model,
    stats_file: Path,
    name: str = "cached",
    variant: dict[str, Any] | None = None,
    ref: str = MODEL_URL,
) -> MethodResult:
    """Every node prefetches ``ref`` at once (the origin server's file by default; the shards
    scenario passes its hub's ``hf://`` refs) and counts the origin bytes from ``stats_file``."""
    a = bench.args
    v = variant or {}
    pythonpath = v.get("path", "")
    piece_size = v.get("piece_size", a.piece_size)
    stall_timeout = v.get("stall_timeout", a.stall_timeout)
    res = MethodResult(name)
    if pythonpath:
        res.extra["pythonpath"] = pythonpath
        res.notes.append(f"daemons ran the cached package from {pythonpath}, not from this checkout")
    # --gossip-interval 0: the daemon's own default (the key is left out of the config).
    peer: dict[str, Any] = {"gossip_interval_s": a.gossip_interval} if a.gossip_interval else {}
    if stall_timeout:
        peer["stall_timeout_s"] = stall_timeout  # a key only newer daemons know: set only when asked
    files = write_cluster_files(
        bench.work / "nodes-cached", peer, v.get("connections", a.origin_connections), getattr(a, "zones", 1)
    )
    res.extra["config"] = files.conf.read_text() + f"# --piece-size {piece_size}\n"
    res.extra["piece_size"] = piece_size
    kids, socks = await launch_cached(bench, files, piece_size, name, pythonpath)
    sessions: list[Any] = []
    try:
        sessions, converge_s = await await_membership(bench, kids, socks)
        res.extra["converge_s"] = round(converge_s, 2)
        log(f"cached: {a.nodes} daemons up, membership converged in {res.extra['converge_s']}s")
        await asyncio.sleep(1.0)
        answers = await prefetch_everywhere(bench, sessions, stats_file, res, ref)
        check_answers(res, answers, model, name)
    finally:
        for s in sessions:
            await s.close()
        await bench.procs.stop(kids, grace_s=10.0)
        if not a.keep:
            shutil.rmtree(files.base, ignore_errors=True)
    return res


async def prefetch(bench: Bench, s: Any, ref: str) -> dict[str, Any]:
    async with s.post(
        "http://node/v1/prefetch", json={"ref": ref, "wait": True, "timeout_s": int(bench.remaining())}
    ) as r:
        body = await r.json()
    body["_t_done"] = time.monotonic()
    body["_status"] = r.status
    return body


async def prefetch_everywhere(
    bench: Bench, sessions: list[Any], stats_file: Path, res: MethodResult, ref: str = MODEL_URL
) -> list[Any]:
    """The common start: every node's prefetch at once, until all answer or the budget ends.
    Returns each node's answer, or an exception saying why it has none."""
    before = await origin_stats(stats_file)
    budget = bench.method_budget("cached")
    res.extra["budget_s"] = round(budget, 1)
    async with measuring(res, bench.args.timeout):
        res.extra["t_go"] = time.monotonic()
        tasks = [asyncio.create_task(prefetch(bench, s, ref)) for s in sessions]
        await asyncio.wait(tasks, timeout=budget)
    answers = [await answer(t, s, budget, ref) for t, s in zip(tasks, sessions)]
    after = await origin_stats(stats_file)
    res.origin_payload = after["bytes"] - before["bytes"]
    res.extra["origin_requests"] = after["gets"] - before["gets"]
    return answers


async def answer(task: asyncio.Task[dict[str, Any]], s: Any, budget: float, ref: str = MODEL_URL) -> Any:
    """The prefetch's answer, or an exception that says what the unfinished node is doing."""
    import aiohttp

    if task.done():
        return task.exception() or task.result()
    task.cancel()
    try:
        async with s.get("http://node/v1/models/status", params={"ref": ref}) as r:
            st = await r.json()
        return RuntimeError(
            f"not ready after {budget:.0f}s: state={st.get('state')} "
            f"bytes_done={st.get('bytes_done')} sources={st.get('sources')}"
        )
    except aiohttp.ClientError as e:
        return e


def check_answers(res: MethodResult, answers: list[Any], model: Model, name: str) -> None:
    """Per-node times and sources from the answers; each file BLAKE3-checked again (not timed:
    the daemon already verified it)."""
    t_go = res.extra["t_go"]
    res.ok = True
    per_node = []
    for i, ans in enumerate(answers, 1):
        if isinstance(ans, BaseException) or ans.get("state") != "ready":
            res.ok = False
            res.node_s.append(None)
            res.notes.append(f"{name} n{i}: {ans}"[:300])
            continue
        res.node_s.append(ans["_t_done"] - t_go)
        per_node.append({"node": f"n{i}", "origin": ans["sources"]["origin"], "peer": ans["sources"]["peer"]})
        f = Path(ans["path"])
        if not model_matches(f, model):
            res.ok = False
            res.notes.append(f"cached n{i}: file(s) at {f} missing or wrong")
    res.extra["sources"] = per_node
