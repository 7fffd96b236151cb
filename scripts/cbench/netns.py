"""The simulated network: one switch namespace with a bridge, one namespace per host joined to it
by a veth pair, ``tc tbf`` shaping in both directions, the switch-side link counters, and the
teardown. Only names with the ``cbench-`` prefix are ever touched; nothing is configured in the
host's own namespace (the veths are created inside the switch namespace and moved straight into
the host namespaces), the namespaces have no default route, every address is in 198.18.0.0/15.
With two zones, two bridges joined by one rate-limited veth pair (``ZONE_LINK``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

from cbench.common import ORIGIN_IP, ORIGIN_NS, PREFIX, SWITCH, log, node_ip, node_ns, zone_of


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
    sh(
        "tc",
        "-n",
        ns,
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{rate_bps}bit",
        "burst",
        str(burst),
        "latency",
        "25ms",
    )


def add_host(ns: str, ip: str, rate: int, sw_dev: str, bridge: str = "br0") -> None:
    """Namespace ``ns`` with ``eth0`` at ``ip``/24, joined to ``bridge`` by ``sw_dev``, shaped to
    ``rate`` bits/s both ways, IPv6 off."""
    sh("ip", "netns", "add", ns)
    # Created inside the switch namespace, the peer end goes straight into the host's.
    sh("ip", "-n", SWITCH, "link", "add", sw_dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", SWITCH, "link", "set", sw_dev, "master", bridge)
    sh("ip", "-n", SWITCH, "link", "set", sw_dev, "up")
    sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
    sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
    sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    tbf(ns, "eth0", rate)  # what the host sends
    tbf(SWITCH, sw_dev, rate)  # what the host receives


ZONE_LINK = ("s-zone-a", "s-zone-b")  # the two ends of the link between the zones' bridges


def setup_network(nodes: int, origin_bps: int, node_bps: int, zones: int = 1, zone_link_bps: int = 0) -> None:
    """One bridge (``br0``) for everyone; with ``zones`` = 2, a bridge per zone (``br0`` for zone
    a, with the origin, ``br1`` for zone b) joined by one veth pair shaped to ``zone_link_bps``
    each way: the thin link between two zones. Still one L2 segment (198.18.0.0/24)."""
    bridges = ["br0", "br1"][: max(1, zones)]
    sh("ip", "netns", "add", SWITCH)
    for br in bridges:
        sh("ip", "-n", SWITCH, "link", "add", br, "type", "bridge")
        sh("ip", "-n", SWITCH, "link", "set", br, "up")
    add_host(ORIGIN_NS, ORIGIN_IP, origin_bps, "s-origin", "br0")
    for i in range(1, nodes + 1):
        zone = zone_of(i, nodes, zones)
        add_host(node_ns(i), node_ip(i), node_bps, f"s-n{i}", "br1" if zone == "b" else "br0")
    if zones == 2:
        a, b = ZONE_LINK
        sh("ip", "-n", SWITCH, "link", "add", a, "type", "veth", "peer", "name", b)
        for dev, br in ((a, "br0"), (b, "br1")):
            sh("ip", "-n", SWITCH, "link", "set", dev, "master", br)
            sh("ip", "-n", SWITCH, "link", "set", dev, "up")
            tbf(SWITCH, dev, zone_link_bps)  # egress of s-zone-a: zone a -> b; of s-zone-b: b -> a
    sh("ip", "netns", "exec", SWITCH, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")


def link_down(ns: str) -> None:
    """A host that vanishes: its ``eth0`` goes down (no RST for open connections)."""
    sh("ip", "-n", ns, "link", "set", "eth0", "down")


Counters = dict[str, tuple[int, int]]


def switch_counters() -> Counters:
    """Switch-side veth -> (rx bytes, tx bytes). rx on s-X = bytes host X sent."""
    r = sh("ip", "-n", SWITCH, "-s", "-j", "link", "show", check=False)
    out: Counters = {}
    with contextlib.suppress(ValueError):
        for link in json.loads(r.stdout or "[]"):
            st = link.get("stats64") or link.get("stats") or {}
            if link.get("ifname", "").startswith("s-"):
                out[link["ifname"]] = (st.get("rx", {}).get("bytes", 0), st.get("tx", {}).get("bytes", 0))
    return out
