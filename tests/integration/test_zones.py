"""Zone-aware sources between real daemons on 127.0.0.1 (``labels.zone``, gossiped).

Two zones: one node of zone "a" holds a model; three nodes of zone "b" and one more of zone "a"
ask for it at once. Each piece crosses the zone boundary about once (one node of zone "b" pulls
it across, the others take it inside the zone); the node of zone "a" takes everything inside its
zone; the origin is read only for the first copy. ``cached_peer_bytes_total{scope}`` counts what
crossed.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from tests.support.cluster import (  # noqa: F401 - token_file is a fixture
    MIB,
    all_see_all,
    blob_holders,
    blobs_of,
    metric,
    node_flags,
    prefetch,
    token_file,
    tree_digests,
    view_digests,
)
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

ZONES = {"h": "a", "a2": "a", "b1": "b", "b2": "b", "b3": "b"}


async def test_each_zone_pulls_a_piece_across_the_boundary_about_once(tmp_path: Path, token_file: Path) -> None:
    size, piece = 12 * MIB + 77, "512K"
    src = write_random_file(tmp_path / "origin" / "zoned.bin", size, seed=71)
    want = await tree_digests(src.parent)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        steady = {"peer.suspect_after_s": 3.0, "peer.dead_after_s": 6.0}
        nodes = {}
        for name, zone in ZONES.items():
            seeds = [nodes["h"]] if nodes else []
            flags = node_flags(token_file, *seeds, piece=piece, labels={"zone": zone}, **steady)
            nodes[name] = await stack.enter_async_context(running_daemon(tmp_path / name, node_id=name, **flags))
        await wait_until(lambda: all_see_all(nodes), timeout_s=15, what="all nodes alive in every view")
        h = nodes["h"]
        model = await prefetch(h, origin.file_url("zoned.bin"))
        blob = blobs_of(h, model)["zoned.bin"]
        for name, d in nodes.items():
            if name != "h":
                await wait_until(lambda d=d: blob_holders(d, blob) == {"h"}, timeout_s=10, what=f"{name} learns h")

        others = [n for n in ZONES if n != "h"]
        models = await asyncio.gather(*(prefetch(nodes[n], model["ref"]) for n in others))

        assert origin.counters.bytes_sent == size, "only h read the origin"
        for name, m in zip(others, models):
            assert m["sources"]["origin"] == 0, name
            assert await view_digests(m) == want, name
        crossed = {n: await metric(nodes[n], "cached_peer_bytes_total", scope="cross_zone") for n in others}
        inside = {n: await metric(nodes[n], "cached_peer_bytes_total", scope="zone") for n in others}
        zone_b = sum(crossed[n] for n in ("b1", "b2", "b3"))
        assert size <= zone_b <= 1.05 * size, f"zone b pulled {zone_b / size:.2f}x the model across: {crossed}"
        assert crossed["a2"] == 0, "a2 took everything inside its zone"
        assert inside["a2"] >= size
        # Three copies in zone b: what did not cross came from inside the zone.
        assert sum(inside[n] for n in ("b1", "b2", "b3")) == 3 * size - zone_b, inside
