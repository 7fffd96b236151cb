"""Peers: membership and gossip, holdings, mDNS discovery, and the client of the peer API."""
