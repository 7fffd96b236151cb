"""Cluster benchmark: N nodes want one large model at once, behind one slow origin.

A simulated cluster in network namespaces that this script creates and removes:

    cbench-sw       a bridge br0 and one veth end per host (the "switch")
    cbench-origin   198.18.0.1   origin link shaped to --origin-rate (default 200 Mbit/s)
    cbench-n1..nN   198.18.0.11+ node links shaped to --node-rate (default 1 Gbit/s)

Every link is shaped with ``tc tbf`` in both directions (egress of the host's ``eth0`` and egress of
the switch-side veth). Nothing is ever configured in the host's own network namespace: the veths
are created inside ``cbench-sw`` and moved straight into the host namespaces, the namespaces have
no default route, and every address is in 198.18.0.0/15. Leftovers with the ``cbench-`` prefix are
removed at start; everything is removed at the end, on error, on SIGINT/SIGTERM/SIGHUP, and when
the global ``--timeout`` fires.

Three ways to get the model onto every node, in the same run:

  cached   one ``cached`` daemon per node (``--no-mdns``, ``--seed`` to node 1, a cluster token,
           ``peer.gossip_interval_s = 0.5``); the model is an ``http://`` ref served by a small
           Range-capable server in the origin namespace; all nodes ``POST /v1/prefetch`` with
           ``wait`` at once (what ``cachectl prefetch --wait`` sends); done = the daemon answered
           ``ready`` (every piece BLAKE3-verified, blob fsynced and committed).
  torrent  libtorrent (PyPI bindings) with the origin as the only initial seed; trackerless: every
           leecher connects explicitly to the origin and to every other node; no DHT, LSD, UPnP,
           NAT-PMP, uTP (TCP only, like the others). Done = libtorrent reports the torrent finished
           (every piece SHA-1/SHA-256 checked).
  direct   every node runs ``curl -o`` against the origin server at once, then BLAKE3-hashes the
           file and compares it with the expected digest. Done = hash matched.

Reported per method: time from the common start until every node holds a verified copy, per-node
completion times, payload bytes sent by the origin (counted by the origin server or the
libtorrent seed) and wire bytes (the origin veth's counter, with TCP/IP headers), and the origin's
throughput over time (sampled from the switch-side veth counters). A Markdown table goes to stdout
and ``--out`` (JSON + Markdown), the plot to ``--plot``.

``--scenario failover`` (the default scenario is ``swarm``, the comparison above): a failover test in
the same cluster. ``POST /v1/replicate {"ref", "replicas": R}`` (default 2) on node 1; once R nodes
hold a ready copy, one holder's daemon is SIGKILLed (``--kill-mode node`` also takes its link down
first, so connections to it time out instead of being refused). From the kill the driver times:
when every survivor marks it suspect and dead (its log lines, cross-checked by polling
``GET /v1/peers`` every 0.1 s), when the replacement owner queues, starts and finishes its fetch
(``GET /v1/events`` job events, daemon wall clock), the origin bytes during the failover and the
replacement's ``sources``; the replacement's file is BLAKE3-checked. Reported against
detection (dead) + model size / node link rate. ``--cached-src head`` runs the committed
``cached/`` (a ``git archive`` copy) instead of the working tree. Output: a table on stdout, one
JSON line, WORKDIR/results/failover.{md,jsonl}, failover-STAMP.{json,png}.

Issue 16's scenarios (scale and topology):

  --gossip-interval 0   the daemons at their own default gossip interval (the key is left out).
  --scenario scale      the swarm at every node count of ``--curve`` (default 4,8,16), one cluster
                        per point, in one run: time over the lower bound and origin bytes for
                        cached and libtorrent at each point; WORKDIR/results/scale.{md,json,svg}.
  --zones 2             two bridges, one per zone (nodes 1..N/2 in zone a with the origin, the
                        rest in zone b), joined by one veth pair shaped to ``--zone-link-rate``;
                        the daemons get ``labels.zone``; the report adds the bytes that crossed
                        the link into each zone.
  --scenario shards     the project's Hub double (``_hub``) serves the model as one file and as
                        ``--shards`` files; cached fetches ``hf://bench/one`` then
                        ``hf://bench/sharded``, libtorrent a one-file and a multi-file torrent.

``CBENCH_PREFIX`` (default ``cbench-``) names the namespaces, so two runs on one machine do not
remove each other's. The lower bound is the model through the slowest link it must cross whole
(origin, node, or the zone link).

Internal roles (run inside a namespace by this script): ``_origin``, ``_seed``, ``_leech``,
``_direct``, ``_hub``. Run as root through ``scripts/bench-cluster`` (it builds the bench venv); the entry
point is ``scripts/bench_cluster.py``, a shim that runs ``cbench.__main__``.

The modules, from the bottom up:

    common        address plan, constants, sizes (cached.types) and rates, log, BLAKE3 of a file
    channel       the JSON-lines / stdin channel between the driver and a role
    role_origin   _origin: the Range-capable HTTP origin server (runs in cbench-origin)
    role_torrent  _seed, _leech: libtorrent clients; the model's .torrent
    role_direct   _direct: curl + BLAKE3 on one node
    netns         namespaces, bridge, veths, tc shaping, link counters, teardown
    processes     child processes in namespaces: spawn, expect a line, stop, kill
    bench         one run's settings and deadline (Bench), the model file (Model)
    measure       MethodResult and the origin-link sampler
    daemons       cached daemons: cluster files, launch, API sessions, membership
    method_*      the three swarm methods: cached, torrent, direct
    swarm         the swarm scenario: the methods in order (``timed``: one method from a common start)
    scale         the scale scenario: the swarm at each node count; report_scale: its table and SVG
    shards        the shards scenario; role_hub: _hub, the Hub double with the one-file and sharded repos
    failover*     the failover scenario (run, watchers, figures)
    report        swarm tables, JSON and plot; failover_report: the failover's
    __main__      the command line, the role dispatch, signals and teardown
"""

import sys
from pathlib import Path

# The benchmark runs under its own venv (.venv-bench), which does not install cached; the repo on
# the path gives it cached.types (the package's own size parsing and formatting). Done here, in the
# package's first import, so every module and every role process sees it.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(1, _REPO)
