"""A network partition, for real: one owner's link goes down, the cluster re-replicates, it heals.

Topology, built by the test and deleted by it (the recipe of ``tests/support/netns.py`` and
``scripts/cbench``): a switch namespace holding a bridge, and one namespace per node
with a veth whose other end is a port of the bridge. Addresses are in 198.18.0.0/15; nothing is
configured in the host's namespace, so no packet can reach a real interface. The switch
namespace also runs a tiny static HTTP server (aiohttp, with Range) as the origin.

Three daemons (subprocesses via ``ip netns exec``, ``--no-mdns``, static seeds, a cluster token,
short gossip/suspect/dead timings from a TOML file) form a cluster; ``POST /v1/replicate`` with
``replicas = 2`` makes the two HRW owners fetch the model. Then the switch-side veth of one owner
is set down (a cut cable, no netem): the other two must declare it dead -- while never losing
sight of each other (sampled every 0.1 s: a gossip round stuck on the silent peer would stop a
node's heartbeat) -- and the third node becomes an owner and gets a ready copy from the surviving
owner (peer bytes only, none from the origin).
When the link comes back up, the cut node must be alive again in everyone's view (same process,
same incarnation: its heartbeat moving on is enough), the owners must be the original two again
on every node, and the stand-in copy must be kept but demoted (``replicas.spare``).

Needs root and ``ip netns``; skipped otherwise. Every wait is bounded in time and count.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import netns
from tests.support.netns import sh
from tests.support.node import REPO
from tests.support.origin import write_random_file

pytestmark = [pytest.mark.system, pytest.mark.netns]

TOKEN = "partition-cluster-token-0123456789abcdef"
NET = "198.18.77"  # a /24 inside 198.18.0.0/15
ORIGIN_IP = f"{NET}.1"
ORIGIN_PORT = 8080
PEER_PORT = 7471
MODEL_SIZE = 2 * 1024 * 1024 + 5
DEADLINE_S = 30.0
CONFIG = """
[peer]
gossip_interval_s = 0.25
suspect_after_s = 2.0
dead_after_s = 4.0

[origins.http]
retries = 2
backoff_s = 0.1
backoff_max_s = 0.5
"""
# The origin: aiohttp's static files (Range, ETag), bound to the switch namespace's bridge address.
ORIGIN_SCRIPT = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host=sys.argv[2], port=int(sys.argv[3]), print=lambda *a: print("ready", flush=True), access_log=None)
"""


class Network(netns.Network):
    """The shared LAN (tests/support/netns.py) with the origin's address on the switch's bridge,
    one host per node, and each node's cable to the switch that the test can pull."""

    def __init__(self, n: int) -> None:
        super().__init__(NET)
        self._n = n
        self.nodes: list[str] = []

    def ip(self, i: int) -> str:  # type: ignore[override]
        return f"{NET}.{10 + i}"

    def build(self) -> None:
        super().build()
        sh("ip", "-n", self.switch, "addr", "add", f"{ORIGIN_IP}/24", "dev", "br0")
        self.nodes = [self.add_host(f"n{i}", 10 + i) for i in range(1, self._n + 1)]

    def set_link(self, i: int, up: bool) -> None:
        sh("ip", "-n", self.switch, "link", "set", netns.port_of(f"n{i}"), "up" if up else "down")


class Node(netns.NsDaemon):
    """A daemon with a fixed peer address and static seeds (no mDNS)."""

    def __init__(self, ns: str, workdir: Path, node_id: str, ip: str) -> None:
        super().__init__(ns, workdir, node_id)
        self.ip = ip

    @property
    def peer(self) -> str:
        return f"{self.ip}:{PEER_PORT}"

    def start(self, token: Path, config: Path, seeds: list[str]) -> None:
        self.launch(
            config,
            *("--peer-listen", self.peer, "--advertise", self.peer, "--cluster-token-file", str(token), "--no-mdns"),
            *("--max-cache-bytes", "1G"),  # the same capacity everywhere: equal HRW weights
            *("--piece-size", "256K"),
            *(a for s in seeds for a in ("--seed", s)),
        )

    def call(self, method: str, path: str, body: Any = None) -> Any:
        conn = netns.UnixHTTPConnection(str(self.socket))
        try:
            conn.request(
                method,
                path,
                body=json.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"null")
            if resp.status >= 400:
                raise AssertionError(f"{self.node_id}: {method} {path} -> {resp.status} {data}")
            return data
        finally:
            conn.close()

    def try_call(self, method: str, path: str) -> Any:
        try:
            return self.call(method, path)
        except (OSError, AssertionError, ValueError):
            return None

    def peers(self) -> dict[str, str]:
        return {p["node_id"]: p["state"] for p in self.try_call("GET", "/v1/peers") or []}

    def model(self, ref: str) -> dict[str, Any]:
        return self.try_call("GET", f"/v1/models/status?ref={ref}") or {}

    def owners(self, ref: str) -> list[str] | None:
        for e in self.try_call("GET", "/v1/catalog") or []:
            if e["ref"] == ref:
                return list(e["owners"])
        return None


class Watch:
    """Samples, every 0.1 s in a thread, how two nodes see each other; any state but alive is a lapse."""

    def __init__(self, a: Node, b: Node) -> None:
        self.a, self.b = a, b
        self.lapses: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def _run(self) -> None:
        for _ in range(int(DEADLINE_S * 4 / 0.1)):  # bounded; stopped long before
            if self._stop.wait(0.1):
                return
            for me, other in ((self.a, self.b), (self.b, self.a)):
                state = me.peers().get(other.node_id)
                self.samples += 1
                if state is not None and state != "alive":
                    self.lapses.append(f"{me.node_id} sees {other.node_id} {state}")

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


@pytest.fixture
def network() -> Iterator[Network]:
    netns.require_netns()
    net = Network(3)
    try:
        try:
            net.build()
        except RuntimeError as e:
            pytest.skip(f"cannot build the namespace network: {e}")
        yield net
    finally:
        net.teardown()


def poll(pred: Callable[[], Any], what: str, nodes: list[Node], timeout_s: float = DEADLINE_S) -> Any:
    """Bounded in time and in count; fails with every node's log."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.1) + 1):
        dead = [n for n in nodes if not n.alive()]
        assert not dead, f"daemon exited while waiting for {what}:\n" + "\n".join(n.tail() for n in dead)
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n" + "\n".join(n.tail() for n in nodes))


def test_a_cut_owner_is_replaced_from_the_survivor_and_heals(tmp_path: Path, network: Network) -> None:
    token = tmp_path / "cluster.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    model = write_random_file(tmp_path / "www" / "model.bin", MODEL_SIZE, seed=77)
    ref = f"http://{ORIGIN_IP}:{ORIGIN_PORT}/model.bin"

    origin = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            network.switch,
            sys.executable,
            "-c",
            ORIGIN_SCRIPT,
            str(model.parent),
            ORIGIN_IP,
            str(ORIGIN_PORT),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    nodes = [Node(ns, tmp_path, f"node-{i}", network.ip(i)) for i, ns in enumerate(network.nodes, start=1)]
    by_id = {n.node_id: n for n in nodes}
    index = {n.node_id: i for i, n in enumerate(nodes, start=1)}
    try:
        assert origin.stdout is not None
        ready, _, _ = select.select([origin.stdout], [], [], 20)
        line = origin.stdout.readline() if ready else b""
        assert line.strip() == b"ready", f"origin did not start: {line!r} {origin.poll()}"
        for n in nodes:
            n.start(token, config, [m.peer for m in nodes if m is not n])

        def everyone_alive() -> bool:
            return all(n.peers() == {m.node_id: "alive" for m in nodes if m is not n} for n in nodes)

        poll(everyone_alive, "the three nodes to see each other alive", nodes)

        # --- replicas = 2: the two owners fetch it from the origin -----------------------------
        entry = nodes[0].call("POST", "/v1/replicate", {"ref": ref, "replicas": 2})
        owners = entry["owners"]
        assert len(owners) == 2, entry
        (spare_id,) = {n.node_id for n in nodes} - set(owners)
        poll(lambda: all(n.owners(ref) == owners for n in nodes), "every node to agree on the owners", nodes)
        poll(lambda: all(by_id[o].model(ref).get("state") == "ready" for o in owners), "both owners ready", nodes)
        assert by_id[spare_id].model(ref)["state"] == "absent"

        # --- cut one owner's cable -------------------------------------------------------------
        cut, survivor = by_id[owners[0]], by_id[owners[1]]
        spare = by_id[spare_id]
        network.set_link(index[cut.node_id], up=False)
        with Watch(survivor, spare) as watch:  # the two still connected must never lose each other
            poll(
                lambda: survivor.peers().get(cut.node_id) == "dead" and spare.peers().get(cut.node_id) == "dead",
                f"{cut.node_id} declared dead by the others",
                nodes,
            )
            new_owners = sorted([survivor.node_id, spare.node_id])
            poll(
                lambda: sorted(survivor.owners(ref) or []) == new_owners == sorted(spare.owners(ref) or []),
                f"{spare.node_id} promoted to owner",
                nodes,
            )
            copy = poll(
                lambda: (m := spare.model(ref)).get("state") == "ready" and m, f"a ready copy on {spare.node_id}", nodes
            )
            # The cut node saw the same partition from its side.
            poll(lambda: set(cut.peers().values()) == {"dead"}, f"{cut.node_id} to see the others dead", nodes)
        assert not watch.lapses, (
            f"{survivor.node_id} and {spare.node_id} stayed connected, yet during the partition they saw each other as: "
            f"{sorted(set(watch.lapses))} ({len(watch.lapses)} of {watch.samples} samples)\n"
            + "\n".join(n.tail() for n in nodes)
        )
        assert copy["sources"] == {"peer": MODEL_SIZE, "origin": 0}, (
            f"the stand-in copy came from the survivor: {copy['sources']}"
        )
        assert copy["manifest"] == survivor.model(ref)["manifest"]
        assert cut.model(ref)["state"] == "ready", "the cut node keeps its copy"

        # --- heal ------------------------------------------------------------------------------
        network.set_link(index[cut.node_id], up=True)
        poll(everyone_alive, f"{cut.node_id} alive again in everyone's view", nodes, timeout_s=DEADLINE_S)
        poll(lambda: all(n.owners(ref) == owners for n in nodes), "the original owners back on every node", nodes)
        for o in owners:
            assert by_id[o].model(ref)["state"] == "ready", o
        demoted = poll(
            lambda: (m := spare.model(ref)).get("replicas", {}).get("spare") and m,
            f"{spare.node_id}'s copy demoted",
            nodes,
        )
        assert demoted["state"] == "ready", "a demoted copy is kept, not deleted"
        assert demoted["replicas"]["owners"] == owners

        for n in nodes:
            assert n.stop() == 0, f"{n.node_id} did not stop cleanly\n{n.tail()}"
    finally:
        for n in nodes:
            n.stop()
        if origin.poll() is None:
            origin.send_signal(signal.SIGTERM)
            try:
                origin.wait(timeout=10)
            except subprocess.TimeoutExpired:
                origin.kill()
                origin.wait(timeout=10)
