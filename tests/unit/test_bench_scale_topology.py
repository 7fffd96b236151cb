"""The pure parts of issue 16's benchmark and simulation scripts (no namespaces, no daemons).

``scripts/cbench``: which zone a node is in, the per-zone configs (loaded by the daemon's own
config loader, labels and all), the shard cut, the lower bound with a zone link, the bytes
across the zone link per zone, and the scale figure (well-formed SVG with a line per method).
``scripts/simulate_scale.py``: at a small size the real-code rounds and the rumour model agree,
a message carries every member below the cap, and a seed every node names answers all of them.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from cached.config import load

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import simulate_scale  # noqa: E402
from cbench.common import zone_of  # noqa: E402
from cbench.daemons import write_cluster_files  # noqa: E402
from cbench.measure import MethodResult  # noqa: E402
from cbench.report import lower_bound, zone_lines  # noqa: E402
from cbench.report_scale import report_scale, svg  # noqa: E402
from cbench.role_hub import shard_bounds, shard_name  # noqa: E402

MIB = 1 << 20


def args(**kw: object) -> argparse.Namespace:
    base = {
        "size": 64 * MIB,
        "nodes": 4,
        "origin_rate": 50_000_000,
        "node_rate": 250_000_000,
        "zones": 1,
        "zone_link_rate": 200_000_000,
        "gossip_interval": 0,
        "git": "test",
        "curve": [2, 4],
    }
    return argparse.Namespace(**{**base, **kw})


def test_nodes_split_into_two_zones_in_equal_blocks() -> None:
    assert [zone_of(i, 8, 2) for i in range(1, 9)] == list("aaaabbbb")
    assert [zone_of(i, 5, 2) for i in range(1, 6)] == list("aaabb")
    assert {zone_of(i, 8, 1) for i in range(1, 9)} == {""}


def test_each_zone_config_is_one_the_daemon_loads_with_its_zone_label(tmp_path: Path) -> None:
    files = write_cluster_files(tmp_path / "c", {"gossip_interval_s": 0.5}, 8, zones=2)
    for i, zone in ((1, "a"), (4, "b")):
        cfg = load(files.conf_of(i, 4), {"cache_dir": str(tmp_path / "n"), "node_id": f"n{i}"})
        assert dict(cfg.labels) == {"zone": zone}
        assert cfg.peer.gossip_interval_s == 0.5
    one = write_cluster_files(tmp_path / "d", {}, 8)
    assert one.conf_of(3, 4) == one.conf
    assert dict(load(one.conf, {"cache_dir": str(tmp_path / "m")}).labels) == {}


def test_shards_cut_the_model_in_order_without_gaps() -> None:
    for size in (64 * MIB, 64 * MIB + 5, 1000):
        bounds = shard_bounds(size, 16)
        assert bounds[0][0] == 0 and sum(n for _, n in bounds) == size
        assert all(a + n == b for (a, n), (b, _) in zip(bounds, bounds[1:]))
    assert sorted(shard_name(k, 16) for k in range(16)) == [shard_name(k, 16) for k in range(16)]


def test_the_lower_bound_is_the_slowest_link_the_model_must_cross() -> None:
    assert lower_bound(args()) == 64 * MIB * 8 / 50_000_000
    assert lower_bound(args(origin_rate=400_000_000, zones=2)) == 64 * MIB * 8 / 200_000_000


def test_bytes_into_each_zone_are_the_zone_links_tx_counters() -> None:
    a = args(zones=2)
    r = MethodResult("cached", ok=True, all_done_s=20.0)
    r.extra["links"] = {"s-zone-a": (5, 66 * MIB), "s-zone-b": (7, 2 * MIB), "s-n1": (0, 0)}
    (line,) = zone_lines([r], a, lower_bound(a))
    assert "into zone b 66.00 MiB (1.031x model)" in line and "into zone a 2.00 MiB (0.031x)" in line
    assert line.endswith("met")
    assert r.extra["zone_bytes"] == {"into_b": 66 * MIB, "into_a": 2 * MIB}


def test_the_scale_report_and_figure() -> None:
    a = args()
    points = [
        (
            2,
            [
                MethodResult("cached", ok=True, all_done_s=12.0, origin_payload=64 * MIB),
                MethodResult("torrent", ok=True, all_done_s=15.0, origin_payload=80 * MIB),
            ],
        ),
        (
            4,
            [
                MethodResult("cached", ok=True, all_done_s=12.5, origin_payload=64 * MIB),
                MethodResult("torrent", ok=True, all_done_s=16.0, origin_payload=90 * MIB),
            ],
        ),
    ]
    text = report_scale(points, a)
    assert "| 2 | 12.0 s | 1.12x | 1.000x | 15.0 s | 1.40x | 1.250x | 1.25 |" in text
    assert "flat within 1.15x: 1.12x..1.16x -> MISSED" in text
    assert "- 4 nodes, faster than libtorrent: met" in text
    root = ET.fromstring(svg(points, a))
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 4  # cached and torrent, in both panels
    assert all(len(p.get("points", "").split()) == 2 for p in lines)


def test_the_simulation_agrees_with_the_real_code_at_a_small_size() -> None:
    n = 120
    cost = simulate_scale.measure_node(n, seed=1)
    assert cost.message_entries == n  # below the cap every member travels
    carry = simulate_scale.carry_share(cost)
    assert carry == 1.0
    static = simulate_scale.traffic(cost, "static")
    assert static.seed_exchanges_per_s == (n - 1 + 3) / 1.0  # everyone probes the seed each round
    for layout in simulate_scale.LAYOUTS:
        join, bump = simulate_scale.real_rounds(n, layout, seed=1)
        model_join = simulate_scale.model_rounds(n, layout, carry, 1, joiner=True)
        model_bump = simulate_scale.model_rounds(n, layout, carry, 1, joiner=False)
        assert abs(join - model_join) <= 2 and abs(bump - model_bump) <= 2, (layout, join, model_join, bump, model_bump)
        assert max(join, bump) <= 3 * 7  # 3 log2 N
