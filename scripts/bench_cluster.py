"""Cluster benchmark: N nodes want one large model at once, behind one slow origin.

A simulated cluster in network namespaces that this script creates and removes:

    cbench-sw       a bridge br0 and one veth end per host (the "switch")
    cbench-origin   198.18.0.1   origin link shaped to --origin-rate (default 200 Mbit/s)
    cbench-n1..nN   198.18.0.11+ node links shaped to --node-rate (default 1 Gbit/s)

Every link is shaped with ``tc tbf`` in both directions (egress of the host's ``eth0`` and egress of
the switch-side veth). Nothing is ever configured in the host's own network namespace: the veths
are created inside ``cbench-sw`` and moved straight into the host namespaces, the namespaces have
no default route, and every address is in 198.18.0.0/15. Leftovers with the ``cbench-`` prefix are
removed at start; everything is removed at the end, on error, on SIGINT/SIGTERM/SIGHUP, and when
the global ``--timeout`` fires.

Three ways to get the model onto every node, in the same run:

  cached   one ``cached`` daemon per node (``--no-mdns``, ``--seed`` to node 1, a cluster token,
           ``peer.gossip_interval_s = 0.5``); the model is an ``http://`` ref served by a small
           Range-capable server in the origin namespace; all nodes ``POST /v1/prefetch`` with
           ``wait`` at once (what ``cachectl prefetch --wait`` sends); done = the daemon answered
           ``ready`` (every piece BLAKE3-verified, blob fsynced and committed).
  torrent  libtorrent (PyPI bindings) with the origin as the only initial seed; trackerless: every
           leecher connects explicitly to the origin and to every other node; no DHT, LSD, UPnP,
           NAT-PMP, uTP (TCP only, like the others). Done = libtorrent reports the torrent finished
           (every piece SHA-1/SHA-256 checked).
  direct   every node runs ``curl -o`` against the origin server at once, then BLAKE3-hashes the
           file and compares it with the expected digest. Done = hash matched.

Reported per method: time from the common start until every node holds a verified copy, per-node
completion times, payload bytes sent by the origin (counted by the origin server or the
libtorrent seed) and wire bytes (the origin veth's counter, with TCP/IP headers), and the origin's
throughput over time (sampled from the switch-side veth counters). A Markdown table goes to stdout
and ``--out`` (JSON + Markdown), the plot to ``--plot``.

``--scenario failover`` (the default scenario is ``swarm``, the comparison above): a failover test in
the same cluster. ``POST /v1/replicate {"ref", "replicas": R}`` (default 2) on node 1; once R nodes
hold a ready copy, one holder's daemon is SIGKILLed (``--kill-mode node`` also takes its link down
first, so connections to it time out instead of being refused). From the kill the driver times:
when every survivor marks it suspect and dead (its log lines, cross-checked by polling
``GET /v1/peers`` every 0.1 s), when the replacement owner queues, starts and finishes its fetch
(``GET /v1/events`` job events, daemon wall clock), the origin bytes during the failover and the
replacement's ``sources``; the replacement's file is BLAKE3-checked. Reported against
detection (dead) + model size / node link rate. ``--cached-src head`` runs the committed
``cached/`` (a ``git archive`` copy) instead of the working tree. Output: a table on stdout, one
JSON line, WORKDIR/results/failover.{md,jsonl}, failover-STAMP.{json,png}.

Internal roles (run inside a namespace by this script): ``_origin``, ``_seed``, ``_leech``,
``_direct``. Run as root through ``scripts/bench-cluster`` (it builds the bench venv).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
PREFIX = "cbench-"
SWITCH = PREFIX + "sw"
ORIGIN_NS = PREFIX + "origin"
NET = "198.18.0"  # /24 inside 198.18.0.0/15
ORIGIN_IP = f"{NET}.1"
HTTP_PORT = 8080
BT_PORT = 6881
PEER_PORT = 7471
MODEL_NAME = "model.bin"
METHODS = ("cached", "torrent", "direct")
SAMPLE_S = 0.25
FAILOVER_POLL_S = 0.1  # how often the failover scenario asks every survivor for its member list


def node_ns(i: int) -> str:
    return f"{PREFIX}n{i}"


def node_ip(i: int) -> str:
    return f"{NET}.{10 + i}"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (like 256M, 1G)")
    return int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())


def parse_rate(text: str) -> int:
    """'200mbit' -> bits/s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)bit\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad rate {text!r} (like 200mbit, 1gbit)")
    return int(float(m.group(1)) * 1000 ** " kmg".index((m.group(2) or " ").lower()))


def fmt_size(n: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def log(msg: str) -> None:
    print(f"[bench-cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    """Roles talk to the driver in JSON lines on stdout."""
    print(json.dumps(obj), flush=True)


def blake3_file(path: Path) -> str:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(path))
    return h.hexdigest()


# --- network: namespaces, bridge, veths, tc ----------------------------------------------------


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def our_namespaces() -> list[str]:
    r = sh("ip", "netns", "list", check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def teardown_network(quiet: bool = False) -> None:
    """Kill whatever still runs inside our namespaces (only ours: the cbench- prefix), delete them.
    The bridge and every veth live inside these namespaces and go with them."""
    names = our_namespaces()
    for ns in names:
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for ns in names:
        sh("ip", "netns", "del", ns, check=False)
    left = our_namespaces()
    if left:
        log(f"WARNING: could not delete namespaces: {left}")
    elif names and not quiet:
        log(f"removed namespaces: {' '.join(names)}")


def tbf(ns: str, dev: str, rate_bps: int) -> None:
    # burst: at least one timer tick's worth of bytes at this rate (HZ may be as low as 100), and
    # larger than a GSO super-packet so tbf does not have to segment; latency bounds the queue.
    burst = max(64 << 10, rate_bps // 8 // 100)
    sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
       "rate", f"{rate_bps}bit", "burst", str(burst), "latency", "25ms")


def setup_network(nodes: int, origin_bps: int, node_bps: int) -> None:
    hosts = [(ORIGIN_NS, ORIGIN_IP, origin_bps, "s-origin")] + [
        (node_ns(i), node_ip(i), node_bps, f"s-n{i}") for i in range(1, nodes + 1)
    ]
    sh("ip", "netns", "add", SWITCH)
    sh("ip", "-n", SWITCH, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", SWITCH, "link", "set", "br0", "up")
    for ns, ip, rate, sw_dev in hosts:
        sh("ip", "netns", "add", ns)
        # Created inside the switch namespace, the peer end goes straight into the host's.
        sh("ip", "-n", SWITCH, "link", "add", sw_dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", SWITCH, "link", "set", sw_dev, "master", "br0")
        sh("ip", "-n", SWITCH, "link", "set", sw_dev, "up")
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        tbf(ns, "eth0", rate)  # what the host sends
        tbf(SWITCH, sw_dev, rate)  # what the host receives
    sh("ip", "netns", "exec", SWITCH, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")


def switch_counters() -> dict[str, tuple[int, int]]:
    """Switch-side veth -> (rx bytes, tx bytes). rx on s-X = bytes host X sent."""
    r = sh("ip", "-n", SWITCH, "-s", "-j", "link", "show", check=False)
    out: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(ValueError):
        for link in json.loads(r.stdout or "[]"):
            st = link.get("stats64") or link.get("stats") or {}
            if link.get("ifname", "").startswith("s-"):
                out[link["ifname"]] = (st.get("rx", {}).get("bytes", 0), st.get("tx", {}).get("bytes", 0))
    return out


# --- roles run inside the namespaces -----------------------------------------------------------


def role_origin(argv: list[str]) -> None:
    """A static server with single-range Range, strong ETag and If-Range; counts body bytes."""
    p = argparse.ArgumentParser(prog="_origin")
    p.add_argument("root", type=Path)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--stats", type=Path, required=True)
    a = p.parse_args(argv)
    from aiohttp import web

    rng_re = re.compile(r"^bytes=(\d*)-(\d*)$")
    stats = {"bytes": 0, "gets": 0, "heads": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        path = (a.root / request.match_info["path"]).resolve()
        if not path.is_relative_to(a.root.resolve()) or not path.is_file():
            return web.Response(status=404)
        st = path.stat()
        size = st.st_size
        etag = '"' + hashlib.sha1(f"{size}-{st.st_mtime_ns}-{st.st_ino}".encode()).hexdigest()[:20] + '"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        start, end, status = 0, size - 1, 200
        rng, if_range = request.headers.get("Range"), request.headers.get("If-Range")
        if rng and (if_range is None or if_range == etag):
            m = rng_re.match(rng.strip())
            if not m or not (m.group(1) or m.group(2)):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            if start > end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            stats["heads"] += 1
            return resp
        stats["gets"] += 1
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = start
            while pos <= end:
                chunk = os.pread(fd, min(1 << 20, end - pos + 1), pos)
                if not chunk:
                    break
                await resp.write(chunk)
                pos += len(chunk)
                stats["bytes"] += len(chunk)
        finally:
            os.close(fd)
        await resp.write_eof()
        return resp

    async def dump() -> None:
        tmp = a.stats.with_suffix(".tmp")
        tmp.write_text(json.dumps({"t": time.monotonic(), **stats}))
        os.replace(tmp, a.stats)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{path:.+}", handle)  # add_get answers HEAD too
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, a.bind, a.port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        emit({"ready": True})
        while not stop.is_set():
            await dump()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        await dump()
        await runner.cleanup()

    asyncio.run(main())


def lt_session(bind_ip: str) -> Any:
    import libtorrent as lt

    return lt.session({
        "listen_interfaces": f"{bind_ip}:{BT_PORT}",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "dht_bootstrap_nodes": "", "enable_ip_notifier": False,
        "enable_incoming_utp": False, "enable_outgoing_utp": False,  # TCP, like cached and curl
        "alert_mask": 0,
        "user_agent": "cbench",
    })


def _stdin_watch() -> threading.Event:
    """Set when the driver says quit (or closes our stdin); 'go' lines set .go."""
    quit_ev = threading.Event()
    quit_ev.go = threading.Event()  # type: ignore[attr-defined]

    def run() -> None:
        for line in sys.stdin:
            if line.strip() == "go":
                quit_ev.go.set()  # type: ignore[attr-defined]
            elif line.strip() == "quit":
                break
        quit_ev.set()

    threading.Thread(target=run, daemon=True).start()
    return quit_ev


def role_seed(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="_seed")
    p.add_argument("--torrent", type=Path, required=True)
    p.add_argument("--save", type=Path, required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--max-seconds", type=float, default=1800)
    a = p.parse_args(argv)
    import libtorrent as lt

    ses = lt_session(a.bind)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(str(a.torrent))
    atp.save_path = str(a.save)
    atp.flags |= lt.torrent_flags.seed_mode  # the origin has the file; skip re-hashing it
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    h = ses.add_torrent(atp)
    quit_ev = _stdin_watch()
    deadline = time.monotonic() + a.max_seconds
    emit({"ready": True})
    while not quit_ev.is_set() and time.monotonic() < deadline:
        s = h.status()
        tmp = a.stats.with_suffix(".tmp")
        tmp.write_text(json.dumps({"t": time.monotonic(), "bytes": s.total_payload_upload, "wire": s.total_upload, "peers": s.num_peers}))
        os.replace(tmp, a.stats)
        quit_ev.wait(0.2)


def role_leech(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="_leech")
    p.add_argument("--torrent", type=Path, required=True)
    p.add_argument("--save", type=Path, required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--peers", required=True, help="ip,ip,... to connect to (port 6881)")
    p.add_argument("--max-seconds", type=float, default=1800)
    a = p.parse_args(argv)
    import libtorrent as lt

    ses = lt_session(a.bind)
    ti = lt.torrent_info(str(a.torrent))
    quit_ev = _stdin_watch()
    deadline = time.monotonic() + a.max_seconds
    emit({"ready": True})
    while not quit_ev.go.wait(0.1):  # type: ignore[attr-defined]
        if quit_ev.is_set() or time.monotonic() > deadline:
            return
    t_go = time.monotonic()
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(a.save)
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    h = ses.add_torrent(atp)
    peers = [(ip, BT_PORT) for ip in a.peers.split(",") if ip]
    for peer in peers:
        h.connect_peer(peer)
    done_sent = False
    last_connect = time.monotonic()
    while not quit_ev.is_set() and time.monotonic() < deadline:
        s = h.status()
        if not done_sent and s.is_finished and s.state in (lt.torrent_status.seeding, lt.torrent_status.finished):
            emit({"done": True, "t_go": t_go, "t_done": time.monotonic(), "down": s.total_payload_download, "up": s.total_payload_upload})
            done_sent = True
        if time.monotonic() - last_connect > 2.0 and s.num_peers < len(peers):
            for peer in peers:  # a dropped or refused early connection: try again (bounded by deadline)
                h.connect_peer(peer)
            last_connect = time.monotonic()
        quit_ev.wait(0.05)
    s = h.status()
    emit({"final": True, "down": s.total_payload_download, "up": s.total_payload_upload})


def role_direct(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="_direct")
    p.add_argument("--url", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--expect", required=True, help="BLAKE3 hex of the model")
    p.add_argument("--max-seconds", type=float, default=1800)
    a = p.parse_args(argv)
    quit_ev = _stdin_watch()
    emit({"ready": True})
    deadline = time.monotonic() + a.max_seconds
    while not quit_ev.go.wait(0.1):  # type: ignore[attr-defined]
        if quit_ev.is_set() or time.monotonic() > deadline:
            return
    t_go = time.monotonic()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["curl", "-sS", "-f", "--max-time", str(int(a.max_seconds)), "-o", str(a.out), a.url], capture_output=True, text=True)
    t_curl = time.monotonic()
    ok = r.returncode == 0 and blake3_file(a.out) == a.expect
    emit({"done": True, "ok": ok, "t_go": t_go, "t_curl": t_curl, "t_done": time.monotonic(), "err": r.stderr.strip()[:200]})


ROLES = {"_origin": role_origin, "_seed": role_seed, "_leech": role_leech, "_direct": role_direct}


# --- the driver ----------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    lines: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


@dataclass
class MethodResult:
    name: str
    ok: bool = False
    skipped: str = ""
    node_s: list[float | None] = field(default_factory=list)  # per node, seconds from go
    all_done_s: float | None = None
    origin_payload: int = 0
    origin_wire: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s from go, origin wire bytes)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.work: Path = args.workdir
        self.children: list[Child] = []
        self.deadline = time.monotonic() + args.timeout
        self.bench_py = sys.executable
        self.cached_py = os.path.abspath(args.cached_python)  # the daemons start in WORKDIR/cwd
        self.converge_s = 0.0
        self.failover: dict[str, Any] = {}

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def method_budget(self, name: str) -> float:
        """How long one method may take before its unfinished nodes count as not done."""
        if self.a.method_timeout:
            return min(self.a.method_timeout, self.remaining())
        bound = self.a.size * 8 / self.a.origin_rate
        want = bound * self.a.nodes * 1.5 + 60 if name == "direct" else bound * 4 + 60
        return min(want, self.remaining())

    async def spawn(self, name: str, ns: str, *cmd: str, log_to: Path | None = None, stdin: bool = False) -> Child:
        err = open(log_to, "ab") if log_to else asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, *cmd,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=err, start_new_session=True,
            cwd=str(self.work / "cwd"),  # empty: `python -m cached` imports ./cached before PYTHONPATH
        )
        if log_to:
            err.close()
        child = Child(name, proc)
        self.children.append(child)

        async def pump() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                with contextlib.suppress(ValueError):
                    child.lines.put_nowait(json.loads(raw))

        asyncio.create_task(pump())
        return child

    async def expect(self, child: Child, key: str, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{child.name}: no '{key}' within {timeout:.0f}s")
            try:
                msg = await asyncio.wait_for(child.lines.get(), min(left, 1.0))
            except asyncio.TimeoutError:
                if child.proc.returncode is not None:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode} before '{key}'") from None
                continue
            if key in msg:
                return msg

    async def stop(self, children: list[Child], grace_s: float = 5.0) -> None:
        for c in children:
            if c.proc.returncode is None:
                if c.proc.stdin is not None and not c.proc.stdin.is_closing():
                    with contextlib.suppress(Exception):
                        c.proc.stdin.write(b"quit\n")
                        c.proc.stdin.close()
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
        for c in children:
            try:
                await asyncio.wait_for(c.proc.wait(), grace_s)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(c.proc.wait(), 2.0)
            if c in self.children:
                self.children.remove(c)

    def kill_all_sync(self) -> None:
        for c in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)

    # --- the model --------------------------------------------------------------------------

    def prepare_model(self) -> tuple[Path, str, Path]:
        d = self.work / "model" / str(self.a.size)
        d.mkdir(parents=True, exist_ok=True)
        path, meta, torrent = d / MODEL_NAME, d / "blake3", d / "model.torrent"
        if not (path.exists() and path.stat().st_size == self.a.size and meta.exists() and torrent.exists()):
            log(f"writing a {fmt_size(self.a.size)} model file {path}")
            block = hashlib.shake_256(b"cbench").digest(1 << 20)
            with open(path, "wb") as f:
                left, i = self.a.size, 0
                while left > 0:
                    n = min(len(block), left)
                    f.write((i.to_bytes(8, "little") + block[8:])[:n])  # every MiB differs
                    left -= n
                    i += 1
            meta.write_text(blake3_file(path))
            torrent.unlink(missing_ok=True)
            try:
                import libtorrent as lt

                fs = lt.file_storage()
                lt.add_files(fs, str(path))
                ct = lt.create_torrent(fs)
                lt.set_piece_hashes(ct, str(d))
                torrent.write_bytes(lt.bencode(ct.generate()))
            except ImportError:
                pass
        return path, meta.read_text().strip(), torrent

    # --- sampling ---------------------------------------------------------------------------

    async def sampler(self, out: list[tuple[float, dict[str, tuple[int, int]]]], stop: asyncio.Event) -> None:
        for _ in range(int(self.a.timeout / SAMPLE_S) + 1):  # bounded in count, like every loop here
            out.append((time.monotonic(), await asyncio.to_thread(switch_counters)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)
            if stop.is_set():
                out.append((time.monotonic(), await asyncio.to_thread(switch_counters)))
                return

    @contextlib.asynccontextmanager
    async def measuring(self, res: MethodResult):
        samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        stop = asyncio.Event()
        task = asyncio.create_task(self.sampler(samples, stop))
        await asyncio.sleep(SAMPLE_S * 1.5)  # a baseline sample before go
        try:
            yield
        finally:
            stop.set()
            await task
            t0 = res.extra.get("t_go", samples[0][0] if samples else 0.0)
            base = samples[0][1].get("s-origin", (0, 0))[0] if samples else 0
            res.samples = [(t - t0, c.get("s-origin", (0, 0))[0] - base) for t, c in samples]
            if samples:
                res.origin_wire = res.samples[-1][1]

    # --- the three methods ------------------------------------------------------------------

    async def run_direct(self, model: Path, digest: str, stats_file: Path) -> MethodResult:
        res = MethodResult("direct")
        n = self.a.nodes
        kids = []
        for i in range(1, n + 1):
            out = self.work / "direct" / f"n{i}" / MODEL_NAME
            kids.append(await self.spawn(
                f"direct-n{i}", node_ns(i), self.bench_py, str(SCRIPT), "_direct",
                "--url", f"http://{ORIGIN_IP}:{HTTP_PORT}/{MODEL_NAME}", "--out", str(out), "--expect", digest,
                "--max-seconds", str(int(self.remaining())), stdin=True, log_to=self.work / "logs" / f"direct-n{i}.log",
            ))
        for k in kids:
            await self.expect(k, "ready", 60)
        before = await self.origin_stats(stats_file)
        async with self.measuring(res):
            res.extra["t_go"] = t_go = time.monotonic()
            for k in kids:
                assert k.proc.stdin is not None
                k.proc.stdin.write(b"go\n")
            await asyncio.gather(*(k.proc.stdin.drain() for k in kids if k.proc.stdin))
            budget = self.method_budget("direct")
            res.extra["budget_s"] = round(budget, 1)
            msgs = await asyncio.gather(*(self.expect(k, "done", budget) for k in kids), return_exceptions=True)
        after = await self.origin_stats(stats_file)
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
        await self.stop(kids)
        shutil.rmtree(self.work / "direct", ignore_errors=True)
        return res

    async def run_torrent(self, model: Path, digest: str, torrent: Path) -> MethodResult:
        res = MethodResult("torrent")
        try:
            import libtorrent as lt
        except ImportError as e:
            res.skipped = f"libtorrent not importable in {sys.executable}: {e}"
            return res
        n = self.a.nodes
        stats = self.work / "seed-stats.json"
        stats.unlink(missing_ok=True)
        seed = await self.spawn(
            "seed", ORIGIN_NS, self.bench_py, str(SCRIPT), "_seed", "--torrent", str(torrent), "--save", str(model.parent),
            "--bind", ORIGIN_IP, "--stats", str(stats), "--max-seconds", str(int(self.remaining())),
            stdin=True, log_to=self.work / "logs" / "seed.log",
        )
        await self.expect(seed, "ready", 60)
        kids = []
        for i in range(1, n + 1):
            peers = [ORIGIN_IP] + [node_ip(j) for j in range(1, n + 1) if j != i]
            save = self.work / "torrent" / f"n{i}"
            save.mkdir(parents=True, exist_ok=True)
            kids.append(await self.spawn(
                f"leech-n{i}", node_ns(i), self.bench_py, str(SCRIPT), "_leech", "--torrent", str(torrent), "--save", str(save),
                "--bind", node_ip(i), "--peers", ",".join(peers), "--max-seconds", str(int(self.remaining())),
                stdin=True, log_to=self.work / "logs" / f"leech-n{i}.log",
            ))
        for k in kids:
            await self.expect(k, "ready", 60)
        await asyncio.sleep(1.0)  # listeners up everywhere
        before = json.loads(stats.read_text())["bytes"] if stats.exists() else 0
        async with self.measuring(res):
            res.extra["t_go"] = t_go = time.monotonic()
            for k in kids:
                assert k.proc.stdin is not None
                k.proc.stdin.write(b"go\n")
            await asyncio.gather(*(k.proc.stdin.drain() for k in kids if k.proc.stdin))
            budget = self.method_budget("torrent")
            res.extra["budget_s"] = round(budget, 1)
            msgs = await asyncio.gather(*(self.expect(k, "done", budget) for k in kids), return_exceptions=True)
        await asyncio.sleep(0.6)  # the seed writes its counters every 0.2 s
        res.origin_payload = json.loads(stats.read_text())["bytes"] - before
        res.extra["piece_size"] = lt.torrent_info(str(torrent)).piece_length()
        for m in msgs:
            if isinstance(m, BaseException):
                res.node_s.append(None)
                res.notes.append(str(m))
            else:
                res.node_s.append(m["t_done"] - t_go)
        await self.stop(kids + [seed])
        # libtorrent checked every piece; check the whole files as well (not timed).
        res.ok = all(s is not None for s in res.node_s)
        for i in range(1, n + 1):
            f = self.work / "torrent" / f"n{i}" / MODEL_NAME
            if not f.exists() or blake3_file(f) != digest:
                res.ok = False
                res.notes.append(f"torrent n{i}: file missing or wrong after completion")
        shutil.rmtree(self.work / "torrent", ignore_errors=True)
        return res

    async def launch_cached(
        self, base: Path, conf: Path, token: Path, piece_size: int, name: str, pythonpath: str = ""
    ) -> tuple[list[Child], list[Path]]:
        """One daemon per node namespace: --no-mdns, --seed to node 1, the cluster token, API on a
        unix socket under ``base`` (reached from the driver without entering a namespace)."""
        kids, socks = [], []
        for i in range(1, self.a.nodes + 1):
            sock = base / f"n{i}.sock"
            socks.append(sock)
            cmd = [
                self.cached_py, "-m", "cached", "--config", str(conf), "--node-id", f"n{i}", "--cache-dir", str(base / f"n{i}"),
                "--api-listen", f"unix:{sock}", "--peer-listen", f"{node_ip(i)}:{PEER_PORT}", "--advertise", f"{node_ip(i)}:{PEER_PORT}",
                "--cluster-token-file", str(token), "--no-mdns", "--piece-size", str(piece_size),
            ]
            if i != 1:
                cmd += ["--seed", f"{node_ip(1)}:{PEER_PORT}"]
            if pythonpath:
                cmd = ["env", f"PYTHONPATH={pythonpath}"] + cmd
            kids.append(await self.spawn(f"{name}-n{i}", node_ns(i), *cmd, log_to=self.work / "logs" / f"{name}-n{i}.log"))
        return kids, socks

    @staticmethod
    def api_session(sock: Path) -> Any:
        import aiohttp

        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)), timeout=aiohttp.ClientTimeout(total=None))

    async def await_membership(self, kids: list[Child], socks: list[Path]) -> list[Any]:
        """Wait for every API socket, then for gossip to show every node alive everywhere.
        Returns one API session per node (the caller closes them); sets ``self.converge_s``."""
        import aiohttp

        n = len(socks)
        for _ in range(600):
            if all(s.exists() for s in socks):
                break
            if any(k.proc.returncode is not None for k in kids):
                raise RuntimeError("a cached daemon exited at start; see " + str(self.work / "logs"))
            await asyncio.sleep(0.1)
        sessions = [self.api_session(s) for s in socks]
        t_conv = time.monotonic()
        try:
            for _ in range(600):
                views = []
                for i, s in enumerate(sessions, 1):
                    try:
                        async with s.get("http://node/v1/peers") as r:
                            peers = await r.json()
                        views.append(sum(1 for p in peers if p["state"] == "alive" and p["node_id"] != f"n{i}"))
                    except aiohttp.ClientError:
                        views.append(0)
                if min(views) >= n - 1:
                    break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError(f"gossip did not converge: alive peers seen per node {views}")
        except BaseException:
            for s in sessions:
                await s.close()
            raise
        self.converge_s = time.monotonic() - t_conv
        return sessions

    async def run_cached(self, model: Path, digest: str, stats_file: Path, name: str = "cached", variant: dict[str, Any] | None = None) -> MethodResult:
        import aiohttp

        v = variant or {}
        pythonpath = v.get("path", "")
        piece_size = v.get("piece_size", self.a.piece_size)
        connections = v.get("connections", self.a.origin_connections)
        stall_timeout = v.get("stall_timeout", self.a.stall_timeout)
        res = MethodResult(name)
        if pythonpath:
            res.extra["pythonpath"] = pythonpath
            res.notes.append(f"daemons ran the cached package from {pythonpath}, not from this checkout")
        if not pythonpath:
            res.extra.pop("pythonpath", None)
        n = self.a.nodes
        base = self.work / "nodes-cached"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        token = base / "token"
        token.write_text(hashlib.sha256(os.urandom(32)).hexdigest() + "\n")
        token.chmod(0o600)
        conf = base / "cached.toml"
        peer = {"gossip_interval_s": self.a.gossip_interval}
        if stall_timeout:
            peer["stall_timeout_s"] = stall_timeout  # a key only newer daemons know: set only when asked
        conf.write_text(
            "[peer]\n" + "".join(f"{k} = {v}\n" for k, v in peer.items())
            + f"[origins.http]\nconnections = {connections}\n"
            + '[log]\nlevel = "info"\n'
        )
        res.extra["config"] = conf.read_text() + f"# --piece-size {piece_size}\n"
        res.extra["piece_size"] = piece_size
        kids, socks = await self.launch_cached(base, conf, token, piece_size, name, pythonpath)
        sessions = []
        try:
            sessions = await self.await_membership(kids, socks)
            res.extra["converge_s"] = round(self.converge_s, 2)
            log(f"cached: {n} daemons up, membership converged in {res.extra['converge_s']}s")
            await asyncio.sleep(1.0)
            ref = f"http://{ORIGIN_IP}:{HTTP_PORT}/{MODEL_NAME}"
            before = await self.origin_stats(stats_file)

            async def prefetch(s: aiohttp.ClientSession) -> dict[str, Any]:
                async with s.post("http://node/v1/prefetch", json={"ref": ref, "wait": True, "timeout_s": int(self.remaining())}) as r:
                    body = await r.json()
                body["_t_done"] = time.monotonic()
                body["_status"] = r.status
                return body

            budget = self.method_budget("cached")
            res.extra["budget_s"] = round(budget, 1)
            async with self.measuring(res):
                res.extra["t_go"] = t_go = time.monotonic()
                tasks = [asyncio.create_task(prefetch(s)) for s in sessions]
                await asyncio.wait(tasks, timeout=budget)
            answers: list[Any] = []
            for i, (t, s) in enumerate(zip(tasks, sessions), 1):
                if t.done():
                    answers.append(t.exception() or t.result())
                    continue
                t.cancel()
                try:  # what the unfinished node is doing, for the report
                    async with s.get("http://node/v1/models/status", params={"ref": ref}) as r:
                        st = await r.json()
                    answers.append(RuntimeError(f"not ready after {budget:.0f}s: state={st.get('state')} "
                                                f"bytes_done={st.get('bytes_done')} sources={st.get('sources')}"))
                except aiohttp.ClientError as e:
                    answers.append(e)
            after = await self.origin_stats(stats_file)
            res.origin_payload = after["bytes"] - before["bytes"]
            res.extra["origin_requests"] = after["gets"] - before["gets"]
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
                f = Path(ans["path"]) / MODEL_NAME if Path(ans["path"]).is_dir() else Path(ans["path"])
                if not f.exists() or blake3_file(f) != digest:  # not timed: the daemon already verified it
                    res.ok = False
                    res.notes.append(f"cached n{i}: file at {f} missing or wrong")
            res.extra["sources"] = per_node
        finally:
            for s in sessions:
                await s.close()
            await self.stop(kids, grace_s=10.0)
            if not self.a.keep:
                shutil.rmtree(base, ignore_errors=True)
        return res

    # --- failover: kill a holder --------------------------------------------------------------

    def daemon_peer_defaults(self) -> dict[str, Any]:
        """The daemon's own [peer] defaults, read from the cached package the daemons run (so the
        report names the dead timeout actually in force when the config file does not set it)."""
        code = (
            "import dataclasses, json\nfrom cached.config import PeerConfig\n"
            "print(json.dumps({f.name: f.default for f in dataclasses.fields(PeerConfig) "
            "if f.default is not dataclasses.MISSING}, default=str))"
        )
        try:
            env = {**os.environ, "PYTHONPATH": self.a.pythonpath} if self.a.pythonpath else None
            r = subprocess.run([self.cached_py, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(self.work / "cwd"), env=env)
            return json.loads(r.stdout)
        except (OSError, subprocess.SubprocessError, ValueError):
            return {}

    async def wait_ready_copies(self, s: Any, ref: str, want: int, budget: float) -> list[str]:
        """Poll ``GET /v1/locate`` (every 0.5 s, bounded) until ``want`` nodes hold a ready copy."""
        import aiohttp

        nodes: list[dict[str, Any]] = []
        for _ in range(int(budget / 0.5) + 1):
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with s.get("http://node/v1/locate", params={"ref": ref}, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    nodes = (await r.json()).get("nodes", [])
            ready = sorted(n["node_id"] for n in nodes if n.get("state") == "ready")
            if len(ready) >= want:
                return ready
            await asyncio.sleep(0.5)
        raise TimeoutError(f"fewer than {want} ready copies after {budget:.0f}s: {nodes}")

    async def follow_events(self, s: Any, node: str, ref: str, out: list[dict[str, Any]], opened: asyncio.Event,
                            done: asyncio.Event, holders: set[str]) -> None:
        """``GET /v1/events?ref=`` on one node: every job event (with the daemon's wall-clock time).
        Ends when the caller cancels it (the caller bounds it in time)."""
        async with s.get("http://node/v1/events", params={"ref": ref}) as resp:
            async for raw in resp.content:
                line = raw.strip()
                if not line:
                    continue
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    ev["node"], ev["t_recv"] = node, time.time()
                    out.append(ev)
                    if ev.get("event") == "snapshot":
                        opened.set()
                    if node not in holders and ev.get("event") in ("ready", "failed"):
                        done.set()

    async def watch_peers(self, sessions: dict[str, Any], victim: str, t0_wall: float, until: float,
                          out: dict[str, dict[str, float]]) -> None:
        """Poll every survivor's ``GET /v1/peers`` every FAILOVER_POLL_S (bounded by ``until``, a
        monotonic time): when it first shows the victim suspect, dead (seconds after the kill)."""
        import aiohttp

        async def one(node: str, s: Any) -> None:
            try:
                async with s.get("http://node/v1/peers", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    peers = await r.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return
            t = time.time() - t0_wall
            state = next((p["state"] for p in peers if p["node_id"] == victim), "absent")
            out.setdefault(node, {}).setdefault(state, round(t, 3))

        for _ in range(int(max(0.0, until - time.monotonic()) / FAILOVER_POLL_S) + 1):
            await asyncio.gather(*(one(n, s) for n, s in sessions.items()))
            if all("dead" in out.get(n, {}) for n in sessions) or time.monotonic() > until:
                return
            await asyncio.sleep(FAILOVER_POLL_S)

    def log_events(self, path: Path, since_wall: float) -> list[tuple[float, str]]:
        """(wall time, message) of a daemon's log lines (text format: ``asctime LEVEL logger: msg``)
        from ``since_wall`` on; asctime has millisecond resolution."""
        out = []
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (.*)", line)
                if not m:
                    continue
                t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                if t >= since_wall - 0.001:
                    out.append((t, m.group(3)))
        return out

    async def run_failover(self, model: Path, digest: str, stats_file: Path) -> dict[str, Any]:
        """replicate REF --replicas R, wait for R ready copies, SIGKILL one holder's daemon, time
        detection (suspect/dead in the survivors' views), the replacement's fetch and its ready,
        verified copy; count origin and peer bytes during the failover."""
        import aiohttp

        a = self.a
        n = a.nodes
        name = "failover"
        r: dict[str, Any] = {"scenario": "failover", "ok": False, "notes": [], "size": a.size, "nodes": n,
                             "node_rate": a.node_rate, "origin_rate": a.origin_rate, "replicas": a.replicas,
                             "kill": a.kill, "kill_mode": a.kill_mode, "piece_size": a.piece_size, "git": a.git}
        defaults = await asyncio.to_thread(self.daemon_peer_defaults)
        peer: dict[str, float] = {"gossip_interval_s": a.gossip_interval}
        for key, val in (("suspect_after_s", a.suspect_after), ("dead_after_s", a.dead_after), ("stall_timeout_s", a.stall_timeout)):
            if val:
                peer[key] = val
        eff = {**defaults, **peer}
        r["peer_config"] = {k: eff.get(k) for k in ("gossip_interval_s", "suspect_after_s", "dead_after_s", "stall_timeout_s")}
        r["peer_config_from"] = {k: ("config file" if k in peer else "daemon default" if k in defaults else "unknown")
                                 for k in r["peer_config"]}
        dead_after = float(eff.get("dead_after_s") or 15.0)
        base = self.work / "nodes-failover"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        token = base / "token"
        token.write_text(hashlib.sha256(os.urandom(32)).hexdigest() + "\n")
        token.chmod(0o600)
        conf = base / "cached.toml"
        conf.write_text(
            "[peer]\n" + "".join(f"{k} = {v}\n" for k, v in peer.items())
            + f"[origins.http]\nconnections = {a.origin_connections}\n"
            + '[log]\nlevel = "info"\n'
        )
        r["config"] = conf.read_text()
        kids, socks = await self.launch_cached(base, conf, token, a.piece_size, name, a.pythonpath)
        sessions: list[Any] = []
        streams: list[asyncio.Task[None]] = []
        sampler_task: asyncio.Task[None] | None = None
        stop_sampler = asyncio.Event()
        try:
            sessions = await self.await_membership(kids, socks)
            r["converge_s"] = round(self.converge_s, 2)
            log(f"failover: {n} daemons up, membership converged in {r['converge_s']}s")
            await asyncio.sleep(1.0)
            ref = f"http://{ORIGIN_IP}:{HTTP_PORT}/{MODEL_NAME}"

            # 1. replicate REF --replicas R on node 1's API; wait for R ready copies.
            before = await self.origin_stats(stats_file)
            t_rep = time.monotonic()
            async with sessions[0].post("http://node/v1/replicate", json={"ref": ref, "replicas": a.replicas}) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"replicate: HTTP {resp.status}: {body}")
            canonical = body["ref"]
            r["owners_at_replicate"] = body.get("owners", [])
            log(f"failover: replicate {ref} --replicas {a.replicas}: owners {r['owners_at_replicate']}")
            holders = await self.wait_ready_copies(sessions[0], ref, a.replicas, self.method_budget("cached"))
            r["initial_s"] = round(time.monotonic() - t_rep, 2)
            r["holders"] = holders
            after = await self.origin_stats(stats_file)
            r["initial_origin_bytes"] = after["bytes"] - before["bytes"]
            log(f"failover: {holders} ready after {r['initial_s']}s, origin sent {r['initial_origin_bytes'] / a.size:.3f}x")

            # 2. who dies
            owners = [o for o in r["owners_at_replicate"] if o in holders] or holders
            victim = {"first": owners[0], "second": owners[min(1, len(owners) - 1)]}.get(a.kill, a.kill)
            if victim not in holders:
                raise RuntimeError(f"--kill {a.kill}: {victim} is not a holder (holders: {holders})")
            vi = int(victim[1:])
            survivors = {f"n{i}": sessions[i - 1] for i in range(1, n + 1) if i != vi}
            r["victim"] = victim
            r["surviving_holders"] = [h for h in holders if h != victim]

            # 3. watchers: job events on every survivor, /v1/peers polls, link counters.
            events: list[dict[str, Any]] = []
            replaced = asyncio.Event()
            opened = {node: asyncio.Event() for node in survivors}
            budget = min(self.remaining(), dead_after + 4 * a.size * 8 / a.node_rate + 120)
            r["budget_s"] = round(budget, 1)
            for node, s in survivors.items():
                streams.append(asyncio.create_task(asyncio.wait_for(
                    self.follow_events(s, node, canonical, events, opened[node], replaced, set(holders)), budget + 30)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened.values())), 10)
            samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
            sampler_task = asyncio.create_task(self.sampler(samples, stop_sampler))
            before_kill = await self.origin_stats(stats_file)  # also lets the sampler take a baseline

            # 4. the kill: SIGKILL to the daemon's process group (the whole daemon in its namespace).
            #    --kill-mode node also takes the node's link down first (a host that vanishes: no RST).
            victim_kid = kids[vi - 1]
            r["loadavg_at_kill"] = [round(x, 2) for x in os.getloadavg()]
            t0_wall, t0 = time.time(), time.monotonic()
            if a.kill_mode == "node":
                sh("ip", "-n", node_ns(vi), "link", "set", "eth0", "down")
            os.killpg(victim_kid.proc.pid, signal.SIGKILL)
            log(f"failover: killed {victim} ({a.kill_mode}); waiting for the replacement copy (at most {budget:.0f}s)")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(victim_kid.proc.wait(), 10)
            views: dict[str, dict[str, float]] = {}
            watcher = asyncio.create_task(self.watch_peers(survivors, victim, t0_wall, t0 + dead_after + 60, views))
            try:
                await asyncio.wait_for(replaced.wait(), budget)
            except asyncio.TimeoutError:
                r["notes"].append(f"no replacement copy ready within {budget:.0f}s of the kill")
            t_end_wall = time.time()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(watcher, dead_after + 65)
            stop_sampler.set()
            await sampler_task
            sampler_task = None
            after_fo = await self.origin_stats(stats_file)
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)

            # 5. what happened
            r["origin_bytes_failover"] = after_fo["bytes"] - before_kill["bytes"]
            r["origin_requests_failover"] = after_fo["gets"] - before_kill["gets"]
            r["origin_heads_failover"] = after_fo["heads"] - before_kill["heads"]
            rel = lambda t: round(t - t0_wall, 3)  # noqa: E731
            fetchers = sorted({e["node"] for e in events if e.get("event") in ("queued", "fetching", "ready", "failed")})
            r["fetchers"] = fetchers
            if len(fetchers) > 1:
                r["notes"].append(f"more than one survivor started a fetch: {fetchers}")
            ready_ev = sorted((e for e in events if e.get("event") == "ready"), key=lambda e: e["time"])
            repl = ready_ev[0]["node"] if ready_ev else (fetchers[0] if fetchers else None)
            r["replacement"] = repl
            per: dict[str, dict[str, Any]] = {}
            for node in survivors:
                logged = self.log_events(self.work / "logs" / f"{name}-{node}.log", t0_wall)
                entry: dict[str, Any] = {"poll": views.get(node, {})}
                for st in ("suspect", "dead"):
                    hit = next((t for t, msg in logged if f"peer status changed node={victim} status={st}" in msg), None)
                    entry[st] = rel(hit) if hit is not None else views.get(node, {}).get(st)
                    entry[f"{st}_from"] = "log" if hit is not None else "poll"
                per[node] = entry
            r["views"] = per
            for st in ("suspect", "dead"):
                ts = sorted(v[st] for v in per.values() if v.get(st) is not None)
                r[f"{st}_s"] = {"first": ts[0], "median": ts[len(ts) // 2], "last": ts[-1], "n": len(ts)} if ts else None
            if repl is not None:
                mine = [e for e in events if e["node"] == repl and "time" in e]
                for kind in ("queued", "fetching", "ready", "failed"):
                    t = next((e["time"] for e in mine if e.get("event") == kind), None)
                    r[f"{kind}_s"] = rel(t) if t is not None else None
                r["progress"] = [(rel(e["time"]), e.get("bytes_done", 0)) for e in mine if e.get("event") in ("progress", "fetching", "ready")]
                r["replacement_view"] = per.get(repl, {})
                logged = self.log_events(self.work / "logs" / f"{name}-{repl}.log", t0_wall)
                r["replacement_log"] = [f"+{t - t0_wall:.3f}s {msg}"[:240] for t, msg in logged][:60]
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    async with survivors[repl].get("http://node/v1/models/status", params={"ref": ref}, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        st = await resp.json()
                    r["replacement_status"] = {k: st.get(k) for k in ("state", "bytes_total", "sources", "replicas", "manifest")}
                    if st.get("state") == "ready" and st.get("path"):
                        p = Path(st["path"])
                        f = p / MODEL_NAME if p.is_dir() else p
                        r["replacement_file_ok"] = f.exists() and await asyncio.to_thread(blake3_file, f) == digest
            other = next(iter(s for node, s in survivors.items() if node != repl))
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with other.get("http://node/v1/locate", params={"ref": ref}, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    r["locate_after"] = (await resp.json()).get("nodes")
            # bytes each host sent / received on its link during the failover (switch-side veths)
            if len(samples) >= 2:
                first, last = samples[0][1], samples[-1][1]
                r["link_bytes"] = {dev: {"sent": last[dev][0] - first.get(dev, (0, 0))[0], "received": last[dev][1] - first.get(dev, (0, 0))[1]}
                                   for dev in last}
                r["link_samples"] = {dev: [(round(t - t0, 3), c.get(dev, (0, 0))[0] - first.get(dev, (0, 0))[0]) for t, c in samples]
                                     for dev in ["s-origin"] + [f"s-{h}" for h in r["surviving_holders"]]}
            # the figures
            wire = a.size * 8 / a.node_rate
            r["wire_s"] = round(wire, 3)
            rv = r.get("replacement_view") or {}
            r["detection_s"] = rv.get("dead") if rv.get("dead") is not None else (r["dead_s"] or {}).get("median")
            if r.get("ready_s") is not None and r.get("fetching_s") is not None:
                r["transfer_s"] = round(r["ready_s"] - r["fetching_s"], 3)
                r["total_s"] = r["ready_s"]
            if r.get("detection_s") is not None:
                r["lower_bound_s"] = round(r["detection_s"] + wire, 3)
                if r.get("total_s") is not None:
                    r["ratio"] = round(r["total_s"] / r["lower_bound_s"], 3)
            if rv.get("suspect") is not None:
                r["lower_bound_suspect_s"] = round(rv["suspect"] + wire, 3)
            if r.get("queued_s") is not None:
                trig = "suspect" if rv.get("dead") is None or r["queued_s"] < rv["dead"] else "dead"
                r["trigger"] = trig
                if rv.get(trig) is not None:
                    r["reconcile_delay_s"] = round(r["queued_s"] - rv[trig], 3)
            src = (r.get("replacement_status") or {}).get("sources") or {}
            r["ok"] = bool(
                r.get("replacement_file_ok") and (r.get("replacement_status") or {}).get("state") == "ready"
                and sum(1 for x in r.get("locate_after") or [] if x.get("state") == "ready") >= a.replicas
            )
            r["peer_bytes"], r["origin_bytes_replacement"] = src.get("peer"), src.get("origin")
            r["t_end_s"] = rel(t_end_wall)
            r["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            stop_sampler.set()
            if sampler_task is not None:
                with contextlib.suppress(Exception):
                    await sampler_task
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            for s in sessions:
                await s.close()
            await self.stop(kids, grace_s=10.0)
            if not a.keep:
                shutil.rmtree(base, ignore_errors=True)
        return r

    async def origin_stats(self, stats_file: Path) -> dict[str, Any]:
        await asyncio.sleep(0.5)  # the server writes its counters every 0.2 s
        return json.loads(stats_file.read_text())

    # --- whole run ----------------------------------------------------------------------------

    async def run(self) -> list[MethodResult]:
        a = self.a
        shutil.rmtree(self.work / "logs", ignore_errors=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        (self.work / "cwd").mkdir(parents=True, exist_ok=True)
        model, digest, torrent = await asyncio.to_thread(self.prepare_model)
        log(f"model {fmt_size(a.size)} blake3={digest[:16]}..")
        log(f"network: origin {a.origin_rate / 1e6:.0f} Mbit/s, {a.nodes} nodes at {a.node_rate / 1e6:.0f} Mbit/s")
        await asyncio.to_thread(setup_network, a.nodes, a.origin_rate, a.node_rate)
        stats_file = self.work / "origin-stats.json"
        stats_file.unlink(missing_ok=True)
        origin = await self.spawn(
            "origin", ORIGIN_NS, self.bench_py, str(SCRIPT), "_origin", str(model.parent), "--bind", ORIGIN_IP,
            "--port", str(HTTP_PORT), "--stats", str(stats_file), log_to=self.work / "logs" / "origin.log",
        )
        await self.expect(origin, "ready", 60)
        if a.scenario == "failover":
            await asyncio.to_thread(subprocess.run, ["sync"], timeout=120)
            log(f"--- failover: replicate {fmt_size(a.size)} --replicas {a.replicas} on {a.nodes} nodes, then kill a holder")
            try:
                self.failover = await self.run_failover(model, digest, stats_file)
            except (RuntimeError, TimeoutError, OSError) as e:
                self.failover = {"scenario": "failover", "ok": False, "notes": [f"failed: {e}"]}
                log(f"failover: FAILED: {e}")
            await self.stop([origin])
            return []
        results: list[MethodResult] = []
        for name in a.methods:
            if name == "torrent" and a.skip_torrent:
                results.append(MethodResult("torrent", skipped="--skip-torrent"))
                continue
            await asyncio.to_thread(subprocess.run, ["sync"], timeout=120)  # earlier writes off the page cache
            log(f"--- {name}: {a.nodes} nodes fetch {fmt_size(a.size)} at once")
            t = time.monotonic()
            try:
                if name == "direct":
                    r = await self.run_direct(model, digest, stats_file)
                elif name == "torrent":
                    r = await self.run_torrent(model, digest, torrent)
                elif name == "cached":
                    r = await self.run_cached(model, digest, stats_file)
                else:
                    label = name[len("cached:"):]
                    r = await self.run_cached(model, digest, stats_file, name=f"cached ({label})", variant=a.variants[label])
            except (RuntimeError, TimeoutError, OSError) as e:
                r = MethodResult(name, notes=[f"failed: {e}"])
                log(f"{name}: FAILED: {e}")
            done = [s for s in r.node_s if s is not None]
            if done and len(done) == a.nodes:
                r.all_done_s = max(done)
            results.append(r)
            log(f"{name}: {'skipped: ' + r.skipped if r.skipped else summary_line(r, a)} (took {time.monotonic() - t:.0f}s)")
        await self.stop([origin])
        return results


def git_info() -> str:
    """Which code the daemons ran (read-only git commands)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "cached"], capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (cached/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_head(workdir: Path) -> tuple[str, str]:
    """A copy of the committed cached/ package at HEAD (read-only git commands), for PYTHONPATH."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    dest = workdir / f"src-{sha[:12]}"
    if not (dest / "cached" / "__init__.py").exists():
        tmp = workdir / f"src-{sha[:12]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "cached"], capture_output=True, timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, timeout=60, check=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return str(dest), f"{sha[:7]} (HEAD, committed code exported to {dest})"


def summary_line(r: MethodResult, a: argparse.Namespace) -> str:
    t = f"{r.all_done_s:.1f}s" if r.all_done_s is not None else "not all nodes done"
    return f"all done {t}, origin sent {fmt_size(r.origin_payload)} payload ({r.origin_payload / a.size:.3f}x), ok={r.ok}"


# --- report --------------------------------------------------------------------------------------


def report(results: list[MethodResult], a: argparse.Namespace) -> str:
    bound = a.size * 8 / a.origin_rate
    lines = [
        f"{a.nodes} nodes at {a.node_rate / 1e6:.0f} Mbit/s, origin at {a.origin_rate / 1e6:.0f} Mbit/s, "
        f"model {fmt_size(a.size)}; lower bound (model size / origin rate) = {bound:.1f} s",
        f"cached: git {a.git}, --piece-size {fmt_size(a.piece_size)}, origins.http.connections={a.origin_connections}, "
        f"peer.gossip_interval_s={a.gossip_interval}" + (f", peer.stall_timeout_s={a.stall_timeout}" if a.stall_timeout else "")
        + f"; {os.cpu_count()} CPUs",
        "",
        "| method | all nodes verified | vs lower bound | first / median node | origin payload sent | vs model size | origin wire bytes | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped: {r.skipped} | | | | | | |")
            continue
        done = sorted(s for s in r.node_s if s is not None)
        med = done[len(done) // 2] if done else None
        t = f"{r.all_done_s:.1f} s" if r.all_done_s is not None else f"{len(done)}/{a.nodes} done"
        ratio = f"{r.all_done_s / bound:.2f}x" if r.all_done_s is not None else "-"
        fm = f"{done[0]:.1f} / {med:.1f} s" if done else "-"
        lines.append(
            f"| {r.name} | {t} | {ratio} | {fm} | {fmt_size(r.origin_payload)} | {r.origin_payload / a.size:.3f}x | "
            f"{fmt_size(r.origin_wire)} | {'yes' if r.ok else 'NO'} |"
        )
    by = {r.name: r for r in results}
    b = by.get("torrent")
    lines += ["", "Targets:"]
    for c in (r for r in results if r.name.startswith("cached")):
        if c.all_done_s is None:
            lines.append(f"- {c.name}: not every node finished, so every target is MISSED")
            continue
        lines.append(f"- {c.name} within 1.15x of the lower bound: {c.all_done_s / bound:.2f}x -> {'met' if c.all_done_s <= 1.15 * bound else 'MISSED'}")
        lines.append(f"- {c.name} origin bytes <= 1.05x model size: {c.origin_payload / a.size:.3f}x -> {'met' if c.origin_payload <= 1.05 * a.size else 'MISSED'}")
        if b and b.all_done_s is not None:
            lines.append(f"- {c.name} faster than the BitTorrent swarm: {c.all_done_s:.1f} s vs {b.all_done_s:.1f} s "
                         f"({b.all_done_s / c.all_done_s:.2f}x) -> {'met' if c.all_done_s < b.all_done_s else 'MISSED'}")
    for r in results:
        if r.name.startswith("cached") and "config" in r.extra:
            cfg = "; ".join(line for line in r.extra["config"].splitlines() if "=" in line or "--" in line)
            lines.append(f"- config ({r.name}): {cfg}" + (f"; code from {r.extra['pythonpath']}" if r.extra.get("pythonpath") else ""))
    for r in results:
        for note in r.notes:
            lines.append(f"- note ({r.name}): {note}")
    return "\n".join(lines)


def plot(results: list[MethodResult], a: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"cached": "tab:red", "torrent": "tab:orange", "direct": "tab:blue"}
    spare = iter(["tab:olive", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:cyan"])
    for r in results:
        if r.name not in colors:
            colors[r.name] = next(spare, "tab:gray")
    bound = a.size * 8 / a.origin_rate
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8.5))
    shown = [r for r in results if not r.skipped and r.node_s]
    width = 0.8 / max(1, len(shown))
    for k, r in enumerate(shown):
        xs = [i + 1 + (k - (len(shown) - 1) / 2) * width for i in range(len(r.node_s))]
        cap = r.extra.get("budget_s", max((s for s in r.node_s if s), default=1.0))
        ys = [s if s is not None else cap for s in r.node_s]
        hatch = [None if s is not None else "xx" for s in r.node_s]
        label = f"{r.name} (all: {r.all_done_s:.1f} s)" if r.all_done_s else f"{r.name} (hatched: not done by {cap:.0f} s)"
        bars = ax1.bar(xs, ys, width=width, color=colors[r.name], label=label)
        for bar, h in zip(bars, hatch):
            if h:
                bar.set_hatch(h)
                bar.set_alpha(0.45)
    ax1.axhline(bound, color="black", ls="--", lw=1, label=f"lower bound {bound:.1f} s")
    ax1.axhline(bound * 1.15, color="grey", ls=":", lw=1, label="1.15x lower bound")
    ax1.set_xlabel("node")
    ax1.set_ylabel("s until verified copy")
    ax1.set_xticks(range(1, a.nodes + 1))
    ax1.set_title(f"Per-node completion: {fmt_size(a.size)} model, {a.nodes} nodes @ {a.node_rate / 1e6:.0f} Mbit/s, "
                  f"origin @ {a.origin_rate / 1e6:.0f} Mbit/s")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    for r in shown:
        pts = r.samples
        ts, rates = [], []
        for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
            if t1 > t0:
                ts.append((t0 + t1) / 2)
                rates.append((b1 - b0) * 8 / (t1 - t0) / 1e6)
        ax2.plot(ts, rates, color=colors[r.name], lw=1.2,
                 label=f"{r.name}: origin sent {r.origin_wire / a.size:.2f}x model (wire)")
    ax2.axhline(a.origin_rate / 1e6, color="black", ls="--", lw=1, label="origin link rate")
    ax2.set_xlabel("s since start")
    ax2.set_ylabel("origin throughput, Mbit/s")
    ax2.set_title("Origin throughput over time (switch-side veth counter, sampled every 0.25 s)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- failover report -----------------------------------------------------------------------------


def _t(x: float | None) -> str:
    return f"{x:.2f} s" if x is not None else "-"


def report_failover(r: dict[str, Any], a: argparse.Namespace) -> str:
    pc = r.get("peer_config") or {}
    src = r.get("peer_config_from") or {}
    cfg = ", ".join(f"peer.{k}={v} ({src.get(k, '?')})" for k, v in pc.items())
    wire = a.size * 8 / a.node_rate
    lines = [
        f"Failover: {a.nodes} nodes at {a.node_rate / 1e6:.0f} Mbit/s, origin at {a.origin_rate / 1e6:.0f} Mbit/s, model "
        f"{fmt_size(a.size)}, replicas {a.replicas}, kill mode {a.kill_mode}; model size / node link rate = {wire:.2f} s",
        f"cached: git {a.git}, --piece-size {fmt_size(a.piece_size)}; {cfg}; {os.cpu_count()} CPUs",
    ]
    if "holders" not in r:
        return "\n".join(lines + [""] + [f"- {n}" for n in r.get("notes", [])])
    lines.append(
        f"initial copies: replicate on n1 -> owners {', '.join(r.get('owners_at_replicate') or [])}; {len(r['holders'])} ready after "
        f"{r['initial_s']:.1f} s, origin sent {r['initial_origin_bytes'] / a.size:.3f}x the model"
    )
    exp = ((r.get("replacement_status") or {}).get("replicas") or {}).get("owners")
    lines.append(
        f"killed {r['victim']} (SIGKILL{' + link down' if a.kill_mode == 'node' else ''}); surviving holder "
        f"{', '.join(r['surviving_holders'])}; replacement {r.get('replacement')}"
        + (f" (owners now, as the replacement computes them: {', '.join(exp)})" if exp else "")
    )
    lines += ["", "| from the kill | first survivor | median | last survivor | the replacement |", "|---|---|---|---|---|"]
    rv = r.get("replacement_view") or {}
    for st in ("suspect", "dead"):
        d = r.get(f"{st}_s") or {}
        lines.append(f"| survivors mark {r['victim']} {st} | {_t(d.get('first'))} | {_t(d.get('median'))} | {_t(d.get('last'))} | {_t(rv.get(st))} |")
    lines += [
        "",
        "| detection (dead) | replacement queued | fetch starts | ready (verified) | transfer | total | lower bound | total / bound | origin bytes | replacement: from peers / origin |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pb, ob = r.get("peer_bytes"), r.get("origin_bytes_replacement")
    lines.append(
        f"| {_t(r.get('detection_s'))} | {_t(r.get('queued_s'))} | {_t(r.get('fetching_s'))} | {_t(r.get('ready_s'))} | "
        f"{_t(r.get('transfer_s'))} | {_t(r.get('total_s'))} | {_t(r.get('lower_bound_s'))} | "
        f"{(str(r['ratio']) + 'x') if r.get('ratio') is not None else '-'} | {fmt_size(r.get('origin_bytes_failover', 0))} "
        f"({r.get('origin_requests_failover', 0)} GET, {r.get('origin_heads_failover', 0)} HEAD) | "
        f"{fmt_size(pb or 0)} / {fmt_size(ob or 0)} |"
    )
    lines += ["", "Where the time goes (seconds after the kill):"]
    trig = r.get("trigger")
    if trig:
        lines.append(f"- the replacement stopped counting {r['victim']} as a live owner when it marked it **{trig}** "
                     f"(at {_t(rv.get(trig))}); its reconcile loop queued the fetch {_t(r.get('reconcile_delay_s'))} later")
    if r.get("transfer_s") is not None:
        rate = a.size * 8 / r["transfer_s"] / 1e6
        lines.append(f"- transfer (fetching -> ready, includes manifest/piece-table lookups, verify, fsync, commit): "
                     f"{r['transfer_s']:.2f} s = {rate:.0f} Mbit/s effective, vs {wire:.2f} s at the link rate")
    if r.get("lower_bound_suspect_s") is not None and trig == "suspect":
        lines.append(f"- bound from the replacement's *suspect* mark instead (what the daemon acts on): "
                     f"{r['lower_bound_suspect_s']:.2f} s" + (f" -> total / that = {r['total_s'] / r['lower_bound_suspect_s']:.2f}x" if r.get("total_s") else ""))
    lb = r.get("link_bytes") or {}
    if lb:
        sent = ", ".join(f"{dev[2:]} {fmt_size(v['sent'])}" for dev, v in sorted(lb.items()) if v["sent"] > (1 << 20))
        lines.append(f"- link bytes sent during the failover (switch veth counters, > 1 MiB): {sent or 'none'}")
    if r.get("loadavg_at_kill"):
        lines.append(f"- load average at the kill: {' / '.join(map(str, r['loadavg_at_kill']))} (1/5/15 min, {os.cpu_count()} CPUs, shared machine)")
    lines.append(f"- verified: {'yes' if r.get('ok') else 'NO'} (replacement ready, BLAKE3 of its file matches, "
                 f"{sum(1 for x in r.get('locate_after') or [] if x.get('state') == 'ready')} ready copies in locate)")
    for note in r.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines)


def summary_failover(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("scenario", "ok", "git", "size", "nodes", "node_rate", "origin_rate", "replicas", "kill_mode", "peer_config",
            "initial_s", "initial_origin_bytes", "holders", "victim", "replacement", "fetchers", "suspect_s", "dead_s",
            "detection_s", "trigger", "queued_s", "fetching_s", "ready_s", "reconcile_delay_s", "transfer_s", "total_s",
            "wire_s", "lower_bound_s", "ratio", "lower_bound_suspect_s", "origin_bytes_failover", "origin_requests_failover",
            "peer_bytes", "origin_bytes_replacement", "loadavg_at_kill", "notes")
    return {k: r.get(k) for k in keys if k in r}


def draw_failover(ax: Any, r: dict[str, Any], title: str | None = None) -> None:
    """One failover run on ``ax``: the replacement's verified bytes, the bytes the surviving holder
    and the origin sent, the detection marks and the two bounds (all from the run's record)."""
    gib = 1 << 30
    size, node_rate = r["size"], r["node_rate"]
    wire = size * 8 / node_rate
    prog = r.get("progress") or []
    if prog:
        ax.plot([t for t, _ in prog], [b / gib for _, b in prog], color="tab:red", lw=1.8, marker=".",
                label=f"replacement {r.get('replacement')}: verified bytes (job events)")
    for dev, pts in (r.get("link_samples") or {}).items():
        ax.plot([t for t, _ in pts], [b / gib for _, b in pts], lw=1.1, ls="-" if dev != "s-origin" else ":",
                color="tab:blue" if dev != "s-origin" else "black",
                label=f"bytes sent by {dev[2:]} (link counter, sampled every {SAMPLE_S} s)")
    det = r.get("detection_s")
    if det is not None:
        ax.plot([det, det + wire], [0, size / gib], color="grey", ls="--", lw=1,
                label=f"lower bound: dead mark + size / link rate = {det + wire:.1f} s")
    rv = r.get("replacement_view") or {}
    if rv.get("suspect") is not None:
        ax.plot([rv["suspect"], rv["suspect"] + wire], [0, size / gib], color="grey", ls=":", lw=1,
                label=f"suspect mark + size / link rate = {rv['suspect'] + wire:.1f} s")
    marks = [("suspect", rv.get("suspect"), "tab:orange"), ("dead", rv.get("dead"), "tab:purple"),
             ("fetch starts", r.get("fetching_s"), "tab:green"), ("ready", r.get("ready_s"), "tab:red")]
    for label, t, color in marks:
        if t is not None:
            ax.axvline(t, color=color, lw=0.9, ls="-.", label=f"{label} ({t:.1f} s)")
    ax.set_xlabel(f"s since the kill of {r.get('victim')} ({r.get('kill_mode')})")
    ax.set_ylabel("GiB")
    ax.set_title(title or (f"Failover: {fmt_size(size)} model, replicas {r.get('replicas')}, {r.get('nodes')} nodes @ "
                           f"{node_rate / 1e6:.0f} Mbit/s (total {_t(r.get('total_s'))}, {r.get('ratio', '-')}x the bound)"), fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlim(left=-1)


def plot_failover(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    draw_failover(ax, r)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish_failover(r: dict[str, Any], a: argparse.Namespace, out: Path) -> int:
    text = report_failover(r, a)
    print(text)
    line = json.dumps(summary_failover(r), default=str)
    print(line)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / "failover.md").write_text(text + "\n")
    (out / f"failover-{stamp}.json").write_text(json.dumps(r, indent=1, default=str))
    with open(out / "failover.jsonl", "a") as f:
        f.write(line + "\n")
    plot_path = a.plot or out / f"failover-{stamp}.png"
    try:
        if "holders" in r:
            plot_failover(r, plot_path)
            log(f"plot: {plot_path}")
    except ImportError as e:
        log(f"no plot (matplotlib missing: {e})")
    log(f"results: {out}/failover.md, failover-{stamp}.json, failover.jsonl")
    return 0 if r.get("ok") else 1


# --- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1G"), help="model size (default 1G; 256M for a quick run)")
    p.add_argument("--nodes", type=int, default=8, help="node namespaces (default 8, at most 200)")
    p.add_argument("--skip-torrent", action="store_true", help="do not run the libtorrent swarm")
    p.add_argument("--methods", default="cached,torrent,direct", help="which methods, in this order (default cached,torrent,direct)")
    p.add_argument("--origin-rate", type=parse_rate, default=parse_rate("200mbit"))
    p.add_argument("--node-rate", type=parse_rate, default=parse_rate("1gbit"))
    p.add_argument("--piece-size", type=parse_size, default=parse_size("16M"), help="cached --piece-size (default 16M, the daemon's default)")
    p.add_argument("--origin-connections", type=int, default=8, help="cached origins.http.connections per node (default 8, the daemon's default)")
    p.add_argument("--stall-timeout", type=float, default=0, help="cached peer.stall_timeout_s (default: the daemon's own)")
    p.add_argument("--gossip-interval", type=float, default=0.5, help="cached peer.gossip_interval_s (default 0.5)")
    p.add_argument("--timeout", type=float, default=1200, help="global deadline in seconds (default 1200)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/cbench"), help="model file, node data, logs (default /var/tmp/cbench)")
    p.add_argument("--out", type=Path, default=None, help="write results JSON and Markdown here (default WORKDIR/results)")
    p.add_argument("--plot", type=Path, default=None,
                   help="plot file (default docs/bench-cluster.png; failover: WORKDIR/results/failover.png)")
    p.add_argument("--cached-python", type=Path, default=REPO / ".venv" / "bin" / "python", help="interpreter that has cached installed")
    p.add_argument("--keep", action="store_true", help="keep the daemons' cache dirs after the run")
    p.add_argument("--method-timeout", type=float, default=0,
                   help="seconds one method may take (default: 4x lower bound + 60 s; direct: 1.5x nodes x lower bound + 60 s)")
    g = p.add_argument_group("failover scenario (--scenario failover)")
    g.add_argument("--scenario", choices=("swarm", "failover"), default="swarm",
                   help="swarm (default): N nodes want the model at once, cached vs torrent vs direct; "
                        "failover: replicate --replicas R, kill a holder, time the replacement copy")
    g.add_argument("--replicas", type=int, default=2, help="catalog replicas (default 2)")
    g.add_argument("--kill", default="first",
                   help="which holder dies: first or second owner in HRW order, or a node id like n3 (default first)")
    g.add_argument("--kill-mode", choices=("process", "node"), default="process",
                   help="process (default): SIGKILL the daemon (its host still answers with RST); "
                        "node: also take its link down first (a vanished host: connections time out)")
    g.add_argument("--cached-src", default="tree", metavar="tree|head|DIR",
                   help="tree (default): daemons run cached/ as it is in this checkout; head: a copy of the committed "
                        "cached/ at HEAD (git archive into WORKDIR/src-SHA), unaffected by uncommitted edits; "
                        "DIR: a directory holding a cached/ package (a patched copy), put on the daemons' PYTHONPATH")
    g.add_argument("--suspect-after", type=float, default=0, help="cached peer.suspect_after_s (default: the daemon's own)")
    g.add_argument("--dead-after", type=float, default=0, help="cached peer.dead_after_s (default: the daemon's own)")
    p.add_argument("--cached-variant", action="append", default=[], metavar="LABEL=[PYTHONPATH][;piece_size=4M][;connections=2][;stall_timeout=60]",
                   help="also run cached from another source tree (a patched copy) and/or with other settings, "
                        "reported as 'cached (LABEL)'; repeatable")
    return p


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        ROLES[sys.argv[1]](sys.argv[2:])
        return 0
    a = build_parser().parse_args()
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.variants = {}
    for spec in a.cached_variant:  # LABEL=[PYTHONPATH][;piece_size=4M][;connections=2][;stall_timeout=60]
        label, _, rest = spec.partition("=")
        path, *opts = rest.split(";")
        v: dict[str, Any] = {"path": path}
        for o in opts:
            k, _, val = o.partition("=")
            v[k] = parse_size(val) if k == "piece_size" else int(val) if k == "connections" else float(val)
        a.variants[label] = v
    if "cached" in a.methods:
        at = a.methods.index("cached") + 1
        a.methods[at:at] = [f"cached:{label}" for label in a.variants]
    if any(m not in METHODS and not m.startswith("cached:") for m in a.methods) or not 1 <= a.nodes <= 200:
        print("bench-cluster: --methods takes cached,torrent,direct; --nodes 1..200", file=sys.stderr)
        return 2
    if a.scenario == "failover" and not 1 <= a.replicas < a.nodes:
        print("bench-cluster: failover needs 1 <= --replicas < --nodes (a survivor must be free to take over)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench-cluster: needs root (ip netns, tc)", file=sys.stderr)
        return 2
    for tool in ("ip", "tc", "curl"):
        if shutil.which(tool) is None:
            print(f"bench-cluster: '{tool}' not found (apt-get install iproute2 curl)", file=sys.stderr)
            return 2
    a.workdir.mkdir(parents=True, exist_ok=True)
    a.git = git_info()  # the code the daemons run, as of the start
    a.pythonpath = ""
    if a.scenario == "failover" and a.cached_src == "head":
        try:
            a.pythonpath, a.git = export_head(a.workdir)
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            print(f"bench-cluster: cannot export HEAD's cached/: {e}", file=sys.stderr)
            return 2
    elif a.scenario == "failover" and a.cached_src != "tree":
        src = Path(a.cached_src).absolute()
        if not (src / "cached" / "__init__.py").is_file():
            print(f"bench-cluster: --cached-src {a.cached_src}: no cached/ package there", file=sys.stderr)
            return 2
        a.pythonpath, a.git = str(src), f"cached/ from {src} (not this checkout; HEAD is {a.git})"
    out = a.out or a.workdir / "results"
    driver = Driver(a)

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(f"bench-cluster: stopped by signal {signum}")

    def on_alarm(signum: int, frame: Any) -> None:
        raise SystemExit(f"bench-cluster: global timeout ({a.timeout:.0f}s) reached")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    teardown_network()  # leftovers of an earlier run (only names with our prefix)
    signal.alarm(int(a.timeout) + 60)  # a hard stop beyond the per-step deadlines
    results: list[MethodResult] = []
    try:
        results = asyncio.run(driver.run())
    finally:
        signal.alarm(0)
        driver.kill_all_sync()
        teardown_network()
        if not a.keep:
            for d in ("nodes-cached", "nodes-failover", "direct", "torrent"):
                shutil.rmtree(a.workdir / d, ignore_errors=True)
    if a.scenario == "failover":
        return finish_failover(driver.failover, a, out)
    a.plot = a.plot or REPO / "docs" / "bench-cluster.png"
    text = report(results, a)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({
        "size": a.size, "nodes": a.nodes, "origin_rate": a.origin_rate, "node_rate": a.node_rate, "piece_size": a.piece_size,
        "origin_connections": a.origin_connections, "variants": a.variants, "gossip_interval_s": a.gossip_interval, "cpus": os.cpu_count(),
        "git": a.git,
        "results": [r.__dict__ for r in results],
    }, indent=1, default=str))
    try:
        plot(results, a, a.plot)
        log(f"plot: {a.plot}; results: {out}")
    except ImportError as e:
        log(f"no plot (matplotlib missing: {e})")
    return 0 if all(r.ok or r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
