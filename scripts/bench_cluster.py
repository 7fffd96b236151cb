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
        self.cached_py = str(args.cached_python)

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
        kids, socks = [], []
        for i in range(1, n + 1):
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

        def session(sock: Path) -> aiohttp.ClientSession:
            return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)), timeout=aiohttp.ClientTimeout(total=None))

        sessions = []
        try:
            # Wait for every API socket, then for gossip to show every node alive everywhere.
            for _ in range(600):
                if all(s.exists() for s in socks):
                    break
                if any(k.proc.returncode is not None for k in kids):
                    raise RuntimeError("a cached daemon exited at start; see " + str(self.work / "logs"))
                await asyncio.sleep(0.1)
            sessions = [session(s) for s in socks]
            t_conv = time.monotonic()
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
            res.extra["converge_s"] = round(time.monotonic() - t_conv, 2)
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
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "bench-cluster.png")
    p.add_argument("--cached-python", type=Path, default=REPO / ".venv" / "bin" / "python", help="interpreter that has cached installed")
    p.add_argument("--keep", action="store_true", help="keep the daemons' cache dirs after the run")
    p.add_argument("--method-timeout", type=float, default=0,
                   help="seconds one method may take (default: 4x lower bound + 60 s; direct: 1.5x nodes x lower bound + 60 s)")
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
    if os.geteuid() != 0:
        print("bench-cluster: needs root (ip netns, tc)", file=sys.stderr)
        return 2
    for tool in ("ip", "tc", "curl"):
        if shutil.which(tool) is None:
            print(f"bench-cluster: '{tool}' not found (apt-get install iproute2 curl)", file=sys.stderr)
            return 2
    a.workdir.mkdir(parents=True, exist_ok=True)
    a.git = git_info()  # the code the daemons run, as of the start
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
            for d in ("nodes-cached", "direct", "torrent"):
                shutil.rmtree(a.workdir / d, ignore_errors=True)
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
