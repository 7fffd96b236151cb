"""mDNS discovery for real, inside a private network namespace the test creates and removes.

The namespace has only its own loopback (multicast switched on, 224.0.0.0/4 routed to it), so
zeroconf's announcements never leave it. Daemons started there with mDNS on and no seeds find each
other (``cachectl --json peers`` lists the others alive); a daemon of another cluster name on the
same segment is never listed, and lists no one. Needs root and ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.node import REPO

pytestmark = [pytest.mark.system, pytest.mark.netns]

TOKEN = "netns-cluster-token-0123456789abcdef"
DEADLINE_S = 40.0


def run(*argv: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs the ip command (iproute2)")
    name = f"cached-t-{secrets.token_hex(4)}"
    r = run("ip", "netns", "add", name)
    if r.returncode != 0:
        pytest.skip(f"ip netns add failed: {r.stderr.strip()}")
    try:
        for cmd in (("ip", "link", "set", "lo", "up"), ("ip", "link", "set", "lo", "multicast", "on"), ("ip", "route", "add", "224.0.0.0/4", "dev", "lo")):
            r = run("ip", "netns", "exec", name, *cmd)
            if r.returncode != 0:
                pytest.skip(f"cannot prepare the namespace ({' '.join(cmd)}): {r.stderr.strip()}")
        yield name
    finally:
        run("ip", "netns", "del", name)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


class NsNode:
    """``python -m cached`` inside the namespace, API on a unix socket, mDNS on, no seeds."""

    def __init__(self, ns: str, workdir: Path, node_id: str, host: str, cluster: str) -> None:
        self.ns, self.node_id, self.host, self.cluster = ns, node_id, host, cluster
        self.dir = workdir / node_id
        self.dir.mkdir(parents=True)
        self.socket = self.dir / "api.sock"
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"unix:{self.socket}"

    def start(self, token_file: Path, config: Path) -> None:
        argv = [
            "ip", "netns", "exec", self.ns, sys.executable, "-m", "cached",
            "--config", str(config),
            "--node-id", self.node_id,
            "--cache-dir", str(self.dir / "cache"),
            "--api-listen", self.api,
            "--peer-listen", f"{self.host}:0",
            "--cluster", self.cluster,
            "--cluster-token-file", str(token_file),
            "--mdns",
            "--hf-endpoint", "http://127.0.0.1:9",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=REPO)

    def cachectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "cached.cli", "--api", self.api, "--json", *args],
            capture_output=True, text=True, env=env, timeout=20, stdin=subprocess.DEVNULL,
        )

    def peers(self) -> list[dict[str, Any]] | None:
        r = self.cachectl("peers")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics``, read over the API's unix socket (no network involved)."""
        conn = _UnixHTTPConnection(str(self.socket))
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
        return f"--- {self.node_id} log ---\n" + (self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(none)")


@pytest.fixture
def nodes(netns: str, tmp_path: Path) -> Iterator[Callable[[str, str, str], NsNode]]:
    """Make nodes in the namespace; every one is stopped before the namespace goes."""
    made: list[NsNode] = []

    def make(node_id: str, host: str, cluster: str) -> NsNode:
        node = NsNode(netns, tmp_path, node_id, host, cluster)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.stop()


def poll(pred: Callable[[], Any], what: str, nodes: list[NsNode], timeout_s: float = DEADLINE_S) -> Any:
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


def test_mdns_finds_peers_of_the_same_cluster_and_ignores_another(tmp_path: Path, nodes: Callable[[str, str, str], NsNode]) -> None:
    token = tmp_path / "cluster.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text("[peer]\ngossip_interval_s = 0.3\nsuspect_after_s = 3.0\ndead_after_s = 6.0\n")

    # The stranger announces first, so the others' browsers certainly meet its service.
    stranger = nodes("stranger", "127.0.0.3", "beta")
    stranger.start(token, config)
    poll(lambda: stranger.peers() is not None, "the stranger's API", [stranger])
    a, b = nodes("node-a", "127.0.0.1", "alpha"), nodes("node-b", "127.0.0.2", "alpha")
    a.start(token, config)
    b.start(token, config)
    everyone = [stranger, a, b]

    def each_sees_the_other() -> dict[str, list[dict[str, Any]]] | None:
        seen = {"node-a": a.peers(), "node-b": b.peers()}
        other = {"node-a": "node-b", "node-b": "node-a"}
        for me, peers in seen.items():
            if peers is None or {p["node_id"]: p["state"] for p in peers}.get(other[me]) != "alive":
                return None
        return seen  # type: ignore[return-value]

    seen = poll(each_sees_the_other, "node-a and node-b to find each other by mDNS", everyone)
    by_id = {me: {p["node_id"]: p for p in peers} for me, peers in seen.items()}
    assert by_id["node-a"]["node-b"]["address"].startswith("127.0.0.2:"), by_id
    assert by_id["node-b"]["node-a"]["address"].startswith("127.0.0.1:"), by_id

    # A few more gossip rounds (the heartbeat each sees of the other moves on): still no stranger.
    hb = by_id["node-a"]["node-b"]["heartbeat"]
    poll(lambda: (p := a.peers()) is not None and any(x["node_id"] == "node-b" and x["heartbeat"] >= hb + 5 for x in p), "more gossip rounds", everyone)
    for n in (a, b):
        listed = n.peers()
        assert listed is not None
        assert [p["node_id"] for p in listed] == ["node-b" if n is a else "node-a"], f"{n.node_id} lists {listed}"
        assert all(p["state"] == "alive" for p in listed)
    assert stranger.peers() == [], "a node of another cluster finds no one"
    # mDNS itself filters by cluster: nobody even tried to gossip across the boundary.
    assert stranger.metric("cached_gossip_errors_total", kind="other_cluster") == 0
    for n in (a, b):
        assert n.metric("cached_gossip_errors_total", kind="refused") == 0, n.node_id
        assert n.metric("cached_peers", state="alive") == 1, n.node_id
        assert n.metric("cached_peer_auth_failures_total") == 0, n.node_id

    for n in everyone:
        assert n.stop() == 0, f"{n.node_id} did not stop cleanly\n{n.tail()}"
