"""A peer that stops answering holds no more than its share of a puller (real daemons, loopback).

``a`` is a real daemon process that holds three files and serves them slowly; ``c`` holds them
too. ``b`` fetches all three at once; while it has requests in flight at ``a``, ``a`` is stopped
(SIGSTOP: its kernel still accepts connections, nothing answers). ``b``'s stall timeout is far
beyond the test's own timeout, so ``b`` can only finish by moving ``a``'s pieces elsewhere as soon
as ``a`` turns suspect, long before ``a`` is declared dead. Across the three blobs ``b`` never has
more requests (each one a reader thread) in flight at ``a`` than the per-peer limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from cached.api.client import ApiClient
from cached.peers.membership import Status
from cached.transfer.blob import PEER_NODE_LIMIT
from tests.support.cluster import (  # noqa: F401 - token_file is a fixture
    FAST,
    MIB,
    assert_from_peers,
    blob_holders,
    blobs_of,
    metric,
    node_flags,
    prefetch,
    token_file,
    tree_digests,
    view_digests,
)
from tests.support.node import DaemonProcess, running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

FILES = ["s1.bin", "s2.bin", "s3.bin"]


async def test_a_peer_that_stops_answering_costs_no_stall_timeout_and_holds_only_its_share(
    tmp_path: Path, token_file: Path
) -> None:
    size = 8 * MIB
    for i, name in enumerate(FILES):
        write_random_file(tmp_path / "origin" / name, size, seed=90 + i)
    want = await tree_digests(tmp_path / "origin")
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(tmp_path / "origin"))
        c = await stack.enter_async_context(running_daemon(tmp_path / "c", node_id="c", **node_flags(token_file)))
        config = tmp_path / "a.toml"
        config.write_text(
            "[peer]\n"
            + "".join(f"{k.removeprefix('peer.')} = {v}\n" for k, v in FAST.items())
            + 'serve_rate_bps = "2M"\n'
        )
        (tmp_path / "a").mkdir()
        a = DaemonProcess(
            tmp_path / "a",
            "--node-id",
            "a",
            "--config",
            str(config),
            "--cluster-token-file",
            str(token_file),
            "--piece-size",
            "1M",
            "--seed",
            str(c.peer_address),
        )
        stack.push_async_callback(asyncio.to_thread, a.stop)
        stack.callback(lambda: a.proc is not None and a.proc.poll() is None and a.proc.send_signal(signal.SIGCONT))
        await asyncio.to_thread(a.start)
        # b: a read that gets no byte waits 300 s (past this test's timeout); a suspect peer
        # stays suspect (not dead) for 100 s.
        patient = {"peer.stall_timeout_s": 300.0, "peer.suspect_after_s": 1.0, "peer.dead_after_s": 100.0}
        b = await stack.enter_async_context(
            running_daemon(tmp_path / "b", node_id="b", **node_flags(token_file, c, **patient))
        )
        refs, blobs = [], []
        async with ApiClient(a.api) as api:
            for name in FILES:
                model = await api.request("POST", "/v1/prefetch", body={"ref": origin.file_url(name), "wait": True})
                refs.append(model["ref"])
        for ref in refs:
            blobs.append(blobs_of(c, await prefetch(c, ref))[ref.rsplit("/", 1)[-1]])
        for blob in blobs:
            await wait_until(lambda blob=blob: blob_holders(b, blob) == {"a", "c"}, timeout_s=15, what="b sees a, c")
        origin_before = origin.counters.bytes_sent
        served_before = await metric(a.api, "cached_served_bytes_total")  # what a sent c

        fetch = asyncio.gather(*(prefetch(b, ref) for ref in refs))
        try:
            await wait_until(
                lambda: metric_above(a.api, "cached_served_bytes_total", served_before),
                timeout_s=15,
                interval_s=0.02,
                what="a is serving b",
            )
            a.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            models = await asyncio.wait_for(asyncio.shield(fetch), 90)
        finally:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)

        for name, m in zip(FILES, models):
            assert_from_peers(m, size)
            assert (await view_digests(m))[name] == want[name]
        assert origin.counters.bytes_sent == origin_before, "the pieces a held went to c, not the origin"
        assert b.gossip is not None
        member = b.gossip.membership.get("a")
        assert member is not None and member.status is Status.SUSPECT, "b finished before a was declared dead"
        peak = b.fetcher._blobs.peer_peak  # noqa: SLF001 - the per-peer bound is what this test is about
        assert 0 < peak.get("a", 0) <= PEER_NODE_LIMIT, peak


async def metric_above(address: str, name: str, value: float) -> bool:
    return await metric(address, name) > value
