"""A private LAN for tests that need real multicast: namespaces, a bridge, daemons on it.

Topology (the recipe of ``tests/system/test_partition_netns.py``): a switch namespace holding a
bridge, and one namespace per host with a veth whose other end is a port of the bridge. Both
ends of every veth are created inside our namespaces, addresses are in 198.18.0.0/15 and nothing
is configured in the host's namespace, so no packet (multicast included) can reach a real
interface. Each host sends from its own address, which mDNS's source check needs (on a shared
loopback every packet would come from 127.0.0.1).

``NsNode`` is ``python -m cached`` inside one host namespace, API on a unix socket, mDNS on, no
seeds. Every wait is bounded in time and count. Callers skip without root or ``ip``
(``require_netns``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.node import REPO


def sh(*argv: str, check: bool = True, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs the ip command (iproute2)")


def port_of(label: str) -> str:
    """The switch-side end of a host's veth (its cable to the switch)."""
    return f"p-{label}"[:15]


class Network:
    """A switch namespace with a bridge; ``add_host`` plugs a new namespace into it."""

    def __init__(self, net: str) -> None:
        self.net = net  # the first three octets of a /24 inside 198.18.0.0/15
        self.prefix = f"cached-t-{secrets.token_hex(3)}-"
        self.switch = self.prefix + "sw"
        self.made: list[str] = []

    def build(self) -> None:
        try:
            sh("ip", "netns", "add", self.switch)
        except RuntimeError as e:
            pytest.skip(f"ip netns add failed: {e}")
        self.made.append(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        sh("ip", "-n", self.switch, "link", "set", "lo", "up")

    def add_host(self, label: str, *octets: int) -> str:
        """A namespace named for ``label`` with eth0 holding ``{net}.{o}/24`` for each octet."""
        ns = self.prefix + label
        sh("ip", "netns", "add", ns)
        self.made.append(ns)
        port = port_of(label)
        # Created inside the switch namespace, the peer end goes straight into the host's:
        # neither end ever exists in the host machine's namespace.
        sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
        sh("ip", "-n", self.switch, "link", "set", port, "up")
        for o in octets:
            sh("ip", "-n", ns, "addr", "add", f"{self.net}.{o}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return ns

    def ip(self, octet: int) -> str:
        return f"{self.net}.{octet}"

    def teardown(self) -> None:
        """Kill what still runs in our namespaces (by pid: only processes this test started), delete them.
        The bridge and the veths live inside these namespaces and go with them."""
        for ns in self.made:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        left = set(sh("ip", "netns", "list", check=False).stdout.split()) & set(self.made)
        assert not left, f"namespaces left behind: {left}"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


class NsDaemon:
    """``python -m cached`` inside a namespace with its API on a unix socket the test reads
    directly (no network involved); the flags that differ are the caller's."""

    def __init__(self, ns: str, workdir: Path, node_id: str) -> None:
        self.ns, self.node_id = ns, node_id
        self.dir = workdir / node_id
        self.dir.mkdir(parents=True)
        self.socket = self.dir / "api.sock"
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"unix:{self.socket}"

    def launch(self, config: Path, *flags: str) -> None:
        argv = [
            *("ip", "netns", "exec", self.ns, sys.executable, "-m", "cached"),
            *("--config", str(config), "--node-id", self.node_id, "--cache-dir", str(self.dir / "cache")),
            *("--api-listen", self.api, "--hf-endpoint", "http://127.0.0.1:9"),
            *flags,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=REPO)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(none)"
        return f"--- {self.node_id} log ---\n" + "\n".join(text.splitlines()[-25:])


class NsNode(NsDaemon):
    """A daemon that finds its peers by mDNS alone: no seeds."""

    def __init__(self, ns: str, workdir: Path, node_id: str, host: str, cluster: str) -> None:
        super().__init__(ns, workdir, node_id)
        self.host, self.cluster = host, cluster

    def start(self, token_file: Path, config: Path) -> None:
        self.launch(
            config,
            *("--peer-listen", f"{self.host}:0", "--cluster", self.cluster),
            *("--cluster-token-file", str(token_file), "--mdns"),
        )

    def cachectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "cached.cli", "--api", self.api, "--json", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )

    def peers(self) -> list[dict[str, Any]] | None:
        r = self.cachectl("peers")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics``, read over the API's unix socket (no network involved)."""
        conn = UnixHTTPConnection(str(self.socket))
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0


def poll(pred: Callable[[], Any], what: str, nodes: list[NsNode], timeout_s: float = 40.0) -> Any:
    """Bounded in time and in count; fails with every node's log."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.2) + 1):
        dead = [n for n in nodes if not n.alive()]
        assert not dead, f"daemon exited while waiting for {what}:\n" + "\n".join(n.tail() for n in dead)
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n" + "\n".join(n.tail() for n in nodes))
