"""The command line: the internal roles' dispatch, the flags (and their checks), and one run with
its safety net: leftovers removed first, a hard alarm beyond the per-step deadlines, SIGTERM/SIGHUP
turned into an orderly exit, and on every exit path the children killed and our namespaces
deleted. Then the scenario's report."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbench
from cbench.bench import Bench
from cbench.common import METHODS, REPO, parse_rate, size_arg
from cbench.failover import run_failover_scenario
from cbench.failover_report import finish_failover
from cbench.netns import teardown_network
from cbench.report import finish_swarm
from cbench.report_scale import finish_scale
from cbench.role_direct import role_direct
from cbench.role_hub import role_hub
from cbench.role_origin import role_origin
from cbench.role_torrent import role_leech, role_seed
from cbench.scale import run_scale
from cbench.shards import run_shards
from cbench.source import daemon_code, git_info
from cbench.swarm import run_swarm

ROLES: dict[str, Callable[[list[str]], None]] = {
    "_origin": role_origin,
    "_seed": role_seed,
    "_leech": role_leech,
    "_direct": role_direct,
    "_hub": role_hub,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(cbench.__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size", type=size_arg, default=size_arg("1G"), help="model size (default 1G; 256M for a quick run)"
    )
    p.add_argument("--nodes", type=int, default=8, help="node namespaces (default 8, at most 200)")
    p.add_argument("--skip-torrent", action="store_true", help="do not run the libtorrent swarm")
    p.add_argument(
        "--methods",
        default="cached,torrent,direct",
        help="which methods, in this order (default cached,torrent,direct; --scenario oci: cached is the "
        "mirror, torrent is skipped, so --methods cached is a mirror-only run)",
    )
    p.add_argument("--origin-rate", type=parse_rate, default=parse_rate("200mbit"))
    p.add_argument("--node-rate", type=parse_rate, default=parse_rate("1gbit"))
    p.add_argument(
        "--piece-size",
        type=size_arg,
        default=size_arg("16M"),
        help="cached --piece-size (default 16M, the daemon's default)",
    )
    p.add_argument(
        "--origin-connections",
        type=int,
        default=8,
        help="cached origins.http.connections per node (default 8, the daemon's default)",
    )
    p.add_argument(
        "--stall-timeout", type=float, default=0, help="cached peer.stall_timeout_s (default: the daemon's own)"
    )
    p.add_argument(
        "--gossip-interval",
        type=float,
        default=0.5,
        help="cached peer.gossip_interval_s (default 0.5; 0: left out of the config, the daemon's own default)",
    )
    p.add_argument("--timeout", type=float, default=1200, help="global deadline in seconds (default 1200)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/cbench"),
        help="model file, node data, logs (default /var/tmp/cbench)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="write results JSON and Markdown here (default WORKDIR/results)"
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="plot file (default docs/bench-cluster.png; failover: WORKDIR/results/failover.png)",
    )
    p.add_argument(
        "--cached-python",
        type=Path,
        default=REPO / ".venv" / "bin" / "python",
        help="interpreter that has cached installed",
    )
    p.add_argument("--keep", action="store_true", help="keep the daemons' cache dirs after the run")
    p.add_argument(
        "--method-timeout",
        type=float,
        default=0,
        help="seconds one method may take (default: 4x lower bound + 60 s; direct: 1.5x nodes x lower bound + 60 s)",
    )
    add_failover_flags(p)
    add_issue16_flags(p)
    p.add_argument(
        "--cached-variant",
        action="append",
        default=[],
        metavar="LABEL=[PYTHONPATH][;piece_size=4M][;connections=2][;stall_timeout=60]",
        help="also run cached from another source tree (a patched copy) and/or with other settings, "
        "reported as 'cached (LABEL)'; repeatable",
    )
    return p


def add_failover_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("failover scenario (--scenario failover)")
    g.add_argument(
        "--scenario",
        choices=("swarm", "failover", "scale", "shards", "oci"),
        default="swarm",
        help="swarm (default): N nodes want the model at once, cached vs torrent vs direct; "
        "failover: replicate --replicas R, kill a holder, time the replacement copy; "
        "scale: the swarm at each node count of --curve; "
        "shards: one file vs --shards files of the same bytes from a hub origin (cached and torrent); "
        "oci: every node pulls one artifact with skopeo through its /v2 mirror vs from the registry",
    )
    g.add_argument("--replicas", type=int, default=2, help="catalog replicas (default 2)")
    g.add_argument(
        "--kill",
        default="first",
        help="which holder dies: first or second owner in HRW order, or a node id like n3 (default first)",
    )
    g.add_argument(
        "--kill-mode",
        choices=("process", "node"),
        default="process",
        help="process (default): SIGKILL the daemon (its host still answers with RST); "
        "node: also take its link down first (a vanished host: connections time out)",
    )
    g.add_argument(
        "--cached-src",
        default="tree",
        metavar="tree|head|DIR",
        help="tree (default): daemons run cached/ as it is in this checkout; head: a copy of the committed "
        "cached/ at HEAD (git archive into WORKDIR/src-SHA), unaffected by uncommitted edits; "
        "DIR: a directory holding a cached/ package (a patched copy), put on the daemons' PYTHONPATH",
    )
    g.add_argument(
        "--suspect-after", type=float, default=0, help="cached peer.suspect_after_s (default: the daemon's own)"
    )
    g.add_argument("--dead-after", type=float, default=0, help="cached peer.dead_after_s (default: the daemon's own)")


def add_issue16_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale and topology (--scenario scale, --scenario shards, --zones 2)")
    g.add_argument(
        "--curve",
        type=lambda t: [int(x) for x in t.split(",") if x.strip()],
        default=[4, 8, 16],
        help="--scenario scale: the node counts, in order (default 4,8,16)",
    )
    g.add_argument(
        "--zones",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: two bridges (zones a and b, half the nodes each, the origin on a's) joined by one link of "
        "--zone-link-rate; nodes get labels.zone (default 1: one switch)",
    )
    g.add_argument("--zone-link-rate", type=parse_rate, default=parse_rate("200mbit"))
    g.add_argument(
        "--shards", type=int, default=16, help="--scenario shards: files the sharded model is cut into (default 16)"
    )


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """LABEL=[PYTHONPATH][;piece_size=4M][;connections=2][;stall_timeout=60] -> (label, settings)."""
    label, _, rest = spec.partition("=")
    path, *opts = rest.split(";")
    v: dict[str, Any] = {"path": path}
    for o in opts:
        k, _, val = o.partition("=")
        v[k] = size_arg(val) if k == "piece_size" else int(val) if k == "connections" else float(val)
    return label, v


def normalise(a: argparse.Namespace) -> None:
    """--methods as a list, with each --cached-variant as 'cached:LABEL' right after cached."""
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.variants = dict(parse_variant(spec) for spec in a.cached_variant)
    if "cached" in a.methods:
        at = a.methods.index("cached") + 1
        a.methods[at:at] = [f"cached:{label}" for label in a.variants]


def check(a: argparse.Namespace) -> str | None:
    """Why this run cannot start (exit 2), or None."""
    if any(m not in METHODS and not m.startswith("cached:") for m in a.methods) or not 1 <= a.nodes <= 200:
        return "--methods takes cached,torrent,direct; --nodes 1..200"
    if a.scenario == "failover" and not 1 <= a.replicas < a.nodes:
        return "failover needs 1 <= --replicas < --nodes (a survivor must be free to take over)"
    if a.scenario == "scale" and (not a.curve or not all(2 <= n <= 200 for n in a.curve)):
        return "--curve takes node counts of 2..200, like 4,8,16"
    if a.zones == 2 and (a.nodes < 2 or a.scenario in ("failover", "scale")):
        return "--zones 2 needs --nodes >= 2 and the swarm or shards scenario"
    if a.scenario == "shards" and not 2 <= a.shards <= 256:
        return "--shards takes 2..256"
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    for tool in ("ip", "tc", "curl"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (apt-get install iproute2 curl)"
    return None


def run_guarded(bench: Bench) -> Any:
    """The scenario, inside the safety net; what it returns (the swarm's results or the failover's
    record)."""
    a = bench.args

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(f"bench-cluster: stopped by signal {signum}")

    def on_alarm(signum: int, frame: Any) -> None:
        raise SystemExit(f"bench-cluster: global timeout ({a.timeout:.0f}s) reached")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    teardown_network()  # leftovers of an earlier run (only names with our prefix)
    signal.alarm(int(a.timeout) + 60)  # a hard stop beyond the per-step deadlines
    try:
        scenarios = {
            "failover": run_failover_scenario,
            "scale": run_scale,
            "shards": run_shards,
            "swarm": run_swarm,
        }
        return asyncio.run(scenarios[a.scenario](bench))
    finally:
        signal.alarm(0)
        bench.procs.kill_all_sync()
        teardown_network()
        if not a.keep:
            for d in ("nodes-cached", "nodes-failover", "direct", "torrent"):
                shutil.rmtree(a.workdir / d, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        ROLES[sys.argv[1]](sys.argv[2:])
        return 0
    a = build_parser().parse_args()
    normalise(a)
    problem = check(a)
    if problem:
        print(f"bench-cluster: {problem}", file=sys.stderr)
        return 2
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.scenario == "oci":  # cbench/oci_bench.py: skopeo through the /v2 mirror vs from the registry
        from cbench.oci_bench import run_oci

        return run_oci(a)
    try:
        a.pythonpath, a.git = daemon_code(a.scenario, a.cached_src, a.workdir, git_info())  # as of the start
    except ValueError as e:
        print(f"bench-cluster: {e}", file=sys.stderr)
        return 2
    out = a.out or a.workdir / "results"
    outcome = run_guarded(Bench.create(a))
    if a.scenario == "failover":
        return finish_failover(outcome, a, out)
    if a.scenario == "scale":
        return finish_scale(outcome, a, out)
    a.plot = a.plot or (out / f"{a.scenario}.png" if a.scenario == "shards" or a.zones > 1 else None)
    a.plot = a.plot or REPO / "docs" / "bench-cluster.png"
    return finish_swarm(outcome, a, out)


if __name__ == "__main__":
    sys.exit(main())
