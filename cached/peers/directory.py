"""The transfer layer's view of the cluster (``transfer.sources.PeerDirectory``), over gossip's
membership and holdings view: who is alive, who is only suspect, what each holds, and the client
to ask them. Reads only; gossip keeps these up to date."""

from __future__ import annotations

from cached.peers.client import PeerClient
from cached.peers.holdings import HoldingsView
from cached.peers.membership import Membership, Status


class GossipDirectory:
    def __init__(self, membership: Membership, view: HoldingsView, client: PeerClient) -> None:
        self._membership = membership
        self.view = view
        self.client = client

    @property
    def me(self) -> str:
        return self._membership.me.node_id

    def alive(self) -> list[tuple[str, str]]:
        # Suspect members count too: one slow gossip round must not hand their pieces (or their
        # share of origin reads) to everyone else. Only dead ones are gone.
        return [(m.info.node_id, m.info.address) for m in self._membership.members() if m.status is not Status.DEAD]

    def suspect(self) -> set[str]:
        # Asked last, and only for what no healthy peer has (see Swarm.peer_sources).
        return {m.info.node_id for m in self._membership.members() if m.status is Status.SUSPECT}

    def zone(self, node_id: str) -> str:
        """A member's ``labels.zone`` as gossiped ("" when it has none, or is unknown)."""
        me = self._membership.me
        if node_id == me.node_id:
            return me.labels.get("zone", "")
        m = self._membership.get(node_id)
        return "" if m is None else m.info.labels.get("zone", "")
