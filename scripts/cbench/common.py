"""What every part of the benchmark shares: the address plan and ports, sizes and rates as text
(sizes through ``cached.types``, the package's own parser and formatter), the driver's log line,
and BLAKE3 of a file. Nothing here touches the network or starts a process."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from cached.types import format_size, parse_size

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_cluster.py"  # the entry point the roles are started with
# Every namespace this run creates (and the leftovers it removes) starts with this. CBENCH_PREFIX
# gives a concurrent run on the same machine its own names, so neither tears down the other's.
PREFIX = os.environ.get("CBENCH_PREFIX", "cbench-")
if not re.fullmatch(r"[a-z][a-z0-9]{1,8}-", PREFIX):
    raise SystemExit(f"CBENCH_PREFIX={PREFIX!r}: 2-9 lowercase letters or digits and a final '-' (like cbench-)")
SWITCH = PREFIX + "sw"
ORIGIN_NS = PREFIX + "origin"
NET = "198.18.0"  # /24 inside 198.18.0.0/15
ORIGIN_IP = f"{NET}.1"
HTTP_PORT = 8080
BT_PORT = 6881
PEER_PORT = 7471
MODEL_NAME = "model.bin"
MODEL_URL = f"http://{ORIGIN_IP}:{HTTP_PORT}/{MODEL_NAME}"
METHODS = ("cached", "torrent", "direct")
SAMPLE_S = 0.25
FAILOVER_POLL_S = 0.1  # how often the failover scenario asks every survivor for its member list


ZONES = "ab"  # --zones 2: nodes 1..N/2 in zone a, the rest in zone b (the origin is on zone a's bridge)
HUB_PORT = 8081  # the hub origin of --scenario shards


def zone_of(i: int, nodes: int, zones: int) -> str:
    """Node ``i``'s zone label ("" when the run has no zones): equal blocks of consecutive nodes."""
    if zones <= 1:
        return ""
    return ZONES[min(zones - 1, (i - 1) * zones // nodes)]


def node_ns(i: int) -> str:
    return f"{PREFIX}n{i}"


def node_ip(i: int) -> str:
    return f"{NET}.{10 + i}"


def size_arg(text: str) -> int:
    """argparse type for a size: cached.types.parse_size with the benchmark's usage message."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (like 256M, 1G)") from None


def parse_rate(text: str) -> int:
    """'200mbit' -> bits/s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)bit\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad rate {text!r} (like 200mbit, 1gbit)")
    return int(float(m.group(1)) * 1000 ** " kmg".index((m.group(2) or " ").lower()))


def fmt_size(n: float) -> str:
    """The report's sizes: two decimals ('1.00 GiB'), as the figures in docs/ were written."""
    return format_size(n, 2)


def log(msg: str) -> None:
    print(f"[bench-cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def blake3_file(path: Path) -> str:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(path))
    return h.hexdigest()
