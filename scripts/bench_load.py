"""Load: many launchers hammering one daemon's local API at once, for a fixed time.

Each of ``--launchers`` (default 200) concurrent launchers loops, until ``--seconds`` (default 30)
have passed, over what a launcher does when it starts a model that is already on the node:
``POST /v1/prefetch {"wait": true}`` (answers at once: the model is ready), ``GET
/v1/models/status``, ``POST /v1/leases`` and ``DELETE /v1/leases/{id}``. Printed per route:
requests/s, errors, p50/p95/p99 latency; and the daemon's RSS at the start, the middle and the
end of the run (memory should stay flat), plus its CPU use.

Loopback only: by default the script starts its own daemon (``python -m cached``, API on
127.0.0.1, peer API on 127.0.0.1 and off, ``--no-mdns``, a temporary cache dir) and removes it
afterwards; ``--api`` may name a running daemon, but only on 127.0.0.0/8 or a unix socket on this
host (the models are ``file://`` refs the script creates). Bounded in time (``--seconds`` plus a
short grace; every request has a timeout) and in count (``--max-requests``).

    .venv/bin/python scripts/bench_load.py [--seconds 30] [--launchers 200] [--models 4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

REPO = Path(__file__).resolve().parents[1]
ROUTES = ("prefetch", "status", "lease", "release")
REQUEST_TIMEOUT_S = 10.0
GRACE_S = 15.0


# --- the daemon ---------------------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_daemon(workdir: Path) -> Any:
    """``python -m cached`` on 127.0.0.1 with a fresh cache; yields (api address, pid)."""
    port = free_loopback_port()
    config = workdir / "config.toml"
    config.write_text("")  # never pick up /etc/cached/config.toml
    log = open(workdir / "daemon.log", "ab")
    argv = [
        sys.executable,
        "-m",
        "cached",
        "--config",
        str(config),
        "--node-id",
        "bench-load",
        "--cache-dir",
        str(workdir / "cache"),
        "--api-listen",
        f"127.0.0.1:{port}",
        "--peer-listen",
        "127.0.0.1:0",
        "--no-mdns",
        "--hf-endpoint",
        "http://127.0.0.1:9",
        "--log-level",
        "warning",
        # The launchers' models are file:// refs under workdir/models (prepare() makes them).
        "--allow-file-root",
        str(workdir / "models"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    log.close()
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def check_loopback(api: str) -> None:
    if api.startswith("unix:"):
        return
    host = urlsplit(api if "://" in api else f"http://{api}").hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"bench_load: --api must be on 127.0.0.0/8 (or unix:/path), not {api!r}")


@contextlib.asynccontextmanager
async def session_for(api: str, launchers: int) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    if api.startswith("unix:"):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=api[5:], limit=launchers)
        base = "http://localhost"
    else:
        connector = aiohttp.TCPConnector(limit=launchers)
        base = api if "://" in api else f"http://{api}"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        yield s, base.rstrip("/")


# --- process figures ------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# --- the load --------------------------------------------------------------------------------------


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROUTES})
    errors: dict[str, int] = field(default_factory=lambda: {r: 0 for r in ROUTES})
    error_samples: list[str] = field(default_factory=list)
    requests: int = 0

    def record(self, route: str, started: float, ok: bool, why: str = "") -> None:
        self.requests += 1
        self.latencies[route].append(time.monotonic() - started)
        if not ok:
            self.errors[route] += 1
            if len(self.error_samples) < 10:
                self.error_samples.append(f"{route}: {why}")


async def call(s: aiohttp.ClientSession, method: str, url: str, stats: Stats, route: str, want: int, **kw: Any) -> Any:
    started = time.monotonic()
    try:
        async with s.request(method, url, **kw) as resp:
            body = await resp.json(content_type=None)
            ok = resp.status == want
            stats.record(route, started, ok, f"HTTP {resp.status} {str(body)[:120]}")
            return body if ok else None
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        stats.record(route, started, False, f"{type(e).__name__}: {e}")
        return None


async def launcher(
    n: int, s: aiohttp.ClientSession, base: str, refs: list[str], stats: Stats, stop_at: float, max_requests: int
) -> None:
    ref = refs[n % len(refs)]
    while time.monotonic() < stop_at and stats.requests < max_requests:
        model = await call(s, "POST", f"{base}/v1/prefetch", stats, "prefetch", 200, json={"ref": ref, "wait": True})
        if model is not None and (model.get("state") != "ready" or not model.get("path")):
            # 200 means ready: a launcher reads the path from this very answer.
            stats.errors["prefetch"] += 1
            if len(stats.error_samples) < 10:
                stats.error_samples.append(
                    f"prefetch: HTTP 200 but state={model.get('state')!r} path={model.get('path')!r}"
                )
        await call(s, "GET", f"{base}/v1/models/status", stats, "status", 200, params={"ref": ref})
        lease = await call(
            s,
            "POST",
            f"{base}/v1/leases",
            stats,
            "lease",
            201,
            json={"ref": ref, "holder": f"bench-launcher-{n}", "ttl_s": 120},
        )
        if lease is not None:
            await call(s, "DELETE", f"{base}/v1/leases/{lease['lease_id']}", stats, "release", 200)


async def sample_memory(pid: int | None, seconds: float, stop: asyncio.Event, out: dict[str, Any]) -> None:
    """RSS at the start, the middle and the end of the load, and the peak (sampled every 0.5 s)."""
    if pid is None:
        return
    start = time.monotonic()
    out["peak"] = out["start"] = rss_bytes(pid)
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        rss = rss_bytes(pid)
        if rss is not None:
            out["peak"] = max(out["peak"] or 0, rss)
            if "middle" not in out and time.monotonic() - start >= seconds / 2:
                out["middle"] = rss
    out["end"] = rss_bytes(pid)


async def prepare(s: aiohttp.ClientSession, base: str, workdir: Path, models: int) -> list[str]:
    refs = []
    for i in range(models):
        d = workdir / "models" / f"model-{i}"
        d.mkdir(parents=True)
        # Over TCP the daemon cannot tell who calls, so it imports only files every user could
        # read (docs/security.md): open the path from the 0700 temp dir down.
        for p in (workdir, workdir / "models", d):
            p.chmod(0o755)
        (d / "config.json").write_text(json.dumps({"model_type": "bench", "i": i}))
        (d / "weights.bin").write_bytes(os.urandom(256 * 1024))
        async with s.post(
            f"{base}/v1/prefetch", json={"ref": f"file://{d}", "wait": True}, timeout=aiohttp.ClientTimeout(total=60)
        ) as resp:
            body = await resp.json()
            if resp.status != 200 or body.get("state") != "ready":
                raise SystemExit(f"bench_load: cannot prepare {d}: {resp.status} {body}")
            refs.append(body["ref"])
    return refs


async def wait_healthy(
    s: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes] | None, timeout_s: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench_load: the daemon exited with {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with s.get(f"{base}/v1/node") as resp:
                if resp.status == 200:
                    return await resp.json()
        await asyncio.sleep(0.1)
    raise SystemExit("bench_load: the daemon did not answer in time")


async def run(
    args: argparse.Namespace, api: str, workdir: Path, proc: subprocess.Popen[bytes] | None
) -> dict[str, Any]:
    async with session_for(api, args.launchers) as (s, base):
        node = await wait_healthy(s, base, proc)
        pid = proc.pid if proc is not None else node.get("pid")
        refs = await prepare(s, base, workdir, args.models)
        stats = Stats()
        memory: dict[str, Any] = {}
        stop = asyncio.Event()
        load_avg = os.getloadavg()
        cpu0 = cpu_seconds(pid) if pid else None
        started = time.monotonic()
        stop_at = started + args.seconds
        sampler = asyncio.create_task(sample_memory(pid, args.seconds, stop, memory), name="bench.memory")
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    *(launcher(i, s, base, refs, stats, stop_at, args.max_requests) for i in range(args.launchers))
                ),
                args.seconds + GRACE_S,
            )
        finally:
            elapsed = time.monotonic() - started
            stop.set()
            await sampler
        cpu1 = cpu_seconds(pid) if pid else None
        async with s.get(f"{base}/v1/leases") as resp:
            leftover = len(await resp.json())
    routes = {}
    for route in ROUTES:
        lat = sorted(stats.latencies[route])
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) >= 2 else [lat[0] if lat else 0.0] * 99
        routes[route] = {
            "requests": len(lat),
            "rps": round(len(lat) / elapsed, 1),
            "errors": stats.errors[route],
            "p50_ms": round(q[49] * 1000, 2),
            "p95_ms": round(q[94] * 1000, 2),
            "p99_ms": round(q[98] * 1000, 2),
        }
    return {
        "launchers": args.launchers,
        "seconds": round(elapsed, 1),
        "models": len(refs),
        "requests": stats.requests,
        "rps": round(stats.requests / elapsed, 1),
        "errors": sum(stats.errors.values()),
        "routes": routes,
        "error_samples": stats.error_samples,
        "leases_left": leftover,
        "rss_mib": {k: round(v / (1 << 20), 1) for k, v in memory.items() if v is not None},
        "daemon_cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 1)
        if cpu0 is not None and cpu1 is not None
        else None,
        "load_average_before": [round(x, 2) for x in load_avg],
        "cpus": os.cpu_count(),
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"bench_load: {r['launchers']} launchers, {r['seconds']} s, {r['models']} ready models, "
        f"{r['cpus']} CPUs (load average before: {r['load_average_before']})",
        "",
        "| route | requests | req/s | errors | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "prefetch": "POST /v1/prefetch (wait, ready)",
        "status": "GET /v1/models/status",
        "lease": "POST /v1/leases",
        "release": "DELETE /v1/leases/{id}",
    }
    for route, x in r["routes"].items():
        lines.append(
            f"| {names[route]} | {x['requests']} | {x['rps']} | {x['errors']} | {x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} |"
        )
    lines.append(f"| all | {r['requests']} | {r['rps']} | {r['errors']} | | | |")
    m = r["rss_mib"]
    lines += [
        "",
        f"daemon RSS MiB: start {m.get('start')}, middle {m.get('middle')}, end {m.get('end')}, peak {m.get('peak')}",
        f"daemon CPU: {r['daemon_cpu_percent']}% of one core; leases left after the run: {r['leases_left']}",
    ]
    if r["error_samples"]:
        lines += ["", "first errors:"] + [f"  {e}" for e in r["error_samples"]]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description="Many concurrent launchers against one daemon (loopback only).")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the load runs (default 30)")
    p.add_argument("--launchers", type=int, default=200, help="concurrent launchers (default 200)")
    p.add_argument("--models", type=int, default=4, help="ready models the launchers share (default 4)")
    p.add_argument("--max-requests", type=int, default=5_000_000, help="stop after this many requests in all")
    p.add_argument("--api", help="a running daemon on 127.0.0.0/8 or unix:/path (default: start one)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args()
    if not 0 < args.seconds <= 3600 or not 0 < args.launchers <= 5000 or not 0 < args.models <= 100:
        p.error("--seconds in (0, 3600], --launchers in (0, 5000], --models in (0, 100]")
    workdir = Path(tempfile.mkdtemp(prefix="cached-bench-load-"))
    try:
        if args.api:
            check_loopback(args.api)
            result = asyncio.run(run(args, args.api, workdir, None))
        else:
            with own_daemon(workdir) as (api, proc):
                result = asyncio.run(run(args, api, workdir, proc))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
