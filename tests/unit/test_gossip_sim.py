"""Gossip convergence, simulated in process: no sockets, a simulated clock, seeded randomness.

The big simulation runs 200 members with the real ``Membership`` and the real ``Gossip`` choice
of targets (``fanout`` random live members plus seeds not yet known), in synchronous push-pull
rounds: every node sends its member list as it stood at the start of the round to each target
and takes the target's list back. Starting from a chain of seeds (each node knows one other), we
count the rounds until everyone knows everyone, then the rounds until one node's holdings version
bump has reached all the others; both must be O(log N).

The small simulation runs the real ``Gossip.round`` (JSON wire form, holdings pulled as deltas)
over an in-memory peer client, including a node that dies and comes back.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

from cached.metrics import Metrics
from cached.peers.client import PeerError
from cached.peers.gossip import Gossip
from cached.peers.holdings import HoldingsView, LocalHoldings
from cached.peers.membership import MemberInfo, Membership, Status
from cached.types import BlobAdded

FANOUT = 3
BLOB = "b1" * 32


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def address(i: int) -> str:
    # Never dialled: the simulation routes by this string in memory.
    return f"sim-{i}:7471"


def make_node(
    i: int,
    clock: SimClock,
    metrics: Metrics,
    *,
    seeds: tuple[str, ...],
    seed: int,
    client: Any = None,
    incarnation: int = 1,
    suspect_after_s: float = 1e6,
    dead_after_s: float = 2e6,
    forget_after_s: float = 1e6,
) -> Gossip:
    me = MemberInfo(node_id=f"n{i:03d}", address=address(i), cluster="sim", incarnation=incarnation)
    membership = Membership(
        me, suspect_after_s=suspect_after_s, dead_after_s=dead_after_s, forget_after_s=forget_after_s, clock=clock
    )
    return Gossip(
        membership=membership,
        holdings=LocalHoldings(),
        view=HoldingsView(),
        client=client,
        metrics=metrics,
        interval_s=1.0,
        fanout=FANOUT,
        seeds=seeds,
        rng=random.Random(seed * 1_000_003 + i),
    )


def chain(n: int, seed: int) -> tuple[SimClock, list[Gossip]]:
    """Node i knows only node i+1 (the last knows nobody and waits to be found)."""
    clock, metrics = SimClock(), Metrics()
    return clock, [
        make_node(i, clock, metrics, seeds=(address(i + 1),) if i + 1 < n else (), seed=seed) for i in range(n)
    ]


def sync_round(clock: SimClock, nodes: list[Gossip], by_address: dict[str, Gossip]) -> None:
    """One synchronous push-pull round over everyone's state as it stood at the round's start."""
    for g in nodes:
        g.membership.beat(holdings_version=g.holdings.version)
    clock.now += 1.0
    for g in nodes:
        g.membership.refresh()
    lists = {g.membership.me.address: g.membership.snapshot() for g in nodes}
    plans = [(g, g._targets()) for g in nodes]  # the real target choice of a gossip round
    for g, targets in plans:
        mine = lists[g.membership.me.address]
        for t in targets:
            by_address[t].membership.merge(mine)  # push
            g.membership.merge(lists[t])  # pull


def converge(n: int, seed: int, max_rounds: int = 200) -> tuple[int, int]:
    """(rounds until all know all, rounds until a holdings bump reached all)."""
    clock, nodes = chain(n, seed)
    by_address = {g.membership.me.address: g for g in nodes}
    discovery = 0
    while any(len(g.membership.alive()) < n - 1 for g in nodes):
        assert discovery < max_rounds, f"n={n}: membership did not converge in {max_rounds} rounds"
        sync_round(clock, nodes, by_address)
        discovery += 1
    changed = nodes[n // 2]
    changed.holdings.record(BlobAdded(blob_hex=BLOB, size=123))
    node_id = changed.membership.me.node_id

    def behind() -> list[Gossip]:
        out = []
        for g in nodes:
            m = g.membership.get(node_id)
            if g is not changed and (m is None or m.info.holdings_version < changed.holdings.version):
                out.append(g)
        return out

    spread = 0
    while behind():
        assert spread < max_rounds, f"n={n}: the change did not spread in {max_rounds} rounds"
        sync_round(clock, nodes, by_address)
        spread += 1
    return discovery, spread


def test_membership_and_a_change_reach_200_members_in_log_n_rounds() -> None:
    results = {n: converge(n, seed=7) for n in (25, 50, 100, 200)}
    report = ", ".join(
        f"N={n}: all-know-all {d} rounds, change-to-all {s} rounds (bound {3 * math.ceil(math.log2(n))})"
        for n, (d, s) in results.items()
    )
    print(f"\ngossip convergence (fanout={FANOUT}, chain of seeds, seed=7): {report}")
    for n, (discovery, spread) in results.items():
        bound = 3 * math.ceil(math.log2(n))
        assert spread <= bound, (
            f"N={n}: a holdings change took {spread} rounds to reach everyone, bound {bound}; {report}"
        )
        assert discovery <= bound, (
            f"N={n}: membership took {discovery} rounds to converge from a chain, bound {bound}; {report}"
        )


# --- the real gossip round over an in-memory network ----------------------------------------------


def wire(value: Any) -> Any:
    return json.loads(json.dumps(value))


class LoopbackPeers:
    """A ``PeerClient`` stand-in that hands messages to the ``Gossip`` at an address, as JSON."""

    def __init__(self) -> None:
        self.nodes: dict[str, Gossip] = {}
        self.gossips = 0
        self.pulls: list[int] = []  # the ``since`` of every holdings pull

    async def gossip(self, address: str, payload: dict[str, Any]) -> dict[str, Any]:
        peer = self.nodes.get(address)
        if peer is None:
            raise PeerError(f"peer {address}: connection refused")
        self.gossips += 1
        try:
            return wire(peer.receive(wire(payload)))
        except PermissionError as e:
            raise PeerError(str(e), status=403) from None

    async def holdings(self, address: str, since: int) -> dict[str, Any]:
        peer = self.nodes.get(address)
        if peer is None:
            raise PeerError(f"peer {address}: connection refused")
        self.pulls.append(since)
        return wire(peer.holdings.since(since))


async def test_real_gossip_rounds_spread_members_and_holdings_deltas_and_notice_death_and_rebirth() -> None:
    n = 30
    clock, metrics, net = SimClock(), Metrics(), LoopbackPeers()
    timing = {"suspect_after_s": 3.0, "dead_after_s": 6.0, "forget_after_s": 100.0}
    nodes = [
        make_node(i, clock, metrics, seeds=(address(i + 1),) if i + 1 < n else (), seed=3, client=net, **timing)
        for i in range(n)
    ]
    net.nodes = {g.membership.me.address: g for g in nodes}

    async def run_rounds(until: Any, what: str, limit: int = 40) -> int:
        for r in range(1, limit + 1):
            clock.now += 1.0
            for g in list(net.nodes.values()):
                await g.round()
            if until():
                return r
        raise AssertionError(f"{what}: not reached in {limit} rounds")

    ids = {g.membership.me.node_id for g in nodes}
    r = await run_rounds(
        lambda: all({m.info.node_id for m in g.membership.alive()} == ids - {g.membership.me.node_id} for g in nodes),
        "all know all",
    )
    print(f"\nreal gossip, N={n}: all know all after {r} rounds")

    # A blob on one node: everyone's view lists it within a few rounds, as a delta pull.
    src = nodes[5]
    for i in range(3):
        # Blob ops: a manifest alone is held back until a shareable ref names it (issue 18).
        src.holdings.record(BlobAdded(blob_hex=f"{i:064x}", size=1))
    sid = src.membership.me.node_id
    await run_rounds(
        lambda: all(g is src or g.view.version(sid) == src.holdings.version for g in nodes),
        "first holdings known everywhere",
    )
    pulls_before = len(net.pulls)
    src.holdings.record(BlobAdded(blob_hex=BLOB, size=4096))
    r = await run_rounds(
        lambda: all(g is src or g.view.with_blob(BLOB) == [sid] for g in nodes), "blob known everywhere"
    )
    print(f"real gossip, N={n}: a new blob is in every view after {r} rounds")
    new_pulls = net.pulls[pulls_before:]
    assert new_pulls and all(since > 0 for since in new_pulls), (
        f"peers already holding a version pull deltas, not snapshots: {new_pulls}"
    )
    assert metrics.gossip_errors.labels("malformed")._value.get() == 0

    # One node dies: suspect, then dead, everywhere; its holdings leave the views.
    victim = nodes[11]
    vid = victim.membership.me.node_id
    del net.nodes[victim.membership.me.address]
    victim.holdings.record(BlobAdded(blob_hex="c" * 64, size=1))
    survivors = [g for g in nodes if g is not victim]

    def status_everywhere(status: Status) -> bool:
        return all((m := g.membership.get(vid)) is not None and m.status is status for g in survivors)

    await run_rounds(lambda: status_everywhere(Status.SUSPECT), "victim suspect everywhere")
    await run_rounds(lambda: status_everywhere(Status.DEAD), "victim dead everywhere")
    assert all(g.view.get(vid) is None for g in survivors), "a dead node's holdings are forgotten"

    # It comes back (same id and address, a new incarnation): alive again everywhere.
    reborn = make_node(11, clock, metrics, seeds=(address(0),), seed=4, client=net, incarnation=2, **timing)
    net.nodes[reborn.membership.me.address] = reborn
    reborn.holdings.record(BlobAdded(blob_hex="d" * 64, size=1))
    r = await run_rounds(
        lambda: (
            all(
                (m := g.membership.get(vid)) is not None and m.status is Status.ALIVE and m.info.incarnation == 2
                for g in survivors
            )
            and all(g.view.with_blob("d" * 64) == [vid] for g in survivors)
        ),
        "reborn node alive with its holdings everywhere",
    )
    print(f"real gossip, N={n}: a restarted node is alive again everywhere after {r} rounds")
    assert len(reborn.membership.alive()) == n - 1


# --- targets under a flood of invented members ------------------------------------------------------


def test_targets_favour_proven_members_probe_seeds_always_and_dead_ones_in_rotation() -> None:
    clock, metrics = SimClock(), Metrics()
    g = make_node(
        0, clock, metrics, seeds=(address(1),), seed=5, suspect_after_s=1.0, dead_after_s=2.0, forget_after_s=1e6
    )
    real = [MemberInfo(node_id=f"n{i:03d}", address=address(i), cluster="sim", incarnation=1) for i in (1, 2, 3)]
    g.membership.merge(real)
    for r in real:
        g.membership.prove(r.address)  # they answered our signed requests
    # The real node 3 goes silent and dies; 5,000 invented members arrive, then die too.
    clock.now += 0.5
    g.membership.merge(
        [MemberInfo(node_id=f"fake{i:05d}", address=f"fake-{i}:1", cluster="sim", incarnation=1) for i in range(5000)]
    )
    for n in (1, 2):
        g.membership.merge(
            [
                MemberInfo(
                    node_id=f"n{n:03d}", address=address(n), cluster="sim", incarnation=1, heartbeat=int(clock.now * 10)
                )
            ]
        )
        g.membership.prove(address(n))
    picks = []
    for _ in range(20):
        targets = g._targets()
        picks.append(targets)
        assert address(1) in targets, "a seed is probed every round, even as a known member"
        assert address(2) in targets, "proven live members fill the fanout first"
        assert len(targets) <= FANOUT + 2 + 2, targets
        g.rounds += 1
    # Time passes: everything but the proven live ones is dead. The real dead node is probed
    # within two rounds, not one round in 5,000.
    clock.now += 3.0
    for n in (1, 2):
        g.membership.merge(
            [
                MemberInfo(
                    node_id=f"n{n:03d}", address=address(n), cluster="sim", incarnation=1, heartbeat=int(clock.now * 10)
                )
            ]
        )
    g.membership.refresh()
    assert g.membership.counts()["dead"] == 5001
    seen = set()
    for _ in range(2):
        seen.update(g._targets())
        g.rounds += 1
    assert address(3) in seen, "the once-proven dead member is probed in rotation"
    # Only live members travel: the 5,001 dead ones are not passed on.
    g._out_cache = None
    assert sorted(m["node_id"] for m in g.message()["members"]) == ["n000", "n001", "n002"]
