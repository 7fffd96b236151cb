"""Gossip: push-pull exchange of membership every round, and holdings pulled as deltas.

Each round (``gossip_interval_s``) this node advances its heartbeat, re-derives member statuses,
and exchanges its member list with ``fanout`` random live members (plus any seed or mDNS-found
address not yet known, and now and then a suspect or dead one, so a healed node is noticed).
Member entries carry each node's holdings version; when it is newer than what we hold, we pull
the difference from that node (``GET /p2p/v1/holdings?since=v``), so a change costs each peer one
small request, never a resend of everything. One failed exchange is logged at debug, counted,
and never stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import Any, Callable

from cached.metrics import Metrics
from cached.peers.client import PeerClient, PeerError
from cached.peers.holdings import HoldingsView, LocalHoldings
from cached.peers.membership import MemberInfo, Membership, Status

log = logging.getLogger(__name__)

MAX_MEMBERS_PER_MESSAGE = 5000
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
        rng: random.Random | None = None,
    ) -> None:
        self.membership = membership
        self.holdings = holdings
        self.view = view
        self.client = client
        self._metrics = metrics
        self._interval_s = interval_s
        self._fanout = fanout
        self._seeds: set[str] = set(seeds)
        self._capacity = capacity
        self._round_timeout_s = interval_s
        self._rng = rng or random.Random()
        self._pulling: set[str] = set()
        self.rounds = 0
        # Extra state that rides along in every exchange (the cluster catalog), set by the
        # composition root: what to send, and how to merge what arrives.
        self.extra_out: Callable[[], dict[str, Any]] = lambda: {}
        self.extra_in: Callable[[dict[str, Any]], None] = lambda payload: None
        # Told of every status transition found by a round (alive -> suspect -> dead).
        self.on_status_change: Callable[[str, Status], None] = lambda node_id, status: None

    @property
    def cluster(self) -> str:
        return self.membership.me.cluster

    def add_seed(self, address: str) -> None:
        """An address to contact (a --seed, or a peer found by mDNS)."""
        if address != self.membership.me.address:
            self._seeds.add(address)

    # --- incoming ------------------------------------------------------------------------------

    def receive(self, payload: Any) -> dict[str, Any]:
        """Handle a peer's gossip; return ours. Raises ValueError on a malformed message."""
        if not isinstance(payload, dict) or not isinstance(payload.get("members"), list):
            raise ValueError("gossip body must be an object with a 'members' list")
        if payload.get("cluster") != self.cluster:
            raise PermissionError(f"gossip from cluster {payload.get('cluster')!r}, we are {self.cluster!r}")
        self._merge(payload["members"])
        self.extra_in(payload)
        return self.message()

    def message(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "members": [m.to_json() for m in self.membership.snapshot()], **self.extra_out()}

    def _merge(self, entries: list[Any]) -> None:
        infos = []
        for raw in entries[:MAX_MEMBERS_PER_MESSAGE]:
            try:
                infos.append(MemberInfo.from_json(raw))
            except ValueError:
                self._metrics.gossip_errors.labels("malformed").inc()
        lives = {i.node_id: m.info.incarnation for i in infos if (m := self.membership.get(i.node_id)) is not None}
        changed = self.membership.merge(infos)
        for node_id in changed:
            m = self.membership.get(node_id)
            if m is not None:
                self._seeds.discard(m.info.address)
                if node_id in lives and m.info.incarnation != lives[node_id]:
                    self.view.forget(node_id)  # a new life numbers its holdings from scratch
        self._update_gauges()

    # --- outgoing ------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.round()
            try:
                await asyncio.wait_for(stopping.wait(), self._interval_s)
            except asyncio.TimeoutError:
                pass

    async def round(self) -> None:
        self.membership.beat(holdings_version=self.holdings.version, capacity_bytes=self._capacity())
        for node_id, status in self.membership.refresh():
            log.info("peer status changed node=%s status=%s", node_id, status)
            if status is Status.DEAD:
                self.view.forget(node_id)
            self.on_status_change(node_id, status)
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
        alive = [m.info.address for m in self.membership.alive()]
        chosen = self._rng.sample(alive, min(self._fanout, len(alive)))
        known = {m.info.address for m in self.membership.members()}
        chosen += [s for s in self._seeds if s not in known]
        others = [m.info.address for m in self.membership.members() if m.status is not Status.ALIVE]
        if others and self._rng.random() < 0.5:
            chosen.append(self._rng.choice(others))  # so a node that heals is noticed
        return list(dict.fromkeys(chosen))

    async def _exchange(self, address: str) -> None:
        try:
            answer = await self.client.gossip(address, self.message())
            if answer.get("cluster") != self.cluster:
                self._metrics.gossip_errors.labels("other_cluster").inc()
                return
            self._merge(answer.get("members") or [])
            self.extra_in(answer)
        except PeerError as e:
            kind = "unauthorized" if e.status == 401 else "refused" if e.status == 403 else "unreachable"
            self._metrics.gossip_errors.labels(kind).inc()
            log.debug("gossip failed peer=%s error=%s", address, e)
        except MALFORMED as e:
            self._metrics.gossip_errors.labels("malformed").inc()
            log.debug("gossip answer malformed peer=%s error=%s", address, e)

    async def _pull_holdings(self) -> None:
        stale = [
            m for m in self.membership.alive()
            if m.info.holdings_version > self.view.version(m.info.node_id) and m.info.node_id not in self._pulling
        ]
        if stale:
            await asyncio.gather(*(asyncio.wait_for(self._pull(m.info), self._round_timeout_s) for m in stale), return_exceptions=True)

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
