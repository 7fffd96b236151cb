"""Benchmark: ``cachectl prefetch --wait`` of one large file vs ``curl -o`` of the same file.

Everything runs on 127.0.0.1: a static file server (nginx if installed, else aiohttp's
``web.static``, which answers with sendfile and honours Range), one ``cached`` daemon per
configuration (``--no-mdns``, API on a unix socket), and curl. Runs alternate between curl and
the daemon(s) and the medians are reported, since the page cache cannot be reliably dropped.
Every timed run starts the same way (sync, pause, source re-read into the page cache), and the CPU
that other processes used during it is measured and printed: on a shared machine that is what
skews the figures most.

The primary figure is throughput(cached) / throughput(curl + fsync of its output): the daemon's
number includes BLAKE3 verification of every piece and the fsync of the blob, so curl is charged
the fsync too. The ratio against curl alone is printed as well. Target: >= 0.8.

Run through ``scripts/bench`` (it creates the venv when missing). ``--help`` for options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's cached, even where the venv has another installed
FILE_NAME = "file.bin"
SMALL_NAME = "small.bin"  # 1 MiB: what a prefetch costs besides moving bytes
TARGET = 0.8
NOISY_CPUS = 0.10  # a timed run during which other processes used more CPU than this is skewed
SWEEP = ("4M:8", "64M:8", "16M:2", "16M:4", "16M:16")


# --- small helpers ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    from cached.types import parse_size as _parse

    return _parse(text)


def fmt_size(n: int) -> str:
    for unit, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blake3_file(path: Path) -> str:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(path))
    return h.hexdigest()


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all CPUs that was busy over ``seconds`` (from /proc/stat); -1 where unavailable."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return -1.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


class OtherWork:
    """User CPU time spent by processes that are not the benchmark's, over one timed run.

    Other work on a 2-CPU machine skews the figures badly, and a load check before the runs does
    not see work that starts in the middle. total user time (/proc/stat) - our user time (the
    server's and daemons' /proc/PID/stat, plus reaped children: curl, cachectl) = someone else's.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def _snap(self) -> tuple[float, float]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:3]]
            total = (v[0] + v[1]) / self.TICK
            ours = (
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
                + resource.getrusage(resource.RUSAGE_SELF).ru_utime
            )
            for pid in self.pids:
                with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                    ours += int(f.read().rpartition(")")[2].split()[11]) / self.TICK
            return total, ours
        except (OSError, ValueError):
            return 0.0, 0.0

    def __enter__(self) -> OtherWork:
        self._t0 = time.monotonic()
        self._start = self._snap()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._snap()
        wall = max(1e-6, time.monotonic() - self._t0)
        self.cores = max(0.0, (end[0] - self._start[0]) - (end[1] - self._start[1])) / wall


def wait_idle(limit_s: float, threshold: float = 0.10) -> float:
    """Wait (up to ``limit_s``) until other work on the machine leaves the CPUs idle; returns the busy share seen."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        log(f"machine busy ({busy:.0%} of CPUs used by other work); waiting for it to quiet down")
        time.sleep(10)
        busy = cpu_busy()
    return busy


def settle(src: Path, pause_s: float) -> None:
    """Give every timed run the same start: no dirty pages left by the previous contender (its
    writeback would be billed to the next), the source resident in the page cache, and a pause.

    The pause matters on VMs: memory freed by the previous run (its output file was deleted) is
    handed back to the host after a few seconds (virtio-balloon free page reporting), and a run
    that starts before that reuses warm memory and looks much faster than one that starts after.
    """
    os.sync()
    time.sleep(pause_s)
    warm(src)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None, logfile: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile and logfile.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout_s:.0f}s")


def stop_proc(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


# --- the source file ----------------------------------------------------------------------------


def make_source(path: Path, size: int) -> str:
    """Random bytes (incompressible, no repeated pieces); returns their BLAKE3 hex."""
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    chunk = 16 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            h.update(data)
            f.write(data)
            left -= len(data)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def warm(path: Path) -> None:
    """Read the source once so that both contenders are served from the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


# --- static servers -----------------------------------------------------------------------------


def serve_aiohttp(root: str) -> None:
    """``bench.py _serve ROOT``: aiohttp static server on 127.0.0.1:0; prints the port; runs until SIGTERM."""
    from aiohttp import web

    async def main() -> None:
        app = web.Application()
        app.router.add_static("/", root, show_index=False, follow_symlinks=False)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(port, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


@dataclass
class Server:
    kind: str
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{FILE_NAME}"

    def stop(self) -> None:
        stop_proc(self.proc)


def start_aiohttp(work: Path, root: Path) -> Server:
    logf = open(work / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "_serve", str(root)],
        stdout=subprocess.PIPE,
        stderr=logf,
        cwd=work,
    )
    logf.close()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20.0)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        stop_proc(proc)
        raise RuntimeError(f"aiohttp static server did not start: {(work / 'server.log').read_text()[-2000:]}")
    return Server("aiohttp web.static (sendfile)", int(line), proc)


def start_nginx(work: Path, root: Path, nginx: str) -> Server:
    port = free_port()
    ndir = work / "nginx"
    ndir.mkdir()
    user = "user root root;" if os.geteuid() == 0 else ""
    temps = "\n".join(f"    {k}_temp_path {ndir}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = ndir / "nginx.conf"
    conf.write_text(
        f"""{user}
worker_processes 1;
daemon off;
pid {ndir}/nginx.pid;
error_log {ndir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
{temps}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""
    )
    logf = open(work / "server.log", "wb")
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(ndir), "-e", str(ndir / "error.log")], stdout=logf, stderr=logf
    )
    logf.close()

    def up() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    try:
        wait_for(up, 20.0, "nginx", proc, work / "server.log")
    except RuntimeError:
        stop_proc(proc)
        raise
    return Server("nginx (sendfile)", port, proc)


# --- contenders ---------------------------------------------------------------------------------


@dataclass
class Variant:
    label: str
    piece: int | None  # None: the daemon's default
    connections: int | None
    from_peer: bool = False  # pull from one peer daemon that already holds the file, not the server

    @classmethod
    def parse(cls, spec: str) -> Variant:
        piece_s, _, conn_s = spec.partition(":")
        piece = parse_size(piece_s) if piece_s else None
        conn = int(conn_s) if conn_s else None
        return cls(f"cached piece={fmt_size(piece) if piece else 'default'} conn={conn or 'default'}", piece, conn)


@dataclass
class Daemon:
    variant: Variant
    work: Path
    proc: subprocess.Popen | None = None
    times: list[float] = field(default_factory=list)
    node_id: str = "bench"
    peer_port: int = 0  # 0: any free port
    cluster: str = ""  # extra TOML: token file and seeds when this daemon has peers

    @property
    def sock(self) -> Path:
        return self.work / "api.sock"

    @property
    def cache_dir(self) -> Path:
        return self.work / "cache"

    @property
    def log_path(self) -> Path:
        return self.work / "daemon.log"

    def start(self) -> None:
        self.work.mkdir(parents=True)
        cfg = self.work / "config.toml"
        # An explicit file, so that a host's /etc/cached/config.toml never leaks into the numbers.
        text = (
            f"[origins.http]\nconnections = {self.variant.connections}\n"
            if self.variant.connections
            else "# defaults\n"
        )
        cfg.write_text(text + self.cluster)
        argv = [
            sys.executable,
            "-m",
            "cached",
            "--config",
            str(cfg),
            "--node-id",
            self.node_id,
            "--cache-dir",
            str(self.cache_dir),
            "--api-listen",
            f"unix:{self.sock}",
            "--peer-listen",
            f"127.0.0.1:{self.peer_port}",
            "--no-mdns",
            "--hf-endpoint",
            "http://127.0.0.1:9",
        ]
        if self.variant.piece:
            argv += ["--piece-size", str(self.variant.piece)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=logf, stderr=logf, env=env, cwd=self.work)
        logf.close()
        wait_for(
            lambda: self.sock.exists() and self.cachectl("status", check=False, timeout_s=10).returncode == 0,
            30.0,
            f"daemon {self.variant.label}",
            self.proc,
            self.log_path,
        )

    def cachectl(self, *args: str, check: bool = True, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        r = subprocess.run(
            [sys.executable, "-m", "cached.cli", "--api", f"unix:{self.sock}", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise RuntimeError(
                f"cachectl {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}\n"
                f"daemon log tail:\n{self.log_path.read_text(errors='replace')[-2000:]}"
            )
        return r

    def stop(self) -> None:
        stop_proc(self.proc)


def run_curl(url: str, out: Path, timeout_s: float) -> tuple[float, float]:
    """(seconds for curl alone, seconds for curl + fsync of the output)."""
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(
        ["curl", "-s", "-S", "-f", "--max-time", str(int(timeout_s)), "-o", str(out), url],
        check=True,
        timeout=timeout_s + 10,
        stdin=subprocess.DEVNULL,
    )
    t1 = time.perf_counter()
    fsync_path(out)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def run_cached(
    d: Daemon, url: str, timeout_s: float, py_spy: str | None, profile_out: Path | None
) -> tuple[float, Path]:
    spy = None
    if py_spy and profile_out and d.proc is not None:
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(d.proc.pid),
                "--rate",
                "100",
                "--threads",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(profile_out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(d.work / "py-spy.log", "wb"),
        )
        time.sleep(1.0)  # let py-spy attach before the clock starts
    try:
        t0 = time.perf_counter()
        r = d.cachectl("prefetch", "--wait", "--timeout", str(int(timeout_s)), url, timeout_s=timeout_s + 30)
        t1 = time.perf_counter()
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
    return t1 - t0, Path(r.stdout.strip())


def start_seeder(work: Path, url: str, puller: Daemon) -> Daemon:
    """A daemon that fetches the file once from the server (untimed) and then serves it to
    ``puller`` as its only peer. Both share a cluster token; the puller has it as its seed."""
    token = work / "cluster.token"
    token.write_text("bench-" + os.urandom(16).hex() + "\n")
    token.chmod(0o600)
    seeder = Daemon(Variant("seeder", None, None), work / "seeder", node_id="seeder", peer_port=free_port())
    seeder.cluster = f'\n[cluster]\ntoken_file = "{token}"\n'
    puller.node_id = "puller"
    puller.cluster = f'\n[cluster]\ntoken_file = "{token}"\n\n[peer]\nseeds = ["127.0.0.1:{seeder.peer_port}"]\n'
    seeder.start()
    seeder.cachectl("prefetch", "--wait", url, timeout_s=600)
    log("seeder holds the file")
    return seeder


def peer_alive(d: Daemon, node_id: str) -> bool:
    r = d.cachectl("--json", "peers", check=False, timeout_s=10)
    if r.returncode != 0:
        return False
    try:
        peers = json.loads(r.stdout)
    except ValueError:
        return False
    rows = peers.get("peers", peers) if isinstance(peers, dict) else peers
    return any(isinstance(p, dict) and p.get("node_id") == node_id and p.get("state") == "alive" for p in rows)


def evict(d: Daemon, url: str) -> None:
    d.cachectl("evict", url, "--force")
    left = [p for p in (d.cache_dir / "blobs").rglob("*") if p.is_file()] if (d.cache_dir / "blobs").exists() else []
    if left:
        raise RuntimeError(f"evict left blobs behind: {left[:3]}")


# --- s3:// from an S3 server on loopback (--s3) -------------------------------------------------

S3_BUCKET = "bench"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}  # s3rver's built-in key
S3RVER_VERSION = "3.7.1"


def s3rver_bin(explicit: str | None) -> str:
    """The s3rver binary: --s3rver-bin, else the one scripts/bench installed under $REPO/.bench-tools."""
    path = explicit or str(REPO / ".bench-tools" / "node_modules" / ".bin" / "s3rver")
    if not Path(path).exists():
        raise SystemExit(f"bench: {path} missing; run through scripts/bench --s3 (it installs s3rver with npm)")
    return path


def start_s3rver(work: Path, binary: str) -> tuple[subprocess.Popen, str]:
    """s3rver (an S3-compatible server on Node.js, objects as files under ``work``) on 127.0.0.1.
    moto's server is what the tests use, but it copies a whole object into memory for every
    ranged GET, so it cannot serve gigabytes; s3rver streams ranges from its files."""
    data = work / "s3rver"
    data.mkdir()
    port = free_port()
    logf = open(work / "s3rver.log", "ab")
    proc = subprocess.Popen(
        [binary, "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "--silent", "--configure-bucket", S3_BUCKET],
        stdout=logf,
        stderr=logf,
        stdin=subprocess.DEVNULL,
    )
    logf.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(up, 30.0, "s3rver", proc, work / "s3rver.log")
    return proc, url


def boto3_client(url: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))


def run_boto3(url: str, out: Path) -> tuple[float, float]:
    """boto3's own download (``download_file``, default TransferConfig: 8 MiB parts, 10 threads),
    as ``aws s3 cp`` does it: (seconds alone, seconds + fsync of the output)."""
    client = boto3_client(url)
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    client.download_file(S3_BUCKET, FILE_NAME, str(out))
    t1 = time.perf_counter()
    fsync_path(out)
    t2 = time.perf_counter()
    client.close()
    return t1 - t0, t2 - t0


def main_s3(args: argparse.Namespace, size: int) -> int:
    """cached's ``prefetch --wait s3://bench/file.bin`` vs boto3's ``download_file`` of the same
    object from the same loopback S3 server into the same disk, alternating, medians."""
    os.environ.update({**S3_KEYS, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    parent = Path(args.tmpdir)
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=parent))
    server: subprocess.Popen | None = None
    daemon: Daemon | None = None
    try:
        src = work / FILE_NAME
        log(f"work dir {work}; writing {fmt_size(size)} of random bytes")
        src_b3 = make_source(src, size)
        server, url = start_s3rver(work, s3rver_bin(args.s3rver_bin))
        log(f"s3rver at {url}; uploading the object")
        client = boto3_client(url)
        client.upload_file(str(src), S3_BUCKET, FILE_NAME)
        client.close()
        src.unlink()  # the server's copy is the source now
        ref = f"s3://{S3_BUCKET}/{FILE_NAME}"
        daemon = Daemon(Variant("cached (defaults)", None, None), work / "daemon")
        daemon.cluster = f'\n[origins.s3]\nendpoint_url = "{url}"\n'
        daemon.start()
        out = work / "boto3.out"
        pids = [server.pid, daemon.proc.pid]  # type: ignore[union-attr]
        boto_alone: list[float] = []
        boto_sync: list[float] = []
        cached_t: list[float] = []
        verified = False
        for run in range(-args.warmup, args.runs):
            tag = "warm-up" if run < 0 else f"run {run + 1}"
            order = ["boto3", "cached"] if run % 2 == 0 else ["cached", "boto3"]
            for c in order:
                os.sync()
                time.sleep(args.pause)
                watch = OtherWork(pids)
                if c == "boto3":
                    with watch:
                        a, b = run_boto3(url, out)
                    if out.stat().st_size != size:
                        raise RuntimeError(f"boto3 wrote {out.stat().st_size} bytes, expected {size}")
                    out.unlink()
                    log(f"{tag}: boto3 download_file {a:.2f}s, +fsync {b:.2f}s (other work: {watch.cores:.2f} CPUs)")
                    if run >= 0:
                        boto_alone.append(a)
                        boto_sync.append(b)
                    continue
                with watch:
                    t, path = run_cached(daemon, ref, args.timeout, None, None)
                if not verified:
                    got = blake3_file(path / FILE_NAME)
                    if got != src_b3:
                        raise RuntimeError(f"{path}: BLAKE3 {got} != source {src_b3}")
                    verified = True
                    log(f"verified: the view has the source's BLAKE3 {src_b3[:16]}...")
                evict(daemon, ref)
                log(f"{tag}: cached prefetch {t:.2f}s (other work: {watch.cores:.2f} CPUs)")
                if run >= 0:
                    cached_t.append(t)
        mb = size / 1e6
        print()
        print(
            f"object {fmt_size(size)} ({size} bytes) from s3rver {S3RVER_VERSION} on loopback, {args.runs} runs "
            f"(+{args.warmup} warm-up), medians; {os.cpu_count()} CPUs; Python {platform.python_version()}"
        )
        print(f"{'method':<34} {'median s':>9} {'MB/s':>8}   runs (s)")
        for name, xs in (
            ("boto3 download_file", boto_alone),
            ("boto3 download_file + fsync", boto_sync),
            ("cached prefetch s3:// (BLAKE3, fsync)", cached_t),
        ):
            print(f"{name:<34} {median(xs):>9.2f} {mb / median(xs):>8.0f}   " + " ".join(f"{x:.2f}" for x in xs))
        ratio = median(boto_sync) / median(cached_t)
        print(
            f"s3 ratio (cached vs boto3 download_file + fsync): {ratio:.3f} -> "
            f"{'target met' if ratio >= 1.0 else 'target missed'} (target >= 1.0); "
            f"vs boto3 alone: {median(boto_alone) / median(cached_t):.3f}"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "command": " ".join(["scripts/bench", *sys.argv[1:]]),
                        "size_bytes": size,
                        "server": f"s3rver {S3RVER_VERSION}",
                        "boto3_s": boto_alone,
                        "boto3_fsync_s": boto_sync,
                        "cached_s": cached_t,
                        "ratio_vs_boto3_fsync": ratio,
                    },
                    indent=2,
                )
                + "\n"
            )
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        stop_proc(server)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                parent.rmdir()


# --- main ---------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2G", help="file size, binary units (default 2G)")
    p.add_argument("--runs", type=int, default=3, help="runs per contender; medians are reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every contender first (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (source, logs, caches) and print its path")
    p.add_argument(
        "--server",
        choices=("auto", "aiohttp", "nginx"),
        default="auto",
        help="static server; auto = nginx if installed, else aiohttp (default auto)",
    )
    p.add_argument("--nginx-bin", metavar="PATH", help="nginx binary to use (default: nginx on PATH or in /usr/sbin)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="PIECE:CONN",
        help="extra daemon setting to measure, e.g. 4M:8 (piece size : transfer.connections); repeatable",
    )
    p.add_argument("--sweep", action="store_true", help=f"add the variants {' '.join(SWEEP)}")
    p.add_argument(
        "--peer",
        action="store_true",
        help="add 'cached from 1 peer': a second daemon pulls the file from one peer daemon that holds it",
    )
    p.add_argument(
        "--tmpdir",
        default=os.environ.get("BENCH_TMPDIR") or str(REPO / "bench-out"),
        help="parent of the work dir; must be on the filesystem under test (default $REPO/bench-out)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="bound on any one transfer, seconds (default 600)")
    p.add_argument(
        "--py-spy", metavar="PATH", help="py-spy binary: record the daemon during its first run (raw stacks)"
    )
    p.add_argument(
        "--pause",
        type=float,
        default=3.0,
        metavar="S",
        help="pause before every timed run, after a sync (default 3; see settle() for why)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before the runs and before each timed run, wait up to S seconds for the CPUs to be idle",
    )
    p.add_argument(
        "--retry-noisy",
        type=int,
        default=2,
        metavar="N",
        help=f"repeat a timed run up to N times while other work used > {NOISY_CPUS} CPUs during it (default 2)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="run the whole benchmark (server, daemons, curl) at this nice value; a negative one "
        "(root) keeps other work on a shared machine from skewing the figures",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--s3",
        action="store_true",
        help="instead: an s3:// object from an S3 server on loopback (s3rver) vs boto3's download_file (target >= 1.0)",
    )
    p.add_argument("--s3rver-bin", metavar="PATH", help="s3rver binary (default: the one scripts/bench --s3 installs)")
    args = p.parse_args(argv)

    size = parse_size(args.size)
    if size <= 0 or args.runs < 1 or args.warmup < 0:
        p.error("--size and --runs must be positive, --warmup not negative")
    if args.s3:
        return main_s3(args, size)
    variants = [Variant("cached (defaults)", None, None)]
    if args.peer:
        variants.append(Variant("cached from 1 peer", None, None, from_peer=True))
    for spec in [*(SWEEP if args.sweep else ()), *args.variant]:
        try:
            variants.append(Variant.parse(spec))
        except ValueError as e:
            p.error(f"--variant {spec!r}: {e}")

    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every child started below
        except OSError as e:
            log(f"cannot set nice {args.nice}: {e.strerror}; running at the default priority")
    # SIGTERM (a CI timeout, a kill) unwinds like ^C, so that the daemons, the server and the work dir are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    parent = Path(args.tmpdir)
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=parent))
    os.chmod(work, 0o755)  # nginx workers may run as another user
    server: Server | None = None
    daemons: list[Daemon] = []
    seeder: Daemon | None = None
    started = dt.datetime.now(dt.UTC)
    try:
        root = work / "www"
        root.mkdir()
        src = root / FILE_NAME
        log(f"work dir {work}; writing {fmt_size(size)} of random bytes")
        src_b3 = make_source(src, size)
        make_source(root / SMALL_NAME, 1 << 20)
        warm(src)

        nginx = args.nginx_bin or shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
        if args.server == "nginx" or (args.server == "auto" and nginx):
            if not nginx:
                p.error("--server nginx: nginx is not installed")
            server = start_nginx(work, root, nginx)
        else:
            server = start_aiohttp(work, root)
        url = server.url
        log(f"static server: {server.kind} at {url}")

        for i, v in enumerate(variants):
            d = Daemon(v, work / f"daemon-{i}")
            if v.from_peer:
                seeder = start_seeder(work, url, d)
            daemons.append(d)
            d.start()
        log(f"{len(daemons)} daemon(s) ready")
        if seeder is not None:
            wait_for(lambda: peer_alive(daemons[-1], seeder.node_id), 30.0, "the puller to see its peer")

        busy_before = wait_idle(args.wait_idle)
        if busy_before > 0.10:
            log(f"WARNING: {busy_before:.0%} of the CPUs are busy with other work; the figures will be skewed")

        # cachectl's own cost (interpreter start, imports, one RPC): part of every cached figure.
        overhead = []
        for _ in range(3):
            t0 = time.perf_counter()
            daemons[0].cachectl("status")
            overhead.append(time.perf_counter() - t0)

        curl_alone: list[float] = []
        curl_sync: list[float] = []
        other: list[float] = []  # CPUs used by other processes during each timed run
        verified_by: set[int] = set()  # id() of each contender whose first copy was checked
        out = work / "curl.out"
        pids = [server.proc.pid, *(d.proc.pid for d in [*daemons, *([seeder] if seeder else [])] if d.proc)]

        def timed(c: object, profile: Path | None) -> tuple[tuple[float, ...], float]:
            """One timed transfer by ``c``: (seconds..., CPUs of other work meanwhile)."""
            settle(src, args.pause)
            if args.wait_idle:
                wait_idle(args.wait_idle)
            watch = OtherWork(pids)
            if c == "curl":
                with watch:
                    a, s = run_curl(url, out, args.timeout)
                if out.stat().st_size != size:
                    raise RuntimeError(f"curl wrote {out.stat().st_size} bytes, expected {size}")
                out.unlink()
                return (a, s), watch.cores
            assert isinstance(c, Daemon)
            with watch:
                t, path = run_cached(c, url, args.timeout, args.py_spy, profile)
            if id(c) not in verified_by:
                view = path / FILE_NAME if path.is_dir() else path
                got = blake3_file(view)
                if got != src_b3:
                    raise RuntimeError(f"{view}: BLAKE3 {got} != source {src_b3}")
                verified_by.add(id(c))
                log(f"verified: {view} has the source's BLAKE3 {src_b3[:16]}...")
            if c.variant.from_peer:
                sources = json.loads(c.cachectl("--json", "status", url).stdout).get("sources", {})
                if sources.get("origin", 0) or sources.get("peer", 0) != size:
                    raise RuntimeError(f"the peer pull was not all from the peer: sources {sources}")
            evict(c, url)
            return (t,), watch.cores

        for run in range(-args.warmup, args.runs):
            warmup = run < 0
            tag = "warm-up" if warmup else f"run {run + 1}"
            contenders: list[object] = ["curl", *daemons]
            shift = run % len(contenders)  # rotate who goes first: no one always gets a cold or a warm start
            for c in contenders[shift:] + contenders[:shift]:
                name = "curl" if c == "curl" else c.variant.label  # type: ignore[union-attr]
                prof = work / f"py-spy-{daemons.index(c)}.txt" if run == 0 and isinstance(c, Daemon) else None
                best: tuple[tuple[float, ...], float] | None = None
                for _attempt in range(1 + (0 if warmup else args.retry_noisy)):
                    vals, cores = timed(c, prof)
                    shown = f"{vals[0]:.2f}s, curl+fsync {vals[1]:.2f}s" if c == "curl" else f"{vals[0]:.2f}s"
                    noisy = cores > NOISY_CPUS
                    log(f"{tag}: {name} {shown} (other work: {cores:.2f} CPUs{'; noisy' if noisy else ''})")
                    if best is None or cores < best[1]:
                        best = (vals, cores)  # keep the attempt least disturbed by other work
                    if not noisy:
                        break
                    prof = None
                vals, cores = best
                if warmup:
                    continue
                other.append(cores)
                if c == "curl":
                    curl_alone.append(vals[0])
                    curl_sync.append(vals[1])
                else:
                    c.times.append(vals[0])  # type: ignore[union-attr]

        # Fixed cost of one prefetch (cachectl start, HEAD, preallocation, the fsyncs of publishing).
        small_url = url.rsplit("/", 1)[0] + "/" + SMALL_NAME
        fixed = []
        for _ in range(3):
            settle(src, args.pause)
            t, _ = run_cached(daemons[0], small_url, args.timeout, None, None)
            evict(daemons[0], small_url)
            fixed.append(t)

        # --- report -----------------------------------------------------------------------------
        mb = size / 1e6
        base_sync, base_alone = median(curl_sync), median(curl_alone)
        rows = [("curl -o", base_alone, curl_alone), ("curl -o + fsync", base_sync, curl_sync)]
        rows += [(d.variant.label, median(d.times), d.times) for d in daemons]
        print()
        print(
            f"file {fmt_size(size)} ({size} bytes), {args.runs} runs (+{args.warmup} warm-up), medians; server: {server.kind}; "
            f"{os.cpu_count()} CPUs; Python {platform.python_version()}; nice {os.getpriority(os.PRIO_PROCESS, 0)}"
        )
        print(f"{'method':<34} {'median s':>9} {'MB/s':>8} {'vs curl+fsync':>14} {'vs curl':>8}   runs (s)")
        for name, t, raw in rows:
            print(
                f"{name:<34} {t:>9.2f} {mb / t:>8.0f} {base_sync / t:>14.2f} {base_alone / t:>8.2f}   "
                + " ".join(f"{x:.2f}" for x in raw)
            )
        busy_after = cpu_busy(1.0)
        worst = max(other, default=0.0)
        print(
            f"other work on the machine: {busy_before:.0%} of the CPUs busy before the runs, {busy_after:.0%} after; "
            f"during the timed runs up to {worst:.2f} CPUs of user time (median {median(other):.2f})"
            + (
                "  <-- other work was running: figures are skewed"
                if max(busy_before, busy_after) > 0.10 or worst > NOISY_CPUS
                else ""
            )
        )
        print(
            f"(cachectl start + one RPC, included in every cached figure: median {median(overhead):.2f}s; "
            f"a whole prefetch of a 1 MiB file: median {median(fixed):.2f}s)"
        )
        ratio = base_sync / median(daemons[0].times)
        met = ratio >= TARGET
        print(
            f"primary ratio (cached defaults vs curl+fsync): {ratio:.3f} -> "
            f"{'target met' if met else 'target missed'} (target >= {TARGET})"
        )
        peer_ratio = None
        if seeder is not None:
            peer_ratio = base_sync / median(daemons[-1].times)
            print(
                f"peer ratio (cached from 1 peer vs curl+fsync from {server.kind.split()[0]}): {peer_ratio:.3f} -> "
                f"{'target met' if peer_ratio >= TARGET else 'target missed'} (target >= {TARGET}); every byte came from the peer"
            )

        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "date": started.isoformat(timespec="seconds"),
                        "command": " ".join(["scripts/bench", *(argv if argv is not None else sys.argv[1:])]),
                        "size_bytes": size,
                        "runs": args.runs,
                        "warmup": args.warmup,
                        "pause_s": args.pause,
                        "nice": os.getpriority(os.PRIO_PROCESS, 0),
                        "server": server.kind,
                        "cpus": os.cpu_count(),
                        "background_cpu_before": busy_before,
                        "background_cpu_after": busy_after,
                        "other_work_cpus_per_run": other,
                        "curl_s": curl_alone,
                        "curl_fsync_s": curl_sync,
                        "cachectl_overhead_s": overhead,
                        "prefetch_1mib_s": fixed,
                        "cached": {d.variant.label: d.times for d in daemons},
                        "ratio_vs_curl_fsync": ratio,
                        "ratio_vs_curl": base_alone / median(daemons[0].times),
                        "target_met": met,
                        "peer_ratio_vs_curl_fsync": peer_ratio,
                    },
                    indent=2,
                )
                + "\n"
            )
        return 0
    finally:
        for d in [*daemons, *([seeder] if seeder else [])]:
            d.stop()
        if server is not None:
            server.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if empty


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_serve":
        serve_aiohttp(sys.argv[2])
    else:
        try:
            sys.exit(main())
        except KeyboardInterrupt:
            sys.exit(130)
