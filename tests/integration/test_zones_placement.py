"""Zones and racks between real daemons on 127.0.0.1 (static seeds, mDNS off, labels from config).

Four nodes in two zones (``labels.zone``; zone east also has ``labels.rack``). ``replicate
--replicas 2`` puts one copy in each zone -- the owners ``cached.placement.place`` computes over
the labelled members -- and ``locate`` names each holder's zone and rack. When an owner dies its
heir is its zone-mate, the other owner keeps its copy, and the heir pulls from the survivor, not
the origin. The Kubernetes extender scores a node with no copy 1 when its zone holds one, so with
no ready copy on a candidate the scheduler leans to the zone the bytes are in. A node outside any
cluster names its own zone and rack in ``locate`` too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from cached.api.client import ApiClient
from cached.daemon import Daemon
from cached.placement import place
from tests.support.cluster import tree_digests
from tests.support.node import test_config as node_config
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

TOKEN = "zones-cluster-token-0123456789"
MIB = 1 << 20
SIZE = 8 * MIB
FAST = {
    "peer.gossip_interval_s": 0.2,
    "peer.suspect_after_s": 1.0,
    "peer.dead_after_s": 2.0,
    "store.piece_size_bytes": "1M",
    "store.max_bytes": "64M",  # every node under 1 GiB: equal placement weights, so place() below is exact
}
LABELS = {
    "e1": {"zone": "east", "rack": "r1"},
    "e2": {"zone": "east", "rack": "r2"},
    "w1": {"zone": "west"},
    "w2": {"zone": "west"},
}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


class Zones:
    """The four labelled daemons, each in its own exit stack so one can be stopped."""

    def __init__(self, tmp_path: Path, token_file: Path, origin: Origin) -> None:
        self.tmp_path, self.token_file, self.origin = tmp_path, token_file, origin
        self.nodes: dict[str, Daemon] = {}
        self._stacks: dict[str, contextlib.AsyncExitStack] = {}

    async def start(self, name: str) -> None:
        flags = {
            "cluster.token_file": str(self.token_file),
            **FAST,
            # The test origin is on 127.0.0.1, which the catalog refuses unless the operator names it.
            "cluster.internal_origins": [URL(self.origin.url).authority],
            "peer.seeds": [d.peer_address for d in self.nodes.values()][:1],
        }
        # Labels are a config table (not a flag): the Config load would build, with them set.
        cfg = dataclasses.replace(node_config(self.tmp_path / name, node_id=name, **flags), labels=LABELS[name])
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self.nodes[name] = await stack.enter_async_context(Daemon(cfg))
        except BaseException:
            await stack.aclose()
            raise
        self._stacks[name] = stack

    async def stop(self, name: str) -> None:
        del self.nodes[name]
        await self._stacks.pop(name).aclose()

    async def close(self) -> None:
        for name in list(self._stacks):
            with contextlib.suppress(Exception):
                await self.stop(name)

    def all_see_all(self) -> bool:
        for name, d in self.nodes.items():
            assert d.gossip is not None
            if {m.info.node_id for m in d.gossip.membership.alive()} != set(self.nodes) - {name}:
                return False
        return True

    def dead_everywhere(self, name: str) -> bool:
        for d in self.nodes.values():
            assert d.gossip is not None
            m = d.gossip.membership.get(name)
            if m is None or m.status.value != "dead":
                return False
        return True


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[Origin]:
    write_random_file(tmp_path / "origin" / "model.gguf", SIZE, seed=31)
    write_random_file(tmp_path / "origin" / "single.gguf", SIZE, seed=32)
    async with Origin(tmp_path / "origin") as o:
        yield o


@pytest.fixture
async def zones(tmp_path: Path, token_file: Path, origin: Origin) -> AsyncIterator[Zones]:
    z = Zones(tmp_path, token_file, origin)
    try:
        for name in LABELS:
            await z.start(name)
        await wait_until(z.all_see_all, timeout_s=15, what="four labelled nodes alive in every view")
        yield z
    finally:
        await z.close()


async def call(d: Daemon, method: str, path: str, body: dict[str, Any] | None = None, **params: str) -> Any:
    async with ApiClient(d.api_address) as api:
        return await api.request(method, path, body=body, params=params or None)


async def located(d: Daemon, ref: str) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in (await call(d, "GET", "/v1/locate", ref=ref))["nodes"]}


async def ready_on(d: Daemon, ref: str) -> set[str]:
    return {n for n, v in (await located(d, ref)).items() if v["state"] == "ready"}


async def _eq(value: Any, expected: Any) -> bool:
    return await value == expected


async def test_two_replicas_land_in_two_zones_and_a_dead_owner_hands_over_to_its_zone_mate(
    zones: Zones, origin: Origin, tmp_path: Path
) -> None:
    ref = origin.file_url("model.gguf")
    expected = place(ref, LABELS, 2)
    assert {LABELS[n]["zone"] for n in expected} == {"east", "west"}

    entry = await call(zones.nodes["w2"], "POST", "/v1/replicate", {"ref": ref, "replicas": 2})
    assert sorted(entry["owners"]) == sorted(expected), entry
    await wait_until(
        lambda: _eq(ready_on(zones.nodes["e1"], ref), set(expected)), timeout_s=30, what="a copy in each zone"
    )

    # locate names every holder's zone and rack (null when the node has no rack label).
    where = await located(zones.nodes["w1"], ref)
    assert set(where) == set(expected)
    for n, v in where.items():
        assert (v["zone"], v["rack"]) == (LABELS[n]["zone"], LABELS[n].get("rack")), v
        assert v["bytes_done"] == v["bytes_total"] == SIZE
    want = (await tree_digests(tmp_path / "origin"))["model.gguf"]
    for n in expected:
        model = await call(zones.nodes[n], "GET", "/v1/models/status", ref=ref)
        assert list((await tree_digests(Path(model["path"]))).values()) == [want]

    # An owner dies: its zone-mate inherits, the other owner keeps its copy, and the heir's bytes
    # come from the survivor in the other zone, not from the origin.
    dead = expected[0]
    (survivor,) = set(expected) - {dead}
    rest = {n: v for n, v in LABELS.items() if n != dead}
    heirs = set(place(ref, rest, 2)) - {survivor}
    (heir,) = heirs
    assert survivor in place(ref, rest, 2) and LABELS[heir]["zone"] == LABELS[dead]["zone"]
    sent_before = origin.counters.bytes_sent
    await zones.stop(dead)
    await wait_until(lambda: zones.dead_everywhere(dead), timeout_s=15, what=f"{dead} dead in every view")
    await wait_until(
        lambda: _eq(ready_on(zones.nodes[survivor], ref), {survivor, heir}),
        timeout_s=30,
        what=f"{heir} (zone-mate of {dead}) ready beside {survivor}",
    )
    model = await call(zones.nodes[heir], "GET", "/v1/models/status", ref=ref)
    assert model["sources"] == {"peer": SIZE, "origin": 0}, model
    assert model["replicas"]["owners"] and set(model["replicas"]["owners"]) == {survivor, heir}, model
    assert origin.counters.bytes_sent == sent_before


async def test_the_extender_leans_to_the_zone_that_holds_the_model(zones: Zones, origin: Origin) -> None:
    ref = origin.file_url("single.gguf")
    (owner,) = place(ref, LABELS, 1)
    zone = LABELS[owner]["zone"]
    await call(zones.nodes["e1"], "POST", "/v1/replicate", {"ref": ref, "replicas": 1})
    await wait_until(lambda: _eq(ready_on(zones.nodes["w1"], ref), {owner}), timeout_s=30, what=f"{owner} ready")

    def pod() -> dict[str, Any]:
        return {"metadata": {"name": "vllm-0", "annotations": {"cached.io/model": ref}}, "spec": {}}

    candidates = [*LABELS, "elsewhere"]
    want = {n: 10 if n == owner else 1 if LABELS[n]["zone"] == zone else 0 for n in LABELS} | {"elsewhere": 0}

    async def scores(asked: Daemon) -> dict[str, int]:
        body = {"Pod": pod(), "Nodes": None, "NodeNames": candidates}
        return {h["Host"]: h["Score"] for h in await call(asked, "POST", "/v1/k8s/prioritize", body)}

    # Every node answers the same once holdings gossip has carried the owner's copy to it (the
    # extender asks no peer over HTTP).
    for name, asked in zones.nodes.items():
        await wait_until(lambda asked=asked: _eq(scores(asked), want), timeout_s=10, what=f"{name} scores {want}")


async def test_locate_on_a_node_outside_any_cluster_names_its_own_zone(tmp_path: Path, origin: Origin) -> None:
    ref = origin.file_url("single.gguf")
    cfg = dataclasses.replace(
        node_config(tmp_path / "alone", node_id="alone", **{"store.piece_size_bytes": "1M"}),
        labels={"zone": "east", "rack": "r9"},
    )
    async with Daemon(cfg) as d:
        model = await call(d, "POST", "/v1/prefetch", {"ref": ref, "wait": True})
        assert model["state"] == "ready", model
        (only,) = (await call(d, "GET", "/v1/locate", ref=ref))["nodes"]
        assert only == {
            "node_id": "alone",
            "state": "ready",
            "bytes_done": SIZE,
            "bytes_total": SIZE,
            "eta_s": 0,
            "zone": "east",
            "rack": "r9",
        }
