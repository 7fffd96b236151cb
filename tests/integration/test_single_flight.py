"""Origin single-flight without a timed grace (issue 16), between real daemons on 127.0.0.1.

Nodes that want the same file agree who reads which piece from the origin by asking each other
directly (``POST /p2p/v1/wants``, ``transfer.wants``) before their first origin read, not by
waiting for gossip. So four nodes asking at once read the origin once between them even with the
CPU busy (two busy-loop processes beside the test, which is what made gossip fall behind the old
2.5-round grace), and a node nobody else is fetching with starts at once: it finishes before
its next gossip round, which a timed grace of rounds could never do.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import (  # noqa: F401 - token_file is a fixture
    MIB,
    cluster,
    prefetch,
    token_file,
    tree_digests,
    view_digests,
)
from tests.support.hub import Hub, random_bytes
from tests.support.origin import Origin, write_random_file

BUSY = "import time\nend = time.monotonic() + 300\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_loops(n: int = 2) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` processes spinning on the CPU (each stops by itself after 300 s at the latest)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


@pytest.mark.cpu_starved(5.0)
@pytest.mark.parametrize(
    ("seed", "size", "piece"),
    [(51, 8 * MIB + 100, "256K"), (52, 16 * MIB, "1M"), (53, 24 * MIB - 7, "1M")],
    ids=["8MiB-256K", "16MiB-1M", "24MiB-1M"],
)
async def test_four_nodes_at_once_under_cpu_load_read_the_origin_once(
    tmp_path: Path, token_file: Path, seed: int, size: int, piece: str
) -> None:
    src = write_random_file(tmp_path / "origin" / "model.safetensors", size, seed=seed)
    want = await tree_digests(src.parent)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        # Failure detection is not under test: a suspected peer's pieces rightly go elsewhere.
        steady = {"peer.suspect_after_s": 3.0, "peer.dead_after_s": 6.0}
        nodes = await cluster(stack, tmp_path, token_file, "abcd", piece=piece, **steady)
        ref = origin.file_url("model.safetensors")

        with busy_loops(2):
            models = await asyncio.gather(*(prefetch(d, ref) for d in nodes.values()))

        ratio = origin.counters.bytes_sent / size
        assert ratio <= 1.02, f"the origin sent {ratio:.3f}x the model for four nodes under CPU load"
        starts = [r.split("-")[0] for r in origin.counters.ranges]
        assert len(starts) == len(set(starts)), f"a span was read from the origin twice: {sorted(starts)}"
        for name, m in zip(nodes, models):
            assert m["bytes_total"] == m["bytes_done"] == size, name
            assert await view_digests(m) == want, f"{name} holds other bytes"
        assert sum(m["sources"]["origin"] for m in models) == origin.counters.bytes_sent


async def test_a_node_nobody_else_wants_the_file_with_starts_before_its_next_gossip_round(
    tmp_path: Path, token_file: Path
) -> None:
    size = 8 * MIB + 3
    src = write_random_file(tmp_path / "origin" / "alone.bin", size, seed=54)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        # One gossip round a minute: the old grace (2.5 rounds) would hold the fetch 150 s.
        slow = {"peer.gossip_interval_s": 60.0, "peer.suspect_after_s": 200.0, "peer.dead_after_s": 400.0}
        nodes = await cluster(stack, tmp_path, token_file, "ab", **slow)
        a = nodes["a"]
        assert a.gossip is not None
        rounds = a.gossip.rounds

        model = await prefetch(a, origin.file_url("alone.bin"))

        assert model["sources"] == {"peer": 0, "origin": size}
        assert origin.counters.bytes_sent == size
        assert a.gossip.rounds == rounds, "the fetch waited for a gossip round"


# --- many files: a sharded model ----------------------------------------------------------------

SHARDS = 16


def sharded_model(shard_size: int, seed: int) -> dict[str, bytes]:
    files = {
        f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors": random_bytes(shard_size + i, seed=seed + i)
        for i in range(SHARDS)
    }
    files["config.json"] = b'{"model_type": "test"}'
    return files


@pytest.mark.cpu_starved(5.0)
async def test_four_nodes_fetch_a_sixteen_shard_model_reading_the_origin_once(tmp_path: Path, token_file: Path) -> None:
    files = sharded_model(MIB + 1234, seed=300)
    total = sum(len(b) for b in files.values())
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(Hub())
        hub.add_repo("acme/sharded", files)
        steady = {"peer.suspect_after_s": 3.0, "peer.dead_after_s": 6.0, "origins.hf.endpoint": hub.url}
        nodes = await cluster(stack, tmp_path, token_file, "abcd", piece="256K", **steady)

        with busy_loops(2):
            models = await asyncio.gather(*(prefetch(d, "hf://acme/sharded@main") for d in nodes.values()))

        ratio = hub.counters.file_bytes / total
        assert ratio <= 1.02, f"the hub sent {ratio:.3f}x the model for four nodes"
        for name, m in zip(nodes, models):
            view = Path(m["path"])
            assert {p: (view / p).read_bytes() for p in files} == files, name


async def test_a_sixteen_shard_model_alone_starts_every_file_at_once(tmp_path: Path, token_file: Path) -> None:
    """No per-file start-up wait: sixteen files, each with its own want exchange, all done before
    the node's next gossip round (the old grace cost 2.5 rounds per wave of four files)."""
    files = sharded_model(256 * 1024, seed=400)
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(Hub())
        hub.add_repo("acme/sharded", files)
        slow = {
            "peer.gossip_interval_s": 60.0,
            "peer.suspect_after_s": 200.0,
            "peer.dead_after_s": 400.0,
            "origins.hf.endpoint": hub.url,
        }
        nodes = await cluster(stack, tmp_path, token_file, "ab", **slow)
        a = nodes["a"]
        assert a.gossip is not None
        rounds = a.gossip.rounds

        model = await prefetch(a, "hf://acme/sharded@main")

        assert model["sources"] == {"peer": 0, "origin": model["bytes_total"]}
        assert model["bytes_total"] >= sum(len(b) for b in files.values())
        assert a.gossip.rounds == rounds, "a file of the model waited for a gossip round"
