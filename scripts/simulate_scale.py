#!/usr/bin/env python3
"""Gossip and holdings at 1,000 and 10,000 members, simulated in process (docs/scale.md).

No network: every figure comes from the daemon's own code run on a simulated clock, with
messages handed over in memory.

* Message and memory per node (real code at every size): a ``Gossip`` whose ``Membership`` knows
  N members (realistic ids, addresses and zone/rack labels) builds its real gossip message
  (``Gossip.message``: the member list within ``MAX_MEMBERS_PER_MESSAGE`` and
  ``MESSAGE_MEMBER_BYTES``); its JSON is what one exchange carries each way. A receiver merges it
  (``Gossip.receive``) with every entry newer (a gossip round's worst case) and with none newer
  (the fast path). ``tracemalloc`` measures a ``Membership`` of N members and a ``HoldingsView``
  of N nodes, each filled from the real wire form of a ``LocalHoldings`` (``since(0)``) of a
  typical node (a few models, some shards, one download in flight). ``with_blob`` (who has this
  blob) is timed over the N-node view.
* Gossip bytes per node per second: the round's real structure (``fanout`` random live members,
  up to ``SEEDS_PER_ROUND`` configured seeds probed every round, one down member in rotation),
  each exchange a message each way, over the measured message size; for an ordinary node and for
  a seed that every node names. Holdings pulls: every node pulls a delta from every member whose
  holdings version moved, so during a cluster-wide download every node pulls from every other
  node once per round.
* Rounds to converge: how many rounds until every node knows (a) a new member that joined through
  one seed and (b) a holdings version bump of one node (the bump is pulled the round it is
  learnt). At ``--full-max`` members and below, N real ``Membership`` objects and the real
  ``Gossip._targets`` choice, in synchronous push-pull rounds (only the entry being tracked is
  handed over: ``Membership.merge`` ignores an entry that is not newer, so the others change
  nothing). Above it, N real memberships do not fit in one process (N^2 entries), so a rumour
  model with the same rule (``fanout`` uniform live targets plus the seeds, push and pull, an
  entry carried with the probability the real message cap gives at N) runs instead; at
  ``--full-max`` both run, to show they agree.

Usage: ``scripts/simulate_scale.py [--sizes 1000,10000] [--seed 1] [--json FILE]`` (run with the
project's interpreter, ``PYTHONPATH`` at the repository). The Markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import random
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cached.config import PeerConfig  # noqa: E402
from cached.metrics import Metrics  # noqa: E402
from cached.peers.gossip import MAX_MEMBERS_PER_MESSAGE, MESSAGE_MEMBER_BYTES, Gossip  # noqa: E402
from cached.peers.holdings import HoldingsView, LocalHoldings  # noqa: E402
from cached.peers.membership import MemberInfo, Membership  # noqa: E402
from cached.types import (  # noqa: E402
    BlobAdded,
    ManifestAdded,
    PartialStarted,
    PieceVerified,
    RefChanged,
)

# The daemon's own [peer] defaults (gossip_interval_s, fanout, the suspect/dead/forget timings).
DEFAULTS = SimpleNamespace(
    **{f.name: f.default for f in dataclasses.fields(PeerConfig) if f.default is not dataclasses.MISSING}
)
INCARNATION = 1_764_000_000_000  # a start time in ms, as a real node has
HTTP_OVERHEAD = 600  # request line, headers and the signature headers of one signed request or answer
SEEDS = 3  # configured seeds per node (static: the same three for all; rack: three of its rack)
RACK = 40  # nodes per rack
SERVICE = "cached-peers.cached.svc:7471"  # the DaemonSet's seed: a name for every pod, one per round
# How nodes name their seeds: every node the same three (a static peer.seeds list); three of its
# own rack; or the DaemonSet's headless Service, which reaches one random pod per round.
LAYOUTS = ("static", "rack", "service")


def seed_ids(layout: str, i: int, n: int) -> list[int]:
    """The node indexes node ``i`` names as seeds (service: none; see SERVICE)."""
    if layout == "static":
        return list(range(min(SEEDS, n)))
    if layout == "rack":
        base = i // RACK * RACK
        return list(range(base, min(base + SEEDS, n)))
    return []


PIECE = 16 << 20
VIEW_SAMPLE = 500  # nodes a HoldingsView is actually built for (scaled linearly to N)


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def info(i: int, *, heartbeat: int = 1000) -> MemberInfo:
    """A member as a real cluster has them: 16-char ids, pod-network addresses, zone and rack."""
    return MemberInfo(
        node_id=f"gpu-node-{i:06d}",
        address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:7471",
        cluster="prod",
        incarnation=INCARNATION + i,
        heartbeat=heartbeat,
        holdings_version=40,
        capacity_bytes=7 << 40,
        labels={"zone": f"zone-{i % 4}", "rack": f"r{(i // 40) % 1000:03d}"},
    )


def membership(me: MemberInfo, clock: SimClock) -> Membership:
    return Membership(
        me,
        suspect_after_s=DEFAULTS.suspect_after_s,
        dead_after_s=DEFAULTS.dead_after_s,
        forget_after_s=DEFAULTS.forget_after_s,
        clock=clock,
        wall_clock=lambda: INCARNATION / 1000 + 1e6,
    )


def gossip_node(ms: Membership, seeds: tuple[str, ...], rng: random.Random) -> Gossip:
    return Gossip(
        membership=ms,
        holdings=LocalHoldings(),
        view=HoldingsView(),
        client=None,  # type: ignore[arg-type]  # never dialled: the simulation hands messages over
        metrics=Metrics(),
        interval_s=DEFAULTS.gossip_interval_s,
        fanout=DEFAULTS.fanout,
        seeds=seeds,
        rng=rng,
    )


def wire(value: Any) -> Any:
    return json.loads(json.dumps(value))


# --- message, merge and memory per node ----------------------------------------------------------


def typical_holdings() -> LocalHoldings:
    """A GPU node's store: 3 models of 30 shards each, one 16-shard download half-way."""
    h = LocalHoldings()
    for m in range(3):
        digest = f"{m:02d}" * 32
        for s in range(30):
            h.record(BlobAdded(blob_hex=f"{m:02d}{s:02d}" * 16, size=4 << 30, identity_key=f"hf:org/model-{m}:{s}"))
        h.record(ManifestAdded(digest=digest))
        h.record(RefChanged(ref=f"hf://org/model-{m}@main", digest=digest))
    for s in range(16):
        key = f"hf:org/model-new:{s}"
        h.record(PartialStarted(key=key, size=4 << 30, piece_size=PIECE))
        for p in range(128):
            h.record(PieceVerified(key=key, index=p, digest=bytes([p % 256]) * 32))
    return h


@dataclass
class NodeCost:
    members: int
    message_entries: int
    message_bytes: int
    merge_all_newer_ms: float
    merge_none_newer_ms: float
    membership_bytes: int
    holdings_view_bytes: int
    holdings_snapshot_bytes: int
    with_blob_ms: float


def measure_node(n: int, seed: int) -> NodeCost:
    clock = SimClock()
    infos = [info(i) for i in range(n)]
    raw = json.dumps([i.to_json() for i in infos[1:]])
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    me = membership(infos[0], clock)
    # Each entry as a node holds it: parsed from a message (its own strings and dicts).
    me.merge([MemberInfo.from_json(d) for d in json.loads(raw)])
    members_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    g = gossip_node(me, (), random.Random(seed))
    # Proven: the members that answered us within dead_after_s (about fanout per round).
    for m in infos[1 : 1 + int(DEFAULTS.fanout * DEFAULTS.dead_after_s / DEFAULTS.gossip_interval_s)]:
        me.prove(m.address)
    msg = g.message()
    body = json.dumps(msg)
    # A receiver that knows every member, one heartbeat behind (worst case) or up to date.
    behind = membership(info(n + 1), clock)
    behind.merge([replace(i, heartbeat=i.heartbeat - 1) for i in infos])
    rx_behind = gossip_node(behind, (), random.Random(seed + 1))
    current = membership(info(n + 2), clock)
    current.merge(infos)
    rx_current = gossip_node(current, (), random.Random(seed + 2))
    parsed = json.loads(body)
    gc.collect()
    gc.disable()
    try:
        rx_current._merge(parsed["members"][:10])  # warm: the first calls after tracemalloc are slow
        t0 = time.perf_counter()
        rx_behind._merge(parsed["members"])
        t1 = time.perf_counter()
        rx_current._merge(parsed["members"])
        t2 = time.perf_counter()
    finally:
        gc.enable()
    view_bytes, snapshot_bytes, lookup_ms = measure_view(n)
    return NodeCost(
        members=n,
        message_entries=len(msg["members"]),
        message_bytes=len(body),
        merge_all_newer_ms=(t1 - t0) * 1000,
        merge_none_newer_ms=(t2 - t1) * 1000,
        membership_bytes=members_bytes,
        holdings_view_bytes=view_bytes,
        holdings_snapshot_bytes=snapshot_bytes,
        with_blob_ms=lookup_ms,
    )


def measure_view(n: int) -> tuple[int, int, float]:
    """(bytes of a HoldingsView of n typical nodes, bytes of one node's snapshot, ms per with_blob).
    The view is built for at most VIEW_SAMPLE nodes and scaled: each node's entry is independent
    of the others, so the memory is linear in n (and a 10,000-node view would not fit beside the
    other helpers' work on the machine this runs on)."""
    snapshot = wire(typical_holdings().since(0))
    k = min(n, VIEW_SAMPLE)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    view = HoldingsView()
    for i in range(k):
        view.update(f"gpu-node-{i:06d}", snapshot_copy(snapshot))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    gc.collect()
    gc.disable()  # a collection over the view's millions of objects is not the lookup's cost
    try:
        view.with_blob("0001" * 16)  # the first call after tracemalloc pays for its teardown
        t0 = time.perf_counter()
        for _ in range(20):
            view.with_blob("0001" * 16)
        ms = (time.perf_counter() - t0) / 20 * 1000
    finally:
        gc.enable()
    return int(used * n / k), len(json.dumps(snapshot)), ms * n / k


def snapshot_copy(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A fresh copy of the parsed snapshot (its strings are new objects, as JSON parsing makes
    them for every peer's answer), cheaper than a JSON round trip."""
    return json.loads(json.dumps(snapshot))


# --- traffic per node per second -------------------------------------------------------------------


@dataclass
class Traffic:
    members: int
    layout: str
    node_bytes_per_s: float  # sent + received by an ordinary node
    seed_bytes_per_s: float  # sent + received by the busiest seed
    seed_exchanges_per_s: float  # exchanges the busiest seed answers per second
    pulls_per_node_per_s_busy: float  # holdings pulls while every node is downloading


def traffic(cost: NodeCost, layout: str) -> Traffic:
    n, interval = cost.members, DEFAULTS.gossip_interval_s
    exchange = 2 * (cost.message_bytes + HTTP_OVERHEAD)  # our message and the answer
    # A node starts fanout exchanges plus one per seed it names (configured seeds are probed every
    # round), and answers on average the fanout exchanges others start; a seed also answers every
    # node that names it, every round.
    seeds = 1 if layout == "service" else SEEDS
    started = DEFAULTS.fanout + seeds
    named_by = {"static": n - 1, "rack": min(RACK, n) - 1, "service": 1}[layout]
    return Traffic(
        members=n,
        layout=layout,
        node_bytes_per_s=(started + DEFAULTS.fanout + (1 if layout == "service" else 0)) * exchange / interval,
        seed_bytes_per_s=(started + DEFAULTS.fanout + named_by) * exchange / interval,
        seed_exchanges_per_s=(DEFAULTS.fanout + named_by) / interval,
        pulls_per_node_per_s_busy=(n - 1) / interval,
    )


# --- rounds to converge ---------------------------------------------------------------------------


def real_rounds(n: int, layout: str, seed: int, max_rounds: int = 100) -> tuple[int, int]:
    """(rounds for a joiner to be known by all, rounds for a holdings bump to reach all), with n
    real memberships and the real target choice, seeds named as ``layout`` says."""
    clock = SimClock()
    infos = [info(i) for i in range(n)]

    def seeds(i: int) -> tuple[str, ...]:
        return (SERVICE,) if layout == "service" else tuple(infos[s].address for s in seed_ids(layout, i, n))

    nodes = []
    for i in range(n):
        ms = membership(infos[i], clock)
        ms.merge(infos[:i] + infos[i + 1 :])
        nodes.append(gossip_node(ms, seeds(i), random.Random(seed * 1_000_003 + i)))
    by_address = {g.membership.me.address: g for g in nodes}
    # (a) A node joins (in the last rack): it names its seeds; the rest learn of it by gossip.
    joiner_info = info(n)
    joiner = gossip_node(membership(joiner_info, clock), seeds(n - 1), random.Random(seed))
    by_address[joiner_info.address] = joiner
    everyone = nodes + [joiner]
    pick = random.Random(seed + 7)
    join = spread(
        everyone,
        by_address,
        pick,
        joiner_info.node_id,
        lambda g: g is joiner or g.membership.get(joiner_info.node_id) is not None,
    )
    # (b) One node's holdings version moves (a piece verified).
    changed = nodes[n // 2]
    changed.membership.beat(holdings_version=changed.membership.me.holdings_version + 1)
    target = changed.membership.me
    bump = spread(
        everyone,
        by_address,
        pick,
        target.node_id,
        lambda g: (
            (m := g.membership.get(target.node_id)) is None
            or m.info.holdings_version >= target.holdings_version
            or g is changed
        ),
        max_rounds=max_rounds,
    )
    return join, bump


def spread(
    nodes: list[Gossip],
    by_address: dict[str, Gossip],
    pick: random.Random,
    node_id: str,
    knows: Any,
    max_rounds: int = 100,
) -> int:
    """Synchronous push-pull rounds until ``knows`` holds on every node; each exchange hands over
    the tracked member's entry (the only one that differs) both ways. The Service seed reaches
    one node at random per exchange, as its DNS name does."""

    def entry(g: Gossip) -> list[MemberInfo]:
        if g.membership.me.node_id == node_id:
            return [g.membership.me]
        m = g.membership.get(node_id)
        return [m.info] if m is not None else []

    for r in range(1, max_rounds + 1):
        held = {g.membership.me.address: entry(g) for g in nodes}
        plans = [(g, g._targets()) for g in nodes]
        for g, targets in plans:
            mine = held[g.membership.me.address]
            for t in targets:
                peer = by_address[t] if t != SERVICE else nodes[pick.randrange(len(nodes))]
                t = peer.membership.me.address
                peer.membership.merge(mine)
                g.membership.merge(held[t])
        if all(knows(g) for g in nodes):
            return r
    raise AssertionError(f"not spread in {max_rounds} rounds")


def model_rounds(n: int, layout: str, carry: float, seed: int, joiner: bool, max_rounds: int = 100) -> int:
    """The rumour model: every round each node exchanges with ``fanout`` uniform others and with
    its seeds (``layout``); an informed side passes the entry with probability ``carry`` (the
    share of members a capped message holds; always for its own entry). Returns rounds until
    all know. The tracked node is the last; a joiner is unknown to all at the start."""
    rng = random.Random(seed)
    knows = bytearray(n)
    origin = n - 1
    knows[origin] = 1
    fanout = DEFAULTS.fanout
    seeds_of = [seed_ids(layout, i, n) for i in range(n)]
    for r in range(1, max_rounds + 1):
        before = bytes(knows)
        for i in range(n):
            # A joiner knows no member yet: it exchanges with its seeds only, and nobody picks
            # it as a random target before knowing it.
            if joiner and i == origin and r == 1:
                targets = set(seeds_of[i]) or {rng.randrange(n)}
            else:
                targets = {rng.randrange(n) for _ in range(fanout)} | set(seeds_of[i])
                if layout == "service":
                    targets.add(rng.randrange(n))
            targets.discard(i)
            for t in targets:
                if before[i] and not knows[t] and (i == origin or rng.random() < carry or carry >= 1):
                    knows[t] = 1
                if before[t] and not knows[i] and (t == origin or rng.random() < carry or carry >= 1):
                    knows[i] = 1
        if all(knows):
            return r
    raise AssertionError(f"model: not spread in {max_rounds} rounds")


def carry_share(cost: NodeCost) -> float:
    return min(1.0, cost.message_entries / max(1, cost.members))


# --- report --------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="member counts (default 1000,10000)")
    p.add_argument("--full-max", type=int, default=1000, help="largest N run with N real memberships")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="convergence runs per size (seeds seed..seed+k-1)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    out: dict[str, Any] = {
        "defaults": {
            "gossip_interval_s": DEFAULTS.gossip_interval_s,
            "fanout": DEFAULTS.fanout,
            "seeds": SEEDS,
            "max_members_per_message": MAX_MEMBERS_PER_MESSAGE,
            "message_member_bytes": MESSAGE_MEMBER_BYTES,
        },
        "sizes": {},
    }
    print(
        f"gossip_interval_s={DEFAULTS.gossip_interval_s}, fanout={DEFAULTS.fanout}, {SEEDS} seeds named by every node, "
        f"message cap {MAX_MEMBERS_PER_MESSAGE} entries / {fmt_bytes(MESSAGE_MEMBER_BYTES)}\n"
    )
    rows = []
    costs: list[NodeCost] = []
    for n in sizes:
        t0 = time.perf_counter()
        cost = measure_node(n, a.seed)
        carry = carry_share(cost)
        out["sizes"][str(n)] = {"cost": cost.__dict__, "carry": carry, "layouts": {}}
        for layout in LAYOUTS:
            tr = traffic(cost, layout)
            runs: dict[str, list[int]] = {"real_join": [], "real_bump": [], "model_join": [], "model_bump": []}
            for k in range(a.repeat):
                if n <= a.full_max:
                    j, b = real_rounds(n, layout, a.seed + k)
                    runs["real_join"].append(j)
                    runs["real_bump"].append(b)
                runs["model_join"].append(model_rounds(n, layout, carry, a.seed + k, joiner=True))
                runs["model_bump"].append(model_rounds(n, layout, carry, a.seed + k, joiner=False))
            out["sizes"][str(n)]["layouts"][layout] = {"traffic": tr.__dict__, "rounds": runs}
            rows.append((cost, tr, carry, runs))
            print(f"[N={n} {layout}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        costs.append(cost)

    def rounds(xs: list[int]) -> str:
        return f"{statistics.median(xs):.0f} ({min(xs)}-{max(xs)})" if xs else "-"

    print(
        "| members | message entries | message bytes | merge, all newer / none | membership memory | holdings view memory | with_blob |"
    )
    print("|---|---|---|---|---|---|---|")
    for cost in costs:
        print(
            f"| {cost.members:,} | {cost.message_entries:,} | {fmt_bytes(cost.message_bytes)} | "
            f"{cost.merge_all_newer_ms:.0f} / {cost.merge_none_newer_ms:.0f} ms | {fmt_bytes(cost.membership_bytes)} | "
            f"{fmt_bytes(cost.holdings_view_bytes)} ({fmt_bytes(cost.holdings_snapshot_bytes)} per node on the wire) | "
            f"{cost.with_blob_ms:.2f} ms |"
        )
    print()
    print(
        "| members | seeds | gossip per node (sent+received) | busiest seed | its exchanges/s | "
        "holdings pulls per node per s, all downloading | rounds: join (real / model) | rounds: holdings bump (real / model) | bound 3*log2 N |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cost, tr, _carry, runs in rows:
        print(
            f"| {cost.members:,} | {tr.layout} | {fmt_bytes(tr.node_bytes_per_s)}/s | {fmt_bytes(tr.seed_bytes_per_s)}/s | "
            f"{tr.seed_exchanges_per_s:,.0f} | {tr.pulls_per_node_per_s_busy:,.0f} | "
            f"{rounds(runs['real_join'])} / {rounds(runs['model_join'])} | {rounds(runs['real_bump'])} / {rounds(runs['model_bump'])} | "
            f"{3 * math.ceil(math.log2(cost.members))} |"
        )
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
