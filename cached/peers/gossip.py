"""Gossip: push-pull exchange of membership every round, and holdings pulled as deltas.

Each round (``gossip_interval_s``) this node advances its heartbeat, re-derives member statuses,
and exchanges its member list with up to ``fanout`` live members, chosen first among those that
recently answered us with a signed answer (*proven*; the rest of the fanout, at least one, goes
to members not yet proven, so newcomers get met). On top of that every round: up to
``SEEDS_PER_ROUND`` seeds in rotation (configured seeds are probed for ever, even when their
address is a known member; mDNS-found addresses until they prove themselves), and one suspect or
dead member in rotation (previously proven ones and the others alternately), so a healed node is
noticed within a few rounds however many fake members someone gossiped. A message of thousands
of invented members therefore cannot push real nodes out of the fanout and split the cluster.

Member entries carry each node's holdings version; when it is newer than what we hold, we pull
the difference from that node (``GET /p2p/v1/holdings?since=v``), so a change costs each peer one
small request, never a resend of everything. One failed exchange is logged at debug, counted,
and never stops the loop. Nothing of an answer that did not prove the cluster key is merged
(``PeerClient`` refuses it). Messages are bounded both ways: at most
``MAX_MEMBERS_PER_MESSAGE`` entries and ``MESSAGE_MEMBER_BYTES`` of them are sent (ourselves,
then proven, then other live members; never the ones we stopped hearing from) or taken;
membership itself is capped (``Membership``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable
from typing import Any

from cached.metrics import Metrics
from cached.peers.client import AnswerTooLarge, PeerClient, PeerError, PeerUnproven
from cached.peers.holdings import HoldingsView, LocalHoldings
from cached.peers.membership import MemberInfo, Membership, Status
from cached.periodic import every

log = logging.getLogger(__name__)

MAX_MEMBERS_PER_MESSAGE = 5000
MESSAGE_MEMBER_BYTES = 4 << 20  # leaves room for the catalog under the 8 MiB message cap
SEEDS_PER_ROUND = 4
MAX_DISCOVERED_SEEDS = 256
# What a malformed message from a peer can raise while we read it; caught per exchange, counted.
MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError)


class Gossip:
    def __init__(
        self,
        *,
        membership: Membership,
        holdings: LocalHoldings,
        view: HoldingsView,
        client: PeerClient,
        metrics: Metrics,
        interval_s: float,
        fanout: int,
        seeds: tuple[str, ...] = (),
        capacity: Callable[[], int] = lambda: 0,
        extra_out: Callable[[], dict[str, Any]] = lambda: {},
        extra_in: Callable[[dict[str, Any]], None] = lambda payload: None,
        on_status_change: Callable[[str, Status], None] = lambda node_id, status: None,
        rng: random.Random | None = None,
    ) -> None:
        self.membership = membership
        self.holdings = holdings
        self.view = view
        self.client = client
        self._metrics = metrics
        self._interval_s = interval_s
        self._fanout = fanout
        self._seeds: dict[str, None] = dict.fromkeys(s for s in seeds if s)  # configured: probed for ever
        self._found: dict[str, None] = {}  # from mDNS: probed until proven, bounded
        self._seed_turn = 0
        self._down_turn = [0, 0]
        self._capacity = capacity
        self._round_timeout_s = interval_s
        self._rng = rng or random.Random()
        self._pulling: set[str] = set()
        self._out_cache: tuple[float, list[dict[str, Any]]] | None = None
        self.rounds = 0
        # Extra state that rides along in every exchange (the cluster catalog): what to send,
        # and how to merge what arrives.
        self._extra_out = extra_out
        self._extra_in = extra_in
        # Told of every status transition found by a round (alive -> suspect -> dead).
        self._on_status_change = on_status_change

    @property
    def cluster(self) -> str:
        return self.membership.me.cluster

    def add_seed(self, address: str) -> None:
        """An address to contact (a peer found by mDNS), until it answers us with proof."""
        if address == self.membership.me.address or address in self._seeds or address in self._found:
            return
        if len(self._found) >= MAX_DISCOVERED_SEEDS:
            self._metrics.gossip_errors.labels("seeds_full").inc()
            return
        self._found[address] = None

    # --- incoming ------------------------------------------------------------------------------

    def receive(self, payload: Any, *, sender: str | None = None) -> dict[str, Any]:
        """Handle a peer's gossip (``sender``: the node id that signed it); return ours.
        Raises ValueError on a malformed message."""
        if not isinstance(payload, dict) or not isinstance(payload.get("members"), list):
            raise ValueError("gossip body must be an object with a 'members' list")
        if payload.get("cluster") != self.cluster:
            raise PermissionError(f"gossip from cluster {payload.get('cluster')!r}, we are {self.cluster!r}")
        self._merge(payload["members"], vouched=frozenset({sender}) if sender else frozenset())
        self._extra_in(payload)
        return self.message()

    def message(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "members": self._outgoing(), **self._extra_out()}

    def _outgoing(self) -> list[dict[str, Any]]:
        """Ourselves, then proven, then other live members (shuffled, so with more than fit each
        travels now and then), within the entry and byte budgets a receiver accepts. Members we
        no longer hear from are not passed on: their entries carry nothing newer, and a node
        that never knew them would take them for alive. Built at most once per round."""
        now = self.membership.clock()
        if self._out_cache is not None and now - self._out_cache[0] < self._interval_s:
            return self._out_cache[1]
        alive = self.membership.alive()
        proven = [m for m in alive if self.membership.proven(m)]
        others = [m for m in alive if not self.membership.proven(m)]
        self._rng.shuffle(others)
        out, budget = [self.membership.me.to_json()], MESSAGE_MEMBER_BYTES
        for m in proven + others:
            budget -= m.info.wire_size
            if len(out) >= MAX_MEMBERS_PER_MESSAGE or budget < 0:
                break
            out.append(m.info.to_json())
        self._out_cache = (now, out)
        return out

    def _merge(self, entries: list[Any], *, vouched: frozenset[str] = frozenset()) -> None:
        if len(entries) > MAX_MEMBERS_PER_MESSAGE:
            self._metrics.gossip_members_dropped.labels("message").inc(len(entries) - MAX_MEMBERS_PER_MESSAGE)
        infos = []
        for raw in entries[:MAX_MEMBERS_PER_MESSAGE]:
            if self._unchanged(raw):
                continue
            try:
                infos.append(MemberInfo.from_json(raw))
            except ValueError:
                self._metrics.gossip_errors.labels("malformed").inc()
        lives = {i.node_id: m.info.incarnation for i in infos if (m := self.membership.get(i.node_id)) is not None}
        refused = dict(self.membership.refused)
        changed = self.membership.merge(infos, vouched=vouched)
        for reason, n in self.membership.refused.items():
            if n > refused.get(reason, 0):
                self._metrics.gossip_members_dropped.labels(reason).inc(n - refused.get(reason, 0))
        for node_id in changed:
            m = self.membership.get(node_id)
            if m is not None and node_id in lives and m.info.incarnation != lives[node_id]:
                self.view.forget(node_id)  # a new life numbers its holdings from scratch
        self._update_gauges()

    def _unchanged(self, raw: Any) -> bool:
        """An entry of the same age as ours: nothing to parse (most of every message)."""
        if not isinstance(raw, dict) or not isinstance(node_id := raw.get("node_id"), str):
            return False
        cur = self.membership.get(node_id)
        return (
            cur is not None
            and raw.get("incarnation") == cur.info.incarnation
            and raw.get("heartbeat") == cur.info.heartbeat
        )

    # --- outgoing ------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self._interval_s, stopping, self.round, now=True)

    async def round(self) -> None:
        self.membership.beat(holdings_version=self.holdings.version, capacity_bytes=self._capacity())
        self._out_cache = None  # our new heartbeat goes out this round
        for node_id, status in self.membership.refresh():
            log.info("peer status changed node=%s status=%s", node_id, status)
            if status is Status.DEAD:
                self.view.forget(node_id)
            self._on_status_change(node_id, status)
        for node_id in set(n for n, _ in self.view.nodes()) - {m.info.node_id for m in self.membership.members()}:
            self.view.forget(node_id)
        targets = self._targets()
        if targets:
            # A peer that never answers must not hold up our own heartbeat.
            await asyncio.gather(
                *(asyncio.wait_for(self._exchange(a), self._round_timeout_s) for a in targets), return_exceptions=True
            )
        await self._pull_holdings()
        self.rounds += 1
        self._metrics.gossip_rounds.inc()
        self._update_gauges()

    def _targets(self) -> list[str]:
        ms = self.membership.members()
        alive = [m for m in ms if m.status is Status.ALIVE]
        proven = [m.info.address for m in alive if self.membership.proven(m)]
        unproven = [m.info.address for m in alive if not self.membership.proven(m)]
        chosen = self._rng.sample(proven, min(self._fanout, len(proven)))
        if unproven:
            chosen += self._rng.sample(unproven, min(max(1, self._fanout - len(chosen)), len(unproven)))
        chosen += self._next_seeds()
        chosen += self._next_down(ms)
        return [a for a in dict.fromkeys(chosen) if a != self.membership.me.address]

    def _next_seeds(self) -> list[str]:
        seeds = list(self._seeds) + list(self._found)
        if len(seeds) <= SEEDS_PER_ROUND:
            return seeds
        start = self._seed_turn % len(seeds)
        self._seed_turn += SEEDS_PER_ROUND
        return (seeds[start:] + seeds[:start])[:SEEDS_PER_ROUND]

    def _next_down(self, ms: list[Any]) -> list[str]:
        """One suspect or dead member in rotation, alternating between those we had proven
        before and the others, so thousands of invented ones do not hide a real one for long."""
        down = [m for m in ms if m.status is not Status.ALIVE]
        groups = ([m for m in down if m.last_proven is not None], [m for m in down if m.last_proven is None])
        which = self.rounds % 2
        group = groups[which] or groups[1 - which]
        if not group:
            return []
        turn = self._down_turn[which]
        self._down_turn[which] = turn + 1
        return [group[turn % len(group)].info.address]

    async def _exchange(self, address: str) -> None:
        try:
            answer = await self.client.gossip(address, self.message())
            if not isinstance(answer, dict) or answer.get("cluster") != self.cluster:
                self._metrics.gossip_errors.labels("other_cluster").inc()
                return
            # The answer proved the key: whoever answers at this address is proven.
            self._found.pop(address, None)
            self._merge(answer.get("members") or [])
            self.membership.prove(address)
            self._extra_in(answer)
        except PeerUnproven as e:
            self._metrics.gossip_errors.labels("unauthenticated").inc()
            log.debug("gossip answer not signed with the cluster key peer=%s error=%s", address, e)
        except AnswerTooLarge as e:
            self._metrics.gossip_errors.labels("too_large").inc()
            log.debug("gossip answer too large peer=%s error=%s", address, e)
        except PeerError as e:
            kind = "unauthorized" if e.status == 401 else "refused" if e.status == 403 else "unreachable"
            self._metrics.gossip_errors.labels(kind).inc()
            log.debug("gossip failed peer=%s error=%s", address, e)
        except MALFORMED as e:
            self._metrics.gossip_errors.labels("malformed").inc()
            log.debug("gossip answer malformed peer=%s error=%s", address, e)

    async def _pull_holdings(self) -> None:
        stale = [
            m
            for m in self.membership.alive()
            if m.info.holdings_version > self.view.version(m.info.node_id) and m.info.node_id not in self._pulling
        ]
        if stale:
            await asyncio.gather(
                *(asyncio.wait_for(self._pull(m.info), self._round_timeout_s) for m in stale), return_exceptions=True
            )

    async def _pull(self, info: MemberInfo) -> None:
        self._pulling.add(info.node_id)
        try:
            answer = await self.client.holdings(info.address, self.view.version(info.node_id))
            try:
                self.view.update(info.node_id, answer)
            except MALFORMED:
                # Our base no longer matches theirs (they restarted): take the whole state.
                self.view.forget(info.node_id)
                self.view.update(info.node_id, await self.client.holdings(info.address, 0))
        except PeerError as e:
            self._metrics.gossip_errors.labels("holdings").inc()
            log.debug("holdings pull failed peer=%s error=%s", info.node_id, e)
        except MALFORMED as e:
            self.view.forget(info.node_id)  # whatever half of it was applied is not to be trusted
            self._metrics.gossip_errors.labels("malformed").inc()
            log.debug("holdings answer malformed peer=%s error=%s", info.node_id, e)
        finally:
            self._pulling.discard(info.node_id)

    def _update_gauges(self) -> None:
        for state, n in self.membership.counts().items():
            self._metrics.peers.labels(state).set(n)


def default_advertise(listen_host: str, port: int) -> str:
    """The address peers should use when none is configured: the listen host, or our host name's."""
    if listen_host not in ("", "0.0.0.0", "::"):
        return f"{listen_host}:{port}"
    try:
        return f"{socket.gethostbyname(socket.gethostname())}:{port}"
    except OSError:
        return f"127.0.0.1:{port}"
