"""A spoofed mDNS responder on the LAN, for real, inside private network namespaces (issue 18).

The attack as it was done: a host on the LAN without the cluster token runs a real zeroconf
responder announcing ``_cached._tcp.local.`` with the victim's cluster name and an arbitrary
``addr`` (here: a recording TCP server on another address of the attacker's host). The daemon
used to take it as a seed and POST gossip there with ``Authorization: Bearer <token>`` within a
second. Now the victim must never connect to the recorder, never list the spoof as a peer, and
count the announcement in ``cached_mdns_rejected_total``; a real second daemon holding the token
is still found by mDNS alone (no seeds) and becomes a peer.

The second attack replays a real node's signed TXT: once with the address moved to the recorder
(the MAC no longer matches: ``bad_mac``), once unchanged but sent from the attacker's host (the
address is not the packet's source: ``source_mismatch``). Neither is ever contacted or listed.

Topology from ``tests/support/netns.py`` (switch + bridge + one namespace per host, 198.18.0.0/15,
nothing on the host's interfaces). Needs root and ``ip netns``; skipped otherwise. Every wait is
bounded in time and count; every process we start is stopped before the namespaces are deleted.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import Network, NsNode, poll, require_netns
from tests.support.node import REPO

pytestmark = [pytest.mark.system, pytest.mark.netns]

TOKEN = "mdns-trust-cluster-token-0123456789abcdef"
NET = "198.18.82"
VICTIM, REAL, ATTACKER, RECORDER = 11, 12, 66, 67  # last octets; the recorder is the attacker's second address
RECORDER_PORT = 8080
CONFIG = "[peer]\ngossip_interval_s = 0.3\nsuspect_after_s = 3.0\ndead_after_s = 6.0\n"

# Records every connection (peer and the first bytes sent) as one JSON line, answers 404.
RECORDER_SCRIPT = """
import asyncio, json, sys
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def handle(reader, writer):
    try:
        data = await asyncio.wait_for(reader.read(65536), 5)
    except Exception:
        data = b""
    with open(path, "a") as f:
        f.write(json.dumps({"peer": writer.get_extra_info("peername")[0], "data": data.decode("latin-1")}) + "\\n")
    writer.write(b"HTTP/1.1 404 Not Found\\r\\ncontent-length: 0\\r\\nconnection: close\\r\\n\\r\\n")
    await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(handle, host, port)
    print("ready", flush=True)
    async with server:
        await asyncio.sleep(300)  # bounded: the test stops it long before
asyncio.run(main())
"""

# A token-less responder with real zeroconf. "spoof": announce an arbitrary addr for our cluster.
# "replay": learn a real node's TXT from the LAN, re-announce it with addr moved, and unchanged.
ATTACKER_SCRIPT = """
import asyncio, json, socket, sys
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
SERVICE = "_cached._tcp.local."
mode, own_ip = sys.argv[1], sys.argv[2]

def info(instance, properties, port):
    return AsyncServiceInfo(SERVICE, f"{instance}.{SERVICE}", addresses=[socket.inet_aton(own_ip)], port=port,
                            properties=properties, server=f"{instance}.local.")

async def main():
    aiozc = AsyncZeroconf()
    if mode == "spoof":
        cluster, addr = sys.argv[3], sys.argv[4]
        props = {"node_id": "evil", "cluster": cluster, "addr": addr, "hv": "7", "hc": "1"}
        await (await aiozc.async_register_service(info("evil", props, int(addr.rpartition(":")[2]))))
    else:
        target, addr = sys.argv[3], sys.argv[4]
        real = AsyncServiceInfo(SERVICE, f"{target}.{SERVICE}")
        for _ in range(30):
            if await real.async_request(aiozc.zeroconf, 1000) and real.text:
                break
        else:
            print("target not found", flush=True)
            return
        props = {k.decode(): (v or b"").decode() for k, v in real.properties.items()}
        print(json.dumps({"captured": props}), flush=True)
        moved = dict(props, addr=addr)
        await (await aiozc.async_register_service(info("replay-moved", moved, int(addr.rpartition(":")[2]))))
        await (await aiozc.async_register_service(info("replay-same", real.text, real.port)))
    print("ready", flush=True)
    await asyncio.sleep(300)  # bounded: the test stops it long before

asyncio.run(main())
"""


class Helper:
    """A script of ours run with ``ip netns exec``; waits for its "ready" line."""

    def __init__(self, ns: str, script: str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
        self.lines: list[str] = []

    def wait_ready(self, timeout_s: float = 40.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                break  # exited
            self.lines.append(line.rstrip())
            if line.strip() == "ready":
                return
        raise AssertionError("helper not ready:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def lan() -> Iterator[Network]:
    require_netns()
    net = Network(NET)
    try:
        net.build()
        yield net
    finally:
        net.teardown()


@pytest.fixture
def world(lan: Network, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The victim and the real node (not started), the attacker's host with the recorder running."""
    token = tmp_path / "cluster.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    victim = NsNode(lan.add_host("victim", VICTIM), tmp_path, "node-a", lan.ip(VICTIM), "alpha")
    real = NsNode(lan.add_host("real", REAL), tmp_path, "node-b", lan.ip(REAL), "alpha")
    attacker_ns = lan.add_host("attacker", ATTACKER, RECORDER)
    record = tmp_path / "recorder.jsonl"
    record.touch()
    helpers: list[Helper] = []

    def helper(script: str, *args: str) -> Helper:
        h = Helper(attacker_ns, script, *args)
        helpers.append(h)
        h.wait_ready()
        return h

    try:
        helper(RECORDER_SCRIPT, str(record), lan.ip(RECORDER), str(RECORDER_PORT))
        yield {
            "victim": victim,
            "real": real,
            "attacker_ns": attacker_ns,
            "helper": helper,
            "token": token,
            "config": config,
            "record": record,
            "spoofed": f"{lan.ip(RECORDER)}:{RECORDER_PORT}",
            "lan": lan,
        }
    finally:
        for h in helpers:
            h.stop()
        for n in (victim, real):
            n.stop()


def contacts(record: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def rejected(node: NsNode, reason: str) -> float:
    return node.metric("cached_mdns_rejected_total", reason=reason)


def assert_never_contacted(record: Path) -> None:
    seen = contacts(record)
    leaked = [c for c in seen if TOKEN in c["data"]]
    assert not leaked, f"the daemon sent the cluster token to the spoofed address: {leaked[0]['data'][:400]!r}"
    assert not seen, f"the daemon connected to the spoofed address: {seen[:3]}"


def sees_alive(node: NsNode, other: str) -> list[dict[str, Any]] | None:
    peers = node.peers()
    if peers is None or {p["node_id"]: p["state"] for p in peers}.get(other) != "alive":
        return None
    return peers


def more_gossip_rounds(victim: NsNode, real: NsNode, rounds: int = 5) -> None:
    """Time passes in gossip rounds, not seconds: the heartbeat the victim sees of the real node moves on."""
    peers = poll(lambda: sees_alive(victim, real.node_id), "the real node alive", [victim, real])
    hb = {p["node_id"]: p for p in peers}[real.node_id]["heartbeat"]
    poll(
        lambda: (
            (p := victim.peers()) is not None
            and any(x["node_id"] == real.node_id and x["heartbeat"] >= hb + rounds for x in p)
        ),
        "more gossip rounds",
        [victim, real],
    )


def test_spoofed_announcement_is_never_contacted_and_a_real_node_is_still_found(world: dict[str, Any]) -> None:
    victim, real, record = world["victim"], world["real"], world["record"]
    victim.start(world["token"], world["config"])
    poll(lambda: victim.peers() is not None, "the victim's API", [victim])

    # The spoof: our cluster's name, no token, an address that is not even the sender's.
    world["helper"](ATTACKER_SCRIPT, "spoof", world["lan"].ip(ATTACKER), "alpha", world["spoofed"])
    poll(lambda: contacts(record) or rejected(victim, "unsigned") >= 1, "the victim to hear the spoof", [victim])
    assert_never_contacted(record)

    # A real node with the token, no seeds on either side: found by mDNS alone.
    real.start(world["token"], world["config"])
    poll(
        lambda: sees_alive(victim, "node-b") and sees_alive(real, "node-a"),
        "node-a and node-b to find each other by mDNS",
        [victim, real],
    )
    more_gossip_rounds(victim, real)

    assert_never_contacted(record)
    for n, other in ((victim, "node-b"), (real, "node-a")):
        listed = n.peers()
        assert listed is not None and [p["node_id"] for p in listed] == [other], f"{n.node_id} lists {listed}"
        assert not any(world["spoofed"] in p["address"] for p in listed)
        assert rejected(n, "unsigned") >= 1, f"{n.node_id} did not count the spoof\n{n.tail()}"
        # The real neighbour's signed announcements were never dropped.
        for reason in ("bad_mac", "stale", "source_mismatch", "malformed"):
            assert rejected(n, reason) == 0, (n.node_id, reason, n.tail())
    for n in (victim, real):
        assert n.stop() == 0, f"{n.node_id} did not stop cleanly\n{n.tail()}"


def test_a_replayed_signed_announcement_is_rejected_moved_or_not(world: dict[str, Any]) -> None:
    victim, real, record = world["victim"], world["real"], world["record"]
    real.start(world["token"], world["config"])
    poll(lambda: real.peers() is not None, "the real node's API", [real])

    # The attacker listens to the LAN, captures node-b's TXT and announces it again from its host.
    replay = world["helper"](ATTACKER_SCRIPT, "replay", world["lan"].ip(ATTACKER), "node-b", world["spoofed"])
    captured = next(json.loads(line)["captured"] for line in replay.lines if line.startswith("{"))
    assert captured["node_id"] == "node-b" and captured["cluster"] == "alpha"

    victim.start(world["token"], world["config"])
    poll(lambda: victim.peers() is not None, "the victim's API", [victim, real])
    poll(
        lambda: contacts(record) or (rejected(victim, "bad_mac") >= 1 and rejected(victim, "source_mismatch") >= 1),
        "the victim to hear both replays",
        [victim, real],
    )
    assert_never_contacted(record)

    poll(lambda: sees_alive(victim, "node-b"), "node-a to find the real node-b", [victim, real])
    more_gossip_rounds(victim, real)
    assert_never_contacted(record)
    listed = victim.peers()
    assert listed is not None and [(p["node_id"], p["address"].rpartition(":")[0]) for p in listed] == [
        ("node-b", real.host)
    ], listed
    assert victim.stop() == 0, victim.tail()
