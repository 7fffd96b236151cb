"""The OCI benchmark's report (``scripts/cbench/oci_bench.py``), without namespaces or daemons.

The mirror row carries a second bound, network bound + client floor (N concurrent skopeo pulls,
each from a registry on its node's own loopback), and the direct row keeps the network bound alone; ``--methods`` picks mirror and direct.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from cbench.oci_bench import Result, oci_methods, report  # noqa: E402

GIB = 1 << 30


def args(methods: list[str]) -> argparse.Namespace:
    return argparse.Namespace(size=GIB, nodes=8, origin_rate=200e6, node_rate=1e9, methods=methods)


def test_the_mirror_row_has_both_bounds_and_the_direct_row_only_the_network_one() -> None:
    floor = Result("client floor (local registries)", ok=True, wall_s=26.3)
    mirror = Result("mirror (cached)", ok=True, wall_s=88.5, lower_bound_s=42.9, client_floor_s=26.3)
    mirror.registry_wire, mirror.node_s = GIB, [80.0, 88.5]
    direct = Result("direct (registry)", ok=True, wall_s=350.0, lower_bound_s=343.6, registry_wire=8 * GIB)
    text = report(args(["cached", "direct"]), [mirror, direct], floor)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert rows["mirror (cached)"][3:5] == ["2.06", f"{88.5 / (42.9 + 26.3):.2f}"]
    assert rows["direct (registry)"][3:5] == [f"{350 / 343.6:.2f}", "-"]
    assert "client floor: 8 concurrent" in text and "26.3 s (ok)" in text


def test_methods_pick_the_mirror_and_the_direct_pull_in_order_and_default_to_both() -> None:
    assert oci_methods(args(["cached"])) == ["mirror"]
    assert oci_methods(args(["direct", "cached"])) == ["direct", "mirror"]
    assert oci_methods(args(["cached", "torrent", "direct"])) == ["mirror", "direct"]
    assert report(args(["cached"]), [Result("mirror (cached)", lower_bound_s=1.0)]).count("client floor:") == 0
