"""Placement and failover between real daemons on 127.0.0.1 (static seeds, mDNS off).

``POST /v1/replicate`` puts a ref in the catalog on any node; the N owners (HRW over live nodes,
as ``cached.placement`` computes it) fetch it, the origin sends the bytes once, nobody else
fetches. When an owner dies, the next node in HRW order pulls the model from the survivor, not
from the origin. When the dead node returns on its cache, it is an owner again and the stand-in
copy is demoted: kept, marked spare, and only evicted under pressure, while the owners' copies are
never evicted. ``replicas = 0`` removes the entry on every node. Label constraints keep a model
on matching nodes only, and a node outside any cluster answers 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from cached.api.client import ApiClient, ApiError
from cached.daemon import Daemon
from cached.placement import owners
from tests.support.node import running_daemon
from tests.support.node import test_config as node_config
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

TOKEN = "replication-cluster-token-0123456789"
MIB = 1 << 20
SIZE = 8 * MIB
DEAD_S = 2.0
FAST = {
    "peer.gossip_interval_s": 0.2,
    "peer.suspect_after_s": 1.0,
    "peer.dead_after_s": DEAD_S,
    "store.piece_size_bytes": "1M",
    # Every node the same capacity below 1 GiB: equal HRW weights, so placement.owners() over the
    # node ids is what the cluster must compute.
    "store.max_bytes": "64M",
}
# What the eviction check turns the capacity into (SIGHUP): 8 MiB of 16 MiB is over the 40% mark.
PRESSURE = {"store.max_bytes": "16M", "store.high_watermark": 0.4, "store.low_watermark": 0.2}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[Origin]:
    write_random_file(tmp_path / "origin" / "model.gguf", SIZE, seed=11)
    write_random_file(tmp_path / "origin" / "h100-only.gguf", SIZE, seed=12)
    async with Origin(tmp_path / "origin") as o:
        yield o


class Cluster:
    """Named daemons that can be stopped and restarted one by one (each in its own exit stack)."""

    def __init__(self, tmp_path: Path, token_file: Path, base: dict[str, Any] | None = None) -> None:
        self.tmp_path = tmp_path
        self.token_file = token_file
        self.base = base or {}
        self.nodes: dict[str, Daemon] = {}
        self.flags: dict[str, dict[str, Any]] = {}
        self._stacks: dict[str, contextlib.AsyncExitStack] = {}

    async def start(
        self, name: str, labels: dict[str, str] | None = None, cache: str | None = None, **extra: Any
    ) -> Daemon:
        seeds = [d.peer_address for d in self.nodes.values()][:1]
        flags = {"cluster.token_file": str(self.token_file), **FAST, **self.base, "peer.seeds": seeds, **extra}
        cache_dir = self.tmp_path / (cache or name)
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            if labels is None:
                d = await stack.enter_async_context(running_daemon(cache_dir, node_id=name, **flags))
            else:
                # running_daemon(labels=...) is refused by config.load (see test_labels_can_be_set_as_a_flag);
                # the Config it would build, with the labels set, is the same daemon.
                cfg = dataclasses.replace(node_config(cache_dir, node_id=name, **flags), labels=labels)
                d = await stack.enter_async_context(Daemon(cfg))
        except BaseException:
            await stack.aclose()
            raise
        self.nodes[name], self.flags[name], self._stacks[name] = d, flags, stack
        return d

    async def stop(self, name: str) -> None:
        del self.nodes[name]
        await self._stacks.pop(name).aclose()

    async def close(self) -> None:
        for name in list(self._stacks):
            with contextlib.suppress(Exception):
                await self.stop(name)

    def reload(self, name: str, **changes: Any) -> list[str]:
        """What SIGHUP does, with ``changes`` over the flags the node was started with."""
        d = self.nodes[name]
        return d.reload(node_config(d.cfg.store.cache_dir, node_id=name, **{**self.flags[name], **changes}))

    def all_see_all(self) -> bool:
        for name, d in self.nodes.items():
            assert d.gossip is not None
            if {m.info.node_id for m in d.gossip.membership.alive()} != set(self.nodes) - {name}:
                return False
        return True


def internal(origin: Origin) -> dict[str, Any]:
    """The test origin listens on 127.0.0.1, an internal address the catalog refuses unless the
    operator names it (issue 18); every node here reaches the same server there."""
    return {"cluster.internal_origins": [URL(origin.url).authority]}


@pytest.fixture
async def cluster(tmp_path: Path, token_file: Path, origin: Origin) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, token_file, internal(origin))
    try:
        yield c
    finally:
        await c.close()


async def call(d: Daemon, method: str, path: str, body: dict[str, Any] | None = None, **params: str) -> Any:
    async with ApiClient(d.api_address) as api:
        return await api.request(method, path, body=body, params=params or None)


async def status(d: Daemon, ref: str) -> dict[str, Any]:
    return await call(d, "GET", "/v1/models/status", ref=ref)


async def ready_on(d: Daemon, ref: str) -> set[str]:
    """Node ids that ``d``'s cluster-wide locate lists with a ready copy."""
    nodes = (await call(d, "GET", "/v1/locate", ref=ref))["nodes"]
    return {n["node_id"] for n in nodes if n["state"] == "ready"}


async def _eq(value: Any, expected: Any) -> bool:
    return await value == expected


async def catalogs_agree(c: Cluster, expected: list[dict[str, Any]]) -> bool:
    for d in c.nodes.values():
        if await call(d, "GET", "/v1/catalog") != expected:
            return False
    return True


def dead_everywhere(c: Cluster, name: str) -> bool:
    for d in c.nodes.values():
        assert d.gossip is not None
        m = d.gossip.membership.get(name)
        if m is None or m.status.value != "dead":
            return False
    return True


async def is_spare(d: Daemon, ref: str) -> bool:
    return (await status(d, ref)).get("replicas", {}).get("spare") is True


async def evictions(d: Daemon) -> float:
    async with ApiClient(d.api_address) as api:
        assert api._session is not None
        async with api._session.get(api.base + "/metrics") as resp:
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "cached_evictions_total":
                return s.value
    return 0.0


async def test_replicate_fails_over_to_the_next_node_and_demotes_it_when_the_owner_returns(
    cluster: Cluster, origin: Origin
) -> None:
    for name in "abcd":
        await cluster.start(name)
    await wait_until(cluster.all_see_all, timeout_s=15, what="four nodes alive in every view")
    ref = origin.file_url("model.gguf")
    names = sorted(cluster.nodes)
    first, second = owners(ref, names, 2)
    bystanders = [n for n in names if n not in (first, second)]

    # Any node takes the request, an owner or not.
    entry = await call(cluster.nodes[bystanders[0]], "POST", "/v1/replicate", {"ref": ref, "replicas": 2})
    assert entry == {"ref": ref, "replicas": 2, "labels": {}, "owners": [first, second]}

    await wait_until(lambda: catalogs_agree(cluster, [entry]), timeout_s=10, what="the entry on every node")
    await wait_until(
        lambda: _eq(ready_on(cluster.nodes[bystanders[1]], ref), {first, second}),
        timeout_s=30,
        what="both owners ready",
    )
    for d in cluster.nodes.values():
        assert await ready_on(d, ref) == {first, second}, "locate answers the same on every node"
    located = (await call(cluster.nodes[bystanders[1]], "GET", "/v1/locate", ref=ref))["nodes"]
    assert sorted(n["node_id"] for n in located) == sorted([first, second]), located  # nobody else, not even queued
    assert all(
        n["state"] == "ready" and n["bytes_done"] == n["bytes_total"] == SIZE and n["eta_s"] == 0 for n in located
    )
    assert origin.counters.bytes_sent == SIZE, "the origin sends the model once between the owners"
    for n in bystanders:
        model = await status(cluster.nodes[n], ref)
        assert model["state"] == "absent" and model["sources"] == {"peer": 0, "origin": 0}, model
        assert model["replicas"] == {"target": 2, "owners": [first, second], "spare": False}
    for n in (first, second):
        model = await status(cluster.nodes[n], ref)
        assert model["replicas"] == {"target": 2, "owners": [first, second], "spare": False}
        assert sum(model["sources"].values()) == SIZE

    # The first owner dies: the next node in HRW order among the living takes over from the survivor.
    await cluster.stop(first)
    live = sorted(cluster.nodes)
    assert second in owners(ref, live, 2)
    (stand_in,) = set(owners(ref, live, 2)) - {second}
    (idle,) = set(live) - {second, stand_in}

    async def stand_in_ready() -> bool:
        return (await status(cluster.nodes[stand_in], ref))["state"] == "ready"

    await wait_until(stand_in_ready, timeout_s=DEAD_S + 20, what=f"{stand_in} holds a ready copy after {first} died")
    model = await status(cluster.nodes[stand_in], ref)
    assert model["sources"] == {"peer": SIZE, "origin": 0}, model
    assert model["replicas"] == {"target": 2, "owners": owners(ref, live, 2), "spare": False}
    assert origin.counters.bytes_sent == SIZE, "the stand-in fetched from the surviving peer, not the origin"
    held = await ready_on(cluster.nodes[idle], ref)
    assert {second, stand_in} <= held <= {second, stand_in, idle}, held
    if idle in held:
        # A moment of disagreement about who is alive (a slow gossip round under load) can make
        # a third node fetch too; that copy must end up a spare, not a third owner.
        await wait_until(lambda: is_spare(cluster.nodes[idle], ref), timeout_s=10, what=f"{idle}'s extra copy demoted")

    # The dead owner comes back on its cache: it is an owner again, and the stand-in's copy is a
    # spare -- still there, still ready, but no longer protected. (It comes back once every node
    # has declared it dead; a restart quicker than that is test_a_quick_restart_... below.)
    await wait_until(lambda: dead_everywhere(cluster, first), timeout_s=DEAD_S + 10, what=f"{first} dead in every view")
    await cluster.start(first)
    await wait_until(cluster.all_see_all, timeout_s=15, what=f"{first} alive again in every view")
    expected = [{"ref": ref, "replicas": 2, "labels": {}, "owners": [first, second]}]
    await wait_until(lambda: catalogs_agree(cluster, expected), timeout_s=10, what=f"{first} an owner again everywhere")

    async def demoted() -> bool:
        spares = {n: (await status(cluster.nodes[n], ref))["replicas"]["spare"] for n in (first, second, stand_in)}
        return spares == {first: False, second: False, stand_in: True}

    await wait_until(demoted, timeout_s=10, what=f"{stand_in}'s copy demoted to spare, {first}'s not")
    spare = await status(cluster.nodes[stand_in], ref)
    assert spare["state"] == "ready" and spare["replicas"]["owners"] == [first, second], spare
    returned = await status(cluster.nodes[first], ref)
    assert returned["state"] == "ready" and returned["replicas"]["spare"] is False, returned
    assert {first, second, stand_in} <= await ready_on(cluster.nodes[idle], ref), "demoted, not deleted"
    assert origin.counters.bytes_sent == SIZE

    # No pressure: gc keeps the spare.
    assert (await call(cluster.nodes[stand_in], "POST", "/v1/gc"))["evicted"] == []
    assert (await status(cluster.nodes[stand_in], ref))["state"] == "ready"

    # Under pressure an owner keeps its copy, the spare goes.
    assert cluster.reload(second, **PRESSURE) == []
    assert (await call(cluster.nodes[second], "POST", "/v1/gc"))["evicted"] == []
    assert (await status(cluster.nodes[second], ref))["state"] == "ready"
    assert cluster.reload(stand_in, **PRESSURE) == []
    evicted: list[str] = []

    async def spare_evicted() -> bool:
        # The spare stays protected until this node has heard, by gossip, that the owners'
        # copies are there (the returned node's holdings take a round or two to arrive).
        evicted.extend((await call(cluster.nodes[stand_in], "POST", "/v1/gc"))["evicted"])
        return (await status(cluster.nodes[stand_in], ref))["state"] == "absent"

    await wait_until(spare_evicted, timeout_s=10, what=f"gc on {stand_in} evicts the spare")
    assert evicted in ([ref], []), evicted  # ([]: the node's own housekeeping got there first)
    assert await evictions(cluster.nodes[stand_in]) == 1
    assert await evictions(cluster.nodes[second]) == 0
    held = await ready_on(cluster.nodes[idle], ref)
    assert stand_in not in held and {first, second} <= held, held

    # replicas = 0 removes the entry everywhere; the copies stay (evictable, no longer counted).
    removed = await call(cluster.nodes[idle], "POST", "/v1/replicate", {"ref": ref, "replicas": 0})
    assert removed == {"ref": ref, "replicas": 0, "labels": {}, "owners": []}
    await wait_until(lambda: catalogs_agree(cluster, []), timeout_s=10, what="the entry gone from every catalog")
    for n in (first, second):
        model = await status(cluster.nodes[n], ref)
        assert model["state"] == "ready" and "replicas" not in model, model


async def test_an_owner_that_is_only_suspect_is_not_replaced(cluster: Cluster, origin: Origin) -> None:
    # Placement moves a model when gossip says its holder is dead, not at the first missed
    # heartbeats: a node that is slow for a few seconds must not set off a full copy elsewhere.
    slow_death = {"peer.dead_after_s": 60.0}
    for name in "abc":
        await cluster.start(name, **slow_death)
    await wait_until(cluster.all_see_all, timeout_s=15, what="three nodes alive in every view")
    ref = origin.file_url("model.gguf")
    (owner,) = owners(ref, sorted(cluster.nodes), 1)
    others = [n for n in sorted(cluster.nodes) if n != owner]
    await call(cluster.nodes[others[0]], "POST", "/v1/replicate", {"ref": ref, "replicas": 1})
    await wait_until(
        lambda: _eq(ready_on(cluster.nodes[others[0]], ref), {owner}), timeout_s=30, what="the owner ready"
    )

    await cluster.stop(owner)

    def suspect_everywhere() -> bool:
        return all(
            (m := d.gossip.membership.get(owner)) is not None and m.status.value == "suspect"  # type: ignore[union-attr]
            for d in cluster.nodes.values()
        )

    await wait_until(suspect_everywhere, timeout_s=10, what=f"{owner} suspect in every view")
    start = {n: cluster.nodes[n].reconciler.passes for n in others}  # type: ignore[union-attr]
    await wait_until(
        lambda: all(cluster.nodes[n].reconciler.passes >= start[n] + 3 for n in others),  # type: ignore[union-attr]
        timeout_s=15,
        what="three more reconcile passes on every survivor",
    )
    assert suspect_everywhere(), "still suspect, not dead, after those passes"
    for n in others:
        model = await status(cluster.nodes[n], ref)
        assert model["state"] == "absent", f"{n} replaced an owner that was only suspect: {model}"
        assert model["replicas"]["owners"] == [owner], model
    assert origin.counters.bytes_sent == SIZE


async def test_a_quick_restart_replaces_what_peers_believe_the_node_holds(cluster: Cluster, origin: Origin) -> None:
    # A node restarted (here: on a fresh disk) before its peers declare it dead starts a new life
    # with new holdings. Its peers must drop what they knew of the previous life: what they
    # believe it holds decides what the reconciler protects and where transfers are sent.
    slow_death = {"peer.dead_after_s": 60.0}
    x = await cluster.start("x", **slow_death)
    y = await cluster.start("y", **slow_death)
    await wait_until(cluster.all_see_all, timeout_s=15, what="x and y see each other")
    ref = origin.file_url("model.gguf")
    assert (await call(x, "POST", "/v1/prefetch", {"ref": ref, "wait": True}))["state"] == "ready"
    assert x.gossip is not None and y.gossip is not None

    def y_knows_x_holds_it() -> bool:
        assert x.gossip is not None and y.gossip is not None
        return "x" in dict(y.gossip.view.with_ref(ref)) and y.gossip.view.version("x") == x.gossip.holdings.version

    await wait_until(y_knows_x_holds_it, timeout_s=10, what="y's view of x up to date")
    old_life = y.gossip.membership.get("x").info.incarnation  # type: ignore[union-attr]

    await cluster.stop("x")
    x = await cluster.start("x", cache="x-new-disk", **slow_death)
    assert (await status(x, ref))["state"] == "absent"

    def y_sees_new_life() -> bool:
        assert y.gossip is not None
        m = y.gossip.membership.get("x")
        return m is not None and m.info.incarnation > old_life and m.status.value == "alive"

    await wait_until(y_sees_new_life, timeout_s=10, what="y sees x's new incarnation alive")

    def y_forgot_old_holdings() -> bool:
        assert y.gossip is not None
        return "x" not in dict(y.gossip.view.with_ref(ref))

    await wait_until(y_forgot_old_holdings, timeout_s=5, what="y no longer believes x holds the model")


async def test_a_peer_that_never_answers_does_not_stall_a_nodes_heartbeat(cluster: Cluster) -> None:
    # y gossips with x and with an address that accepts connections and never answers (a wedged
    # process, a host behind a black-holing firewall). y must keep its rounds, and so its
    # heartbeat, going: otherwise x suspects a healthy y, and placement moves its models away.
    opened: list[float] = []
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(time.monotonic())
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 16):
                pass

    hole = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        x = await cluster.start("x")
        y = await cluster.start(
            "y", **{"peer.seeds": [x.peer_address, f"127.0.0.1:{hole.sockets[0].getsockname()[1]}"]}
        )
        await wait_until(cluster.all_see_all, timeout_s=15, what="x and y see each other")
        await wait_until(lambda: opened, timeout_s=5, what="y contacts the silent address")
        assert x.gossip is not None and y.gossip is not None
        start = y.gossip.rounds
        seen: set[str] = set()

        def y_goes_on() -> bool:
            assert x.gossip is not None and y.gossip is not None
            m = x.gossip.membership.get("y")
            seen.add(m.status.value if m else "absent")
            # Ten rounds at 0.2 s span twice suspect_after_s.
            return y.gossip.rounds >= start + 10

        try:
            await wait_until(y_goes_on, timeout_s=6, what="y's gossip rounds to go on")
        except AssertionError as e:
            raise AssertionError(f"{e}: y did {y.gossip.rounds - start} rounds; x saw y as {sorted(seen)}") from None
        assert seen == {"alive"}, f"x saw a healthy y as {sorted(seen)}"
    finally:
        for w in writers:
            w.close()
        hole.close()
        await hole.wait_closed()


async def test_labels_keep_a_model_on_matching_nodes_only(cluster: Cluster, origin: Origin) -> None:
    labels = {"a": {"gpu": "a100"}, "b": {}, "c": {"gpu": "h100"}, "d": {"gpu": "h100", "zone": "z2"}}
    for name, node_labels in labels.items():
        await cluster.start(name, labels=node_labels)
    await wait_until(cluster.all_see_all, timeout_s=15, what="four nodes alive in every view")
    ref = origin.file_url("h100-only.gguf")
    eligible = owners(ref, ["c", "d"], 2)

    # More replicas than matching nodes: every matching node, and no other.
    entry = await call(
        cluster.nodes["a"], "POST", "/v1/replicate", {"ref": ref, "replicas": 3, "labels": {"gpu": "h100"}}
    )
    assert entry == {"ref": ref, "replicas": 3, "labels": {"gpu": "h100"}, "owners": eligible}
    await wait_until(lambda: catalogs_agree(cluster, [entry]), timeout_s=10, what="the labelled entry on every node")
    await wait_until(
        lambda: _eq(ready_on(cluster.nodes["b"], ref), {"c", "d"}), timeout_s=30, what="both h100 nodes ready"
    )
    located = (await call(cluster.nodes["a"], "GET", "/v1/locate", ref=ref))["nodes"]
    assert sorted(n["node_id"] for n in located) == ["c", "d"], located
    for n in ("a", "b"):
        model = await status(cluster.nodes[n], ref)
        assert model["state"] == "absent" and model["sources"] == {"peer": 0, "origin": 0}, model
    assert origin.counters.bytes_sent == SIZE

    # A constraint no node meets: in the catalog, owned by nobody, fetched by nobody.
    other = origin.file_url("model.gguf")
    entry = await call(
        cluster.nodes["c"], "POST", "/v1/replicate", {"ref": other, "replicas": 2, "labels": {"gpu": "tpu"}}
    )
    assert entry["owners"] == []
    await wait_until(
        lambda: catalogs_agree(
            cluster,
            sorted(
                [entry, {"ref": ref, "replicas": 3, "labels": {"gpu": "h100"}, "owners": eligible}],
                key=lambda e: e["ref"],
            ),
        ),
        timeout_s=10,
        what="both entries on every node",
    )
    for d in cluster.nodes.values():
        d.reconciler.reconcile()  # type: ignore[union-attr]  # one pass now, rather than waiting for the loop
        assert (await status(d, other))["state"] == "absent"
    assert origin.counters.bytes_sent == SIZE


def test_labels_can_be_set_as_a_flag(tmp_path: Path) -> None:
    # The config key `labels` is a table of free-form keys: the file form works, and so must the
    # flag form (dotted keys, as running_daemon and Daemon's callers pass them).
    cfg = node_config(tmp_path / "n", node_id="n", labels={"gpu": "h100"})
    assert dict(cfg.labels) == {"gpu": "h100"}


async def test_replicate_on_a_node_outside_any_cluster_is_a_clear_409(tmp_path: Path, origin: Origin) -> None:
    async with running_daemon(tmp_path / "alone", node_id="alone") as d:
        for method, path, body in (
            ("POST", "/v1/replicate", {"ref": origin.file_url("model.gguf"), "replicas": 2}),
            ("GET", "/v1/catalog", None),
        ):
            with pytest.raises(ApiError) as err:
                await call(d, method, path, body)
            assert err.value.status == 409, (path, err.value.status)
            assert err.value.code == "conflict"
            assert "not in a cluster" in err.value.message and "--cluster-token-file" in err.value.message
        assert (await status(d, origin.file_url("model.gguf")))["state"] == "absent"
    assert origin.counters.requests == 0


BAD_REPLICATE = [
    {"replicas": 2},
    {"ref": "not a ref", "replicas": 2},
    {"ref": "{ref}"},
    {"ref": "{ref}", "replicas": "2"},
    {"ref": "{ref}", "replicas": True},
    {"ref": "{ref}", "replicas": 1.5},
    {"ref": "{ref}", "replicas": -1},
    {"ref": "{ref}", "replicas": 1001},
    {"ref": "{ref}", "replicas": 1, "labels": ["gpu=h100"]},
    {"ref": "{ref}", "replicas": 1, "labels": {"gpu": 100}},
]


async def test_a_bad_replicate_request_is_400_and_changes_nothing(
    tmp_path: Path, token_file: Path, origin: Origin
) -> None:
    ref = origin.file_url("model.gguf")
    async with running_daemon(
        tmp_path / "solo", node_id="solo", **{"cluster.token_file": str(token_file), **FAST, **internal(origin)}
    ) as d:
        for bad in BAD_REPLICATE:
            body = {k: (ref if v == "{ref}" else v) for k, v in bad.items()}
            with pytest.raises(ApiError) as err:
                await call(d, "POST", "/v1/replicate", body)
            assert err.value.status == 400, (body, err.value.status, err.value.body)
            assert err.value.code in ("bad_request", "bad_ref"), body
        assert await call(d, "GET", "/v1/catalog") == []
        assert (await status(d, ref))["state"] == "absent"
    assert origin.counters.requests == 0


async def test_replicate_of_a_local_file_or_an_unlisted_internal_url_is_400(
    tmp_path: Path, token_file: Path, origin: Origin
) -> None:
    """Issue 18: such a ref names something on one node only; replicating it would make every
    owner read its own file or internal address and serve what it got to the cluster."""
    src = write_random_file(tmp_path / "src" / "w.bin", 1000, seed=3)
    port = URL(origin.url).port
    local = [
        f"file://{src}",
        f"http://127.0.0.2:{port}/model.gguf",
        f"http://localhost:{port}/model.gguf",
        "http://169.254.169.254/x.bin",
    ]
    async with running_daemon(
        tmp_path / "solo", node_id="solo", **{"cluster.token_file": str(token_file), **FAST, **internal(origin)}
    ) as d:
        for ref in local:
            with pytest.raises(ApiError) as err:
                await call(d, "POST", "/v1/replicate", {"ref": ref, "replicas": 1})
            assert (err.value.status, err.value.code) == (400, "bad_request"), (ref, err.value.status, err.value.body)
            assert "cannot replicate" in err.value.message and (
                "file://" in err.value.message or "internal address" in err.value.message
            )
        assert await call(d, "GET", "/v1/catalog") == []
        # The one internal origin the operator listed is still allowed.
        await call(d, "POST", "/v1/replicate", {"ref": origin.file_url("model.gguf"), "replicas": 1})
        assert [e["ref"] for e in await call(d, "GET", "/v1/catalog")] == [origin.file_url("model.gguf")]
    assert not any(p for p in (tmp_path / "solo").rglob("*") if p.is_file() and p.read_bytes() == src.read_bytes())
