"""The cached daemons as processes: the cluster's files (token, config), one daemon per node
namespace (``--no-mdns``, ``--seed`` to node 1, API on a unix socket under the cluster's directory
so the driver reaches it without entering a namespace), an API session per socket, and the wait for
gossip to converge. What the daemons are asked to do is the scenarios' business."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbench.bench import Bench
from cbench.common import HUB_PORT, ORIGIN_IP, PEER_PORT, ZONES, node_ip, node_ns, zone_of
from cbench.processes import Child


@dataclass(frozen=True)
class ClusterFiles:
    base: Path  # node data, sockets, token and config live here
    conf: Path
    token: Path
    zones: int = 1  # > 1: each zone's nodes read cached-ZONE.toml (the config plus labels.zone)

    def conf_of(self, i: int, nodes: int) -> Path:
        zone = zone_of(i, nodes, self.zones)
        return self.base / f"cached-{zone}.toml" if zone else self.conf


def write_cluster_files(base: Path, peer: dict[str, Any], connections: int, zones: int = 1) -> ClusterFiles:
    """A fresh ``base`` with a cluster token and a config: ``[peer]`` as given, the origin's
    connections, info logging (the failover scenario reads the log lines); with ``zones``, one
    config per zone that adds ``[labels] zone``."""
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    token = base / "token"
    token.write_text(hashlib.sha256(os.urandom(32)).hexdigest() + "\n")
    token.chmod(0o600)
    conf = base / "cached.toml"
    text = (
        "[peer]\n"
        + "".join(f"{k} = {v}\n" for k, v in peer.items())
        + f"[origins.http]\nconnections = {connections}\n"
        + '[log]\nlevel = "info"\n'
    )
    conf.write_text(text)
    for zone in ZONES[:zones] if zones > 1 else "":
        (base / f"cached-{zone}.toml").write_text(text + f'[labels]\nzone = "{zone}"\n')
    return ClusterFiles(base, conf, token, zones)


def daemon_cmd(bench: Bench, files: ClusterFiles, i: int, piece_size: int) -> list[str]:
    sock = files.base / f"n{i}.sock"
    cmd = [
        bench.cached_py,
        "-m",
        "cached",
        "--config",
        str(files.conf_of(i, bench.args.nodes)),
        "--node-id",
        f"n{i}",
        "--cache-dir",
        str(files.base / f"n{i}"),
        "--api-listen",
        f"unix:{sock}",
        "--peer-listen",
        f"{node_ip(i)}:{PEER_PORT}",
        "--advertise",
        f"{node_ip(i)}:{PEER_PORT}",
        "--cluster-token-file",
        str(files.token),
        "--no-mdns",
        "--piece-size",
        str(piece_size),
        # The hub of --scenario shards, in the origin namespace (never the public hub).
        "--hf-endpoint",
        f"http://{ORIGIN_IP}:{HUB_PORT}",
    ]
    if i != 1:
        cmd += ["--seed", f"{node_ip(1)}:{PEER_PORT}"]
    return cmd


async def launch_cached(
    bench: Bench, files: ClusterFiles, piece_size: int, name: str, pythonpath: str = ""
) -> tuple[list[Child], list[Path]]:
    """One daemon per node namespace; returns the children and their API sockets."""
    kids, socks = [], []
    for i in range(1, bench.args.nodes + 1):
        socks.append(files.base / f"n{i}.sock")
        cmd = daemon_cmd(bench, files, i, piece_size)
        if pythonpath:
            cmd = ["env", f"PYTHONPATH={pythonpath}"] + cmd
        kids.append(await bench.procs.spawn(f"{name}-n{i}", node_ns(i), *cmd, log_to=bench.log_path(f"{name}-n{i}")))
    return kids, socks


def api_session(sock: Path) -> Any:
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(sock)), timeout=aiohttp.ClientTimeout(total=None)
    )


async def await_membership(bench: Bench, kids: list[Child], socks: list[Path]) -> tuple[list[Any], float]:
    """Wait for every API socket, then for gossip to show every node alive everywhere.
    Returns one API session per node (the caller closes them) and the seconds convergence took."""
    await wait_sockets(bench, kids, socks)
    sessions = [api_session(s) for s in socks]
    t_conv = time.monotonic()
    try:
        await wait_converged(sessions)
    except BaseException:
        for s in sessions:
            await s.close()
        raise
    return sessions, time.monotonic() - t_conv


async def wait_sockets(bench: Bench, kids: list[Child], socks: list[Path]) -> None:
    for _ in range(600):
        if all(s.exists() for s in socks):
            break
        if any(k.proc.returncode is not None for k in kids):
            raise RuntimeError("a cached daemon exited at start; see " + str(bench.work / "logs"))
        await asyncio.sleep(0.1)


async def wait_converged(sessions: list[Any]) -> None:
    """Every node sees the n-1 others alive (polled every 0.1 s, at most 600 rounds)."""
    n = len(sessions)
    views: list[int] = []
    for _ in range(600):
        views = [await alive_peers(s, f"n{i}") for i, s in enumerate(sessions, 1)]
        if min(views) >= n - 1:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"gossip did not converge: alive peers seen per node {views}")


async def alive_peers(s: Any, me: str) -> int:
    import aiohttp

    try:
        async with s.get("http://node/v1/peers") as r:
            peers = await r.json()
        return sum(1 for p in peers if p["state"] == "alive" and p["node_id"] != me)
    except aiohttp.ClientError:
        return 0


def daemon_peer_defaults(bench: Bench, pythonpath: str) -> dict[str, Any]:
    """The daemon's own [peer] defaults, read from the cached package the daemons run (so the
    report names the dead timeout actually in force when the config file does not set it)."""
    code = (
        "import dataclasses, json\nfrom cached.config import PeerConfig\n"
        "print(json.dumps({f.name: f.default for f in dataclasses.fields(PeerConfig) "
        "if f.default is not dataclasses.MISSING}, default=str))"
    )
    try:
        env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
        r = subprocess.run(
            [bench.cached_py, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(bench.work / "cwd"),
            env=env,
        )
        return json.loads(r.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}
