"""The ``failover`` scenario: ``replicate REF --replicas R`` on node 1, wait for R ready copies,
SIGKILL one holder's daemon (``--kill-mode node``: its link goes down first), then time detection
(suspect/dead in the survivors' views), the replacement's fetch and its ready, verified copy, and
count origin and peer bytes during the failover. The figures are ``failover_figures``'."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbench import failover_figures as figures
from cbench.bench import Bench, Model, origin_stats
from cbench.cluster import cluster, sync_disks
from cbench.common import MODEL_NAME, MODEL_URL, blake3_file, fmt_size, log, node_ns
from cbench.daemons import await_membership, daemon_peer_defaults, launch_cached, write_cluster_files
from cbench.failover_watch import follow_events, get_json, wait_ready_copies, watch_peers
from cbench.measure import Samples, sampler
from cbench.netns import link_down
from cbench.processes import Child

NAME = "failover"  # the daemons' names and log files: failover-nI


async def run_failover_scenario(bench: Bench) -> dict[str, Any]:
    a = bench.args
    async with cluster(bench) as c:
        await sync_disks()
        log(
            f"--- failover: replicate {fmt_size(a.size)} --replicas {a.replicas} on {a.nodes} nodes, then kill a holder"
        )
        try:
            return await run_failover(bench, c.model, c.stats_file)
        except (RuntimeError, TimeoutError, OSError) as e:
            log(f"failover: FAILED: {e}")
            return {"scenario": "failover", "ok": False, "notes": [f"failed: {e}"]}


def new_record(bench: Bench) -> dict[str, Any]:
    a = bench.args
    return {
        "scenario": "failover",
        "ok": False,
        "notes": [],
        "size": a.size,
        "nodes": a.nodes,
        "node_rate": a.node_rate,
        "origin_rate": a.origin_rate,
        "replicas": a.replicas,
        "kill": a.kill,
        "kill_mode": a.kill_mode,
        "piece_size": a.piece_size,
        "git": a.git,
    }


async def peer_settings(bench: Bench, r: dict[str, Any]) -> tuple[dict[str, float], float]:
    """The [peer] keys the config file sets, and the dead timeout in force (config or default)."""
    a = bench.args
    defaults = await asyncio.to_thread(daemon_peer_defaults, bench, a.pythonpath)
    # --gossip-interval 0: the daemon's own default (the key is left out of the config).
    peer: dict[str, float] = {"gossip_interval_s": a.gossip_interval} if a.gossip_interval else {}
    for key, val in (
        ("suspect_after_s", a.suspect_after),
        ("dead_after_s", a.dead_after),
        ("stall_timeout_s", a.stall_timeout),
    ):
        if val:
            peer[key] = val
    eff = {**defaults, **peer}
    r["peer_config"] = {
        k: eff.get(k) for k in ("gossip_interval_s", "suspect_after_s", "dead_after_s", "stall_timeout_s")
    }
    r["peer_config_from"] = {
        k: ("config file" if k in peer else "daemon default" if k in defaults else "unknown") for k in r["peer_config"]
    }
    return peer, float(eff.get("dead_after_s") or 15.0)


async def run_failover(bench: Bench, model: Model, stats_file: Path) -> dict[str, Any]:
    a = bench.args
    r = new_record(bench)
    peer, dead_after = await peer_settings(bench, r)
    files = write_cluster_files(bench.work / "nodes-failover", peer, a.origin_connections)
    r["config"] = files.conf.read_text()
    kids, socks = await launch_cached(bench, files, a.piece_size, NAME, a.pythonpath)
    run = FailoverRun(bench, r, kids, stats_file, model, dead_after)
    try:
        await run.run(socks)
    finally:
        await run.close()
        if not a.keep:
            shutil.rmtree(files.base, ignore_errors=True)
    return r


@dataclass
class Watch:
    """What runs from before the kill to the replacement's copy."""

    events: list[dict[str, Any]] = field(default_factory=list)  # job events from every survivor
    replaced: asyncio.Event = field(default_factory=asyncio.Event)  # a non-holder is ready (or failed)
    views: dict[str, dict[str, float]] = field(default_factory=dict)  # survivor -> state -> s after kill
    samples: Samples = field(default_factory=list)
    budget: float = 0.0


class FailoverRun:
    """One failover, step by step; ``close`` stops whatever is still watching."""

    def __init__(
        self, bench: Bench, r: dict[str, Any], kids: list[Child], stats_file: Path, model: Model, dead_after: float
    ) -> None:
        self.bench, self.a, self.r = bench, bench.args, r
        self.kids, self.stats_file, self.model, self.dead_after = kids, stats_file, model, dead_after
        self.sessions: list[Any] = []
        self.streams: list[asyncio.Task[Any]] = []
        self.sampler_task: asyncio.Task[None] | None = None
        self.stop_sampler = asyncio.Event()

    async def run(self, socks: list[Path]) -> None:
        self.sessions, converge_s = await await_membership(self.bench, self.kids, socks)
        self.r["converge_s"] = round(converge_s, 2)
        log(f"failover: {self.a.nodes} daemons up, membership converged in {self.r['converge_s']}s")
        await asyncio.sleep(1.0)
        canonical, holders = await self.replicate()
        vi = self.choose_victim(holders)
        survivors = {f"n{i}": self.sessions[i - 1] for i in range(1, self.a.nodes + 1) if i != vi}
        w = await self.watch(survivors, canonical, holders)
        before_kill = await origin_stats(self.stats_file)  # also lets the sampler take a baseline
        t0_wall, t0, t_end_wall = await self.kill(vi, survivors, w)
        after_fo = await origin_stats(self.stats_file)
        await self.stop_streams()
        r = self.r
        r["origin_bytes_failover"] = after_fo["bytes"] - before_kill["bytes"]
        r["origin_requests_failover"] = after_fo["gets"] - before_kill["gets"]
        r["origin_heads_failover"] = after_fo["heads"] - before_kill["heads"]
        await self.analyse(survivors, w, t0_wall, t0)
        r["t_end_s"] = round(t_end_wall - t0_wall, 3)
        r["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    async def replicate(self) -> tuple[str, list[str]]:
        """``replicate REF --replicas R`` on node 1's API; wait for R ready copies."""
        a, r = self.a, self.r
        before = await origin_stats(self.stats_file)
        t_rep = time.monotonic()
        async with self.sessions[0].post(
            "http://node/v1/replicate", json={"ref": MODEL_URL, "replicas": a.replicas}
        ) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"replicate: HTTP {resp.status}: {body}")
        canonical = body["ref"]
        r["owners_at_replicate"] = body.get("owners", [])
        log(f"failover: replicate {MODEL_URL} --replicas {a.replicas}: owners {r['owners_at_replicate']}")
        holders = await wait_ready_copies(self.sessions[0], MODEL_URL, a.replicas, self.bench.method_budget("cached"))
        r["initial_s"] = round(time.monotonic() - t_rep, 2)
        r["holders"] = holders
        after = await origin_stats(self.stats_file)
        r["initial_origin_bytes"] = after["bytes"] - before["bytes"]
        log(f"failover: {holders} ready after {r['initial_s']}s, origin sent {r['initial_origin_bytes'] / a.size:.3f}x")
        return canonical, holders

    def choose_victim(self, holders: list[str]) -> int:
        """--kill first|second (owner in HRW order among the holders) or a node id; its index."""
        a, r = self.a, self.r
        owners = [o for o in r["owners_at_replicate"] if o in holders] or holders
        victim = {"first": owners[0], "second": owners[min(1, len(owners) - 1)]}.get(a.kill, a.kill)
        if victim not in holders:
            raise RuntimeError(f"--kill {a.kill}: {victim} is not a holder (holders: {holders})")
        r["victim"] = victim
        r["surviving_holders"] = [h for h in holders if h != victim]
        return int(victim[1:])

    async def watch(self, survivors: dict[str, Any], canonical: str, holders: list[str]) -> Watch:
        """Job events on every survivor (bounded by the budget) and the link counters."""
        a = self.a
        w = Watch(budget=min(self.bench.remaining(), self.dead_after + 4 * a.size * 8 / a.node_rate + 120))
        self.r["budget_s"] = round(w.budget, 1)
        opened = {node: asyncio.Event() for node in survivors}
        for node, s in survivors.items():
            self.streams.append(
                asyncio.create_task(
                    asyncio.wait_for(
                        follow_events(s, node, canonical, w.events, opened[node], w.replaced, set(holders)),
                        w.budget + 30,
                    )
                )
            )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened.values())), 10)
        self.sampler_task = asyncio.create_task(sampler(w.samples, self.stop_sampler, a.timeout))
        return w

    async def kill(self, vi: int, survivors: dict[str, Any], w: Watch) -> tuple[float, float, float]:
        """SIGKILL to the victim daemon's process group (the whole daemon in its namespace); wait for
        the replacement copy and for the survivors to mark the victim dead. Returns the kill's wall
        and monotonic times and the wall time the replacement was done (or the wait gave up)."""
        a, r = self.a, self.r
        victim_kid = self.kids[vi - 1]
        r["loadavg_at_kill"] = [round(x, 2) for x in os.getloadavg()]
        t0_wall, t0 = time.time(), time.monotonic()
        if a.kill_mode == "node":
            link_down(node_ns(vi))
        os.killpg(victim_kid.proc.pid, signal.SIGKILL)
        log(
            f"failover: killed {r['victim']} ({a.kill_mode}); waiting for the replacement copy (at most {w.budget:.0f}s)"
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(victim_kid.proc.wait(), 10)
        watcher = asyncio.create_task(watch_peers(survivors, r["victim"], t0_wall, t0 + self.dead_after + 60, w.views))
        try:
            await asyncio.wait_for(w.replaced.wait(), w.budget)
        except TimeoutError:
            r["notes"].append(f"no replacement copy ready within {w.budget:.0f}s of the kill")
        t_end_wall = time.time()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(watcher, self.dead_after + 65)
        self.stop_sampler.set()
        if self.sampler_task is not None:
            await self.sampler_task
        self.sampler_task = None
        return t0_wall, t0, t_end_wall

    async def analyse(self, survivors: dict[str, Any], w: Watch, t0_wall: float, t0: float) -> None:
        r, logs = self.r, self.bench.work / "logs"
        repl = figures.who_fetched(r, w.events)
        per = figures.detections(r, list(survivors), w.views, logs, t0_wall)
        if repl is not None:
            figures.replacement_timeline(r, w.events, repl, per, logs, t0_wall)
            await self.check_replacement(survivors[repl])
        other = next(iter(s for node, s in survivors.items() if node != repl))
        loc = await get_json(other, "/v1/locate", MODEL_URL, 10)
        if loc is not None:
            r["locate_after"] = loc.get("nodes")
        figures.link_figures(r, w.samples, t0)
        figures.bounds(r, self.a)
        figures.verdict(r, self.a.replicas)

    async def check_replacement(self, s: Any) -> None:
        """The replacement's status, and BLAKE3 of its file when it says ready."""
        st = await get_json(s, "/v1/models/status", MODEL_URL, 5)
        if st is None:
            return
        self.r["replacement_status"] = {
            k: st.get(k) for k in ("state", "bytes_total", "sources", "replicas", "manifest")
        }
        if st.get("state") == "ready" and st.get("path"):
            p = Path(st["path"])
            f = p / MODEL_NAME if p.is_dir() else p
            self.r["replacement_file_ok"] = f.exists() and await asyncio.to_thread(blake3_file, f) == self.model.digest

    async def stop_streams(self) -> None:
        for t in self.streams:
            t.cancel()
        await asyncio.gather(*self.streams, return_exceptions=True)

    async def close(self) -> None:
        self.stop_sampler.set()
        if self.sampler_task is not None:
            with contextlib.suppress(Exception):
                await self.sampler_task
        await self.stop_streams()
        for s in self.sessions:
            await s.close()
        await self.bench.procs.stop(self.kids, grace_s=10.0)
