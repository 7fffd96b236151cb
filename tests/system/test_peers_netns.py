"""mDNS discovery for real, on a private LAN of network namespaces the test creates and removes.

A switch namespace with a bridge and one namespace per daemon (``tests/support/netns.py``), all in
198.18.0.0/15 with nothing in the host's namespace, so zeroconf's announcements never leave it.
Daemons started there with mDNS on and no seeds find each other (``cachectl --json peers`` lists
the others alive); a daemon of another cluster name on the same segment is never listed, lists no
one, and its announcements are counted as rejected (``other_cluster``). Needs root and
``ip netns``; skipped otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import Network, NsNode, poll, require_netns

pytestmark = [pytest.mark.system, pytest.mark.netns]

TOKEN = "netns-cluster-token-0123456789abcdef"


@pytest.fixture
def lan() -> Iterator[Network]:
    require_netns()
    net = Network("198.18.81")
    try:
        net.build()
        yield net
    finally:
        net.teardown()


@pytest.fixture
def nodes(lan: Network, tmp_path: Path) -> Iterator[Callable[[str, int, str], NsNode]]:
    """Make nodes, each in its own namespace on the LAN; every one is stopped before the namespaces go."""
    made: list[NsNode] = []

    def make(node_id: str, octet: int, cluster: str) -> NsNode:
        node = NsNode(lan.add_host(node_id, octet), tmp_path, node_id, lan.ip(octet), cluster)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.stop()


def test_mdns_finds_peers_of_the_same_cluster_and_ignores_another(
    tmp_path: Path, nodes: Callable[[str, int, str], NsNode]
) -> None:
    token = tmp_path / "cluster.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text("[peer]\ngossip_interval_s = 0.3\nsuspect_after_s = 3.0\ndead_after_s = 6.0\n")

    # The stranger announces first, so the others' browsers certainly meet its service.
    stranger = nodes("stranger", 13, "beta")
    stranger.start(token, config)
    poll(lambda: stranger.peers() is not None, "the stranger's API", [stranger])
    a, b = nodes("node-a", 11, "alpha"), nodes("node-b", 12, "alpha")
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
    assert by_id["node-a"]["node-b"]["address"].startswith("198.18.81.12:"), by_id
    assert by_id["node-b"]["node-a"]["address"].startswith("198.18.81.11:"), by_id

    # A few more gossip rounds (the heartbeat each sees of the other moves on): still no stranger.
    hb = by_id["node-a"]["node-b"]["heartbeat"]
    poll(
        lambda: (p := a.peers()) is not None and any(x["node_id"] == "node-b" and x["heartbeat"] >= hb + 5 for x in p),
        "more gossip rounds",
        everyone,
    )
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
    # The stranger's announcements were heard and dropped (and it dropped theirs); the real
    # neighbours' signed ones never were.
    for n in everyone:
        poll(
            lambda n=n: n.metric("cached_mdns_rejected_total", reason="other_cluster") >= 1,
            f"{n.node_id} to drop the other cluster's announcement",
            everyone,
        )
    for n in (a, b):
        for reason in ("unsigned", "bad_mac", "stale", "source_mismatch", "malformed"):
            assert n.metric("cached_mdns_rejected_total", reason=reason) == 0, (n.node_id, reason, n.tail())

    for n in everyone:
        assert n.stop() == 0, f"{n.node_id} did not stop cleanly\n{n.tail()}"
