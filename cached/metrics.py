"""Every Prometheus collector of one daemon, bound to the registry it is handed.

Each daemon owns its registry, so several daemons can run in one test process. Labels never carry
model names or digests (unbounded cardinality); per-model figures live in the API.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Why an mDNS announcement was dropped (``peers.mdns.check_announcement`` and its resolver).
MDNS_REJECT_REASONS = ("other_cluster", "malformed", "unsigned", "bad_mac", "stale", "source_mismatch", "busy")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.fetched_bytes = Counter(
            "cached_fetched_bytes", "Bytes fetched into the store, by source.", ["source"], registry=r
        )
        self.served_bytes = Counter(
            "cached_served_bytes",
            "Bytes this node uploaded to peers (peer API only; see cached_local_served_bytes for local clients).",
            registry=r,
        )
        # Bytes of files sent to clients on this node through a compatibility API, by API (a fixed
        # set: "hf" for /hf, "v2" for the OCI mirror); never the peer uploads above.
        self.local_served_bytes = Counter(
            "cached_local_served_bytes",
            "Bytes of files served to local clients, by API (hf: the /hf endpoint, v2: the OCI mirror).",
            ["api"],
            registry=r,
        )
        self.peer_bytes = Counter(
            "cached_peer_bytes",
            "Bytes fetched from peers, by whether they crossed a zone boundary (labels.zone).",
            ["scope"],
            registry=r,
        )
        self.origin_handovers = Counter(
            "cached_origin_handovers",
            "Origin pieces this node owned and handed, unstarted, to a node of another zone that asked.",
            registry=r,
        )
        self.piece_verify_failures = Counter(
            "cached_piece_verify_failures", "Pieces whose BLAKE3 did not match, by source.", ["source"], registry=r
        )
        self.store_bytes = Gauge("cached_store_bytes", "Bytes held in the store (blobs and partials).", registry=r)
        self.store_capacity = Gauge("cached_store_capacity_bytes", "Capacity of the store in bytes.", registry=r)
        self.models = Gauge("cached_models", "Models known on this node, by state.", ["state"], registry=r)
        self.evictions = Counter("cached_evictions", "Models evicted from this node.", registry=r)
        self.peers = Gauge("cached_peers", "Cluster members as this node sees them, by state.", ["state"], registry=r)
        self.fetch_duration = Histogram(
            "cached_fetch_duration_seconds",
            "Duration of one model fetch, by result.",
            ["result"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.prefetch_jobs = Counter(
            "cached_prefetch_jobs", "Prefetch jobs finished, by result.", ["result"], registry=r
        )
        self.origin_errors = Counter(
            "cached_origin_errors", "Failed origin requests, by kind of failure.", ["kind"], registry=r
        )
        self.api_errors = Counter(
            "cached_api_errors", "Local API requests answered with an error, by error code.", ["code"], registry=r
        )
        self.bad_pieces_found = Counter(
            "cached_verify_bad_pieces", "Pieces of stored blobs found corrupt by verify or scrub.", registry=r
        )
        self.gossip_rounds = Counter("cached_gossip_rounds", "Gossip rounds run by this node.", registry=r)
        self.gossip_errors = Counter(
            "cached_gossip_errors", "Failed gossip exchanges or holdings pulls, by kind.", ["kind"], registry=r
        )
        self.peer_auth_failures = Counter(
            "cached_peer_auth_failures", "Peer API requests refused for a missing or wrong cluster token.", registry=r
        )
        self.peer_auth_refused = Counter(
            "cached_peer_auth_refused",
            "Peer API requests refused by signature check, by reason (missing, malformed, stale, bad_mac, "
            "body_mismatch, replay, nonce_cache_full, body_too_large).",
            ["reason"],
            registry=r,
        )
        self.peer_unauthenticated = Counter(
            "cached_peer_unauthenticated",
            "Answers from peer addresses that did not prove they hold the cluster token (nothing of them is used).",
            registry=r,
        )
        self.peer_answer_too_large = Counter(
            "cached_peer_answer_too_large",
            "Peer answers abandoned past their size cap, by route.",
            ["route"],
            registry=r,
        )
        self.gossip_members_dropped = Counter(
            "cached_gossip_members_dropped",
            "Member entries from gossip not taken, by reason (full: membership at its cap; message: past the per-message cap).",
            ["reason"],
            registry=r,
        )
        self.peer_throttled = Counter(
            "cached_peer_throttled", "Peer API requests answered 429 because serving was at its limit.", registry=r
        )
        self.peer_manifest_rejected = Counter(
            "cached_peer_manifest_rejected",
            "Peer manifests ignored because they disagree with the origin's listing of the ref.",
            registry=r,
        )
        self.peer_content_rejected = Counter(
            "cached_peer_content_rejected",
            "Files whose bytes from peers failed the origin's own checksum (fetched again from the origin).",
            registry=r,
        )
        self.catalog_dropped = Counter(
            "cached_catalog_entries_dropped",
            "Catalog entries from gossip that were dropped, by reason (local_ref: file:// or an internal address).",
            ["reason"],
            registry=r,
        )
        self.leases = Gauge("cached_leases", "Active launcher leases.", registry=r)
        self.mdns_rejected = Counter(
            "cached_mdns_rejected", "mDNS announcements ignored, by reason (see peers.mdns).", ["reason"], registry=r
        )
        self.listener_connections = Gauge(
            "cached_listener_connections", "Open connections, by listener (api, peer).", ["listener"], registry=r
        )
        self.listener_max_connections = Gauge(
            "cached_listener_max_connections",
            "The connection cap in force, by listener (max_connections, after clamping to the open-file limit).",
            ["listener"],
            registry=r,
        )
        self.listener_refused = Counter(
            "cached_listener_refused",
            "Connections closed at accept for being over a cap, by listener and cap.",
            ["listener", "reason"],
            registry=r,
        )
        self.listener_timeouts = Counter(
            "cached_listener_timeouts",
            "Connections closed for not completing request headers (header) or a body (body) in time, by listener.",
            ["listener", "kind"],
            registry=r,
        )
        self.store_bad_entries = Counter(
            "cached_store_bad_entries",
            "Entries found on disk at start that could not be indexed or rebuilt and were skipped, by kind.",
            ["kind"],
            registry=r,
        )
        # Pre-create label values so dashboards see zeros rather than absent series.
        for source in ("origin", "peer"):
            self.fetched_bytes.labels(source)
            self.piece_verify_failures.labels(source)
        for scope in ("zone", "cross_zone"):
            self.peer_bytes.labels(scope)
        for state in ("queued", "fetching", "ready", "failed"):
            self.models.labels(state)
        for state in ("alive", "suspect", "dead"):
            self.peers.labels(state)
        for reason in ("local_ref", "malformed"):
            self.catalog_dropped.labels(reason)
        for result in ("ok", "failed", "cancelled"):
            self.prefetch_jobs.labels(result)
        for reason in MDNS_REJECT_REASONS:
            self.mdns_rejected.labels(reason)
