"""Peer-to-peer transfer when peers misbehave: killed, corrupt, or at their serving limit.

A peer SIGKILLed while it serves costs the puller nothing but time: it finishes from the peer that
is left. Bytes that fail their BLAKE3 check are never kept: the piece is fetched again elsewhere,
and a peer that keeps sending bad bytes is banned (the puller stops asking it, even for other
models). A peer at ``max_uploads`` answers 429 and the pullers go elsewhere or come back later.
Every case ends with byte-identical files and no origin traffic the cluster did not need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest

from cached.api.client import ApiClient
from cached.daemon import Daemon
from cached.transfer.blob import PEER_FAULT_LIMIT
from tests.support.cluster import (
    FAST,
    MIB,
    assert_from_peers,
    blob_holders,
    blobs_of,
    cluster,
    metric,
    node_flags,
    prefetch,
    token_file,  # noqa: F401 - the fixture
    tree_digests,
    view_digests,
)
from tests.support.node import DaemonProcess, running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until


def corrupt_pieces(blob: Path, pieces: Iterable[int], piece_size: int) -> None:
    """Flip bytes inside each piece of a stored (0440) blob, as a bad disk or a bad actor would."""
    blob.chmod(0o644)
    try:
        with open(blob, "r+b") as f:
            for i in pieces:
                off = i * piece_size + 4096
                f.seek(off)
                data = f.read(64)
                f.seek(off)
                f.write(bytes(x ^ 0xFF for x in data))
    finally:
        blob.chmod(0o440)


async def model_status(d: Daemon, ref: str) -> dict:
    async with ApiClient(d.api_address) as api:
        return await api.request("GET", "/v1/models/status", params={"ref": ref})


# --- a peer killed while it serves ------------------------------------------------------------------


async def test_a_peer_killed_mid_transfer_the_puller_finishes_from_the_other(tmp_path: Path, token_file: Path) -> None:
    size = 16 * MIB + 777
    src = write_random_file(tmp_path / "origin" / "model.bin", size, seed=51)
    want = await tree_digests(src.parent)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        ref = origin.file_url("model.bin")

        # c imports the model on its own, before it joins the cluster.
        async with running_daemon(tmp_path / "c", node_id="c", **{"store.piece_size_bytes": "1M"}) as c_alone:
            await prefetch(c_alone, ref)

        b = await stack.enter_async_context(running_daemon(tmp_path / "b", node_id="b", **node_flags(token_file)))
        assert b.gossip is not None
        # a is a real process, so that it can be SIGKILLed in the middle of a send. It serves
        # slowly: the pieces b asks of it are still on their way when it dies.
        config = tmp_path / "a.toml"
        config.write_text(
            "[peer]\n"
            + "".join(f"{k.removeprefix('peer.')} = {v}\n" for k, v in FAST.items())
            + 'serve_rate_bps = "512K"\n'
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
            str(b.peer_address),
        )
        stack.push_async_callback(asyncio.to_thread, a.stop)
        await asyncio.to_thread(a.start)
        await wait_until(
            lambda: "a" in {m.info.node_id for m in b.gossip.membership.alive()}, timeout_s=15, what="b sees a"
        )
        async with ApiClient(a.api) as api:
            model_a = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert model_a["sources"] == {"peer": 0, "origin": size}, "nobody else had it: a read the origin"

        c = await stack.enter_async_context(running_daemon(tmp_path / "c", node_id="c", **node_flags(token_file, b)))
        blob = blobs_of(c, await model_status(c, ref))["model.bin"]
        await wait_until(
            lambda: blob_holders(b, blob) == {"a", "c"}, timeout_s=15, what="b learns that a and c hold the blob"
        )
        before = (origin.counters.gets, origin.counters.bytes_sent)  # b names the ref at the origin (a HEAD), no more

        async def only_as_pieces_left() -> bool:
            """a has sent something, and b has everything but the few pieces it asked of a."""
            return (
                await metric(a.api, "cached_served_bytes_total") > 0
                and (await model_status(b, ref))["bytes_done"] >= size - 4 * MIB
            )

        fetch_b = asyncio.create_task(prefetch(b, ref), name="test:prefetch-b")
        try:
            await wait_until(only_as_pieces_left, timeout_s=15, interval_s=0.02, what="b waiting on a's pieces")
            done_at_kill = (await model_status(b, ref))["bytes_done"]
            c_served_at_kill = await metric(c, "cached_served_bytes_total")
            await asyncio.to_thread(a.kill)
            model_b = await asyncio.wait_for(asyncio.shield(fetch_b), 60)
        finally:
            fetch_b.cancel()
            await asyncio.gather(fetch_b, return_exceptions=True)

        assert done_at_kill < size, "a was killed while b was still fetching"
        assert_from_peers(model_b, size)
        assert await view_digests(model_b) == want
        assert await metric(c, "cached_served_bytes_total") > c_served_at_kill, "c served what a could not"
        assert (origin.counters.gets, origin.counters.bytes_sent) == before, (
            "a's death did not send b to the origin: c still had it all"
        )


# --- a peer with corrupt pieces ---------------------------------------------------------------------


async def holders_ready(
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
    token_file: Path,
    origin: Origin,
    *,
    names: str,
    files: list[str],
    holders: str,
    piece: str,
) -> tuple[dict[str, Daemon], dict[str, dict]]:
    """Start one node per letter of ``names``; the first of ``holders`` fetches ``files`` from the
    origin, the others from it (before anything is corrupted)."""
    nodes = await cluster(stack, tmp_path, token_file, names, piece=piece)
    models: dict[str, dict] = {}
    for name in files:
        models[name] = await prefetch(nodes[holders[0]], origin.file_url(name))
        for h in holders[1:]:
            await prefetch(nodes[h], models[name]["ref"])
    return nodes, models


async def test_corrupt_pieces_from_a_peer_are_refused_and_fetched_from_another(
    tmp_path: Path, token_file: Path
) -> None:
    size, piece = 16 * MIB, MIB
    src = write_random_file(tmp_path / "origin" / "model.bin", size, seed=61)
    want = await tree_digests(src.parent)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        nodes, models = await holders_ready(
            stack, tmp_path, token_file, origin, names="abc", files=["model.bin"], holders="ac", piece="1M"
        )
        a, b = nodes["a"], nodes["b"]
        ref = models["model.bin"]["ref"]
        blob = blobs_of(a, models["model.bin"])["model.bin"]
        await wait_until(
            lambda: blob_holders(b, blob) == {"a", "c"}, timeout_s=10, what="b learns a and c hold the blob"
        )
        # b's first requests alternate between its two sources, a first: pieces 0 and 2 go to a.
        corrupt_pieces(a.store.blob_path(blob), [0, 2], piece)
        before = origin.counters.bytes_sent

        model_b = await prefetch(b, ref)

        assert await view_digests(model_b) == want, "no corrupt byte reached b's files"
        assert await metric(b, "cached_piece_verify_failures_total", source="peer") >= 2
        assert_from_peers(model_b, size)  # the refused pieces came from c
        assert origin.counters.bytes_sent == before


async def test_a_peer_that_keeps_sending_bad_bytes_is_banned(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size, piece = 8 * MIB, 256 * 1024
    srcs = [write_random_file(tmp_path / "origin" / f"m{i}.bin", size, seed=70 + i) for i in range(2)]
    want = await tree_digests(srcs[0].parent)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(srcs[0].parent))
        nodes, models = await holders_ready(
            stack, tmp_path, token_file, origin, names="abc", files=["m0.bin", "m1.bin"], holders="ac", piece="256K"
        )
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        blobs = {name: blobs_of(a, m)[name] for name, m in models.items()}
        for bl in blobs.values():
            await wait_until(
                lambda bl=bl: blob_holders(b, bl) == {"a", "c"}, timeout_s=10, what="b learns a and c hold both blobs"
            )
        corrupt_pieces(a.store.blob_path(blobs["m0.bin"]), range(size // piece), piece)

        with caplog.at_level(logging.WARNING, logger="cached.transfer.blob"):
            model_b = await prefetch(b, models["m0.bin"]["ref"])
        assert await view_digests(model_b) == {"m0.bin": want["m0.bin"]}
        assert_from_peers(model_b, size)
        failures = await metric(b, "cached_piece_verify_failures_total", source="peer")
        assert failures >= PEER_FAULT_LIMIT
        banned = [r.getMessage() for r in caplog.records if "peer banned" in r.getMessage()]
        assert banned and all("peer=a" in m for m in banned), banned

        # Banned means b no longer asks a at all, even for another model that a holds intact.
        a_served, c_served = await metric(a, "cached_served_bytes_total"), await metric(c, "cached_served_bytes_total")
        model_b1 = await prefetch(b, models["m1.bin"]["ref"])
        assert_from_peers(model_b1, size)
        assert await view_digests(model_b1) == {"m1.bin": want["m1.bin"]}
        assert await metric(a, "cached_served_bytes_total") == a_served, "b asked the banned peer again"
        assert await metric(c, "cached_served_bytes_total") >= c_served + size
        assert await metric(b, "cached_piece_verify_failures_total", source="peer") == failures


async def test_bad_pieces_from_the_only_peer_holding_the_blob_are_fetched_from_the_origin(
    tmp_path: Path, token_file: Path
) -> None:
    """a is the only live holder and sends two corrupt pieces: b takes those two from the origin."""
    size, piece = 8 * MIB, 256 * 1024
    src = write_random_file(tmp_path / "origin" / "model.bin", size, seed=81)
    want = await tree_digests(src.parent)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        nodes, models = await holders_ready(
            stack, tmp_path, token_file, origin, names="ab", files=["model.bin"], holders="a", piece="256K"
        )
        a, b = nodes["a"], nodes["b"]
        blob = blobs_of(a, models["model.bin"])["model.bin"]
        await wait_until(lambda: blob_holders(b, blob) == {"a"}, timeout_s=10, what="b learns a holds the blob")
        corrupt_pieces(a.store.blob_path(blob), [1, 5], piece)
        before = origin.counters.bytes_sent

        async with ApiClient(b.api_address) as api:
            # A puller that never looks past the peer holding the blob waits forever: bound the wait.
            model_b = await api.request(
                "POST", "/v1/prefetch", body={"ref": models["model.bin"]["ref"], "wait": True, "timeout_s": 8}
            )
        assert model_b["state"] == "ready", (
            f"b is stuck: {model_b['bytes_done']}/{size} bytes, sources {model_b['sources']}"
        )
        assert await view_digests(model_b) == want
        assert await metric(b, "cached_piece_verify_failures_total", source="peer") >= 2
        assert 2 * piece <= model_b["sources"]["origin"] == origin.counters.bytes_sent - before


# --- a peer at its serving limit (429) --------------------------------------------------------------


@pytest.mark.parametrize("other_holder", [True, False], ids=["another-holder", "only-the-busy-holder"])
async def test_a_peer_at_its_upload_limit_answers_429_and_both_pullers_finish(
    tmp_path: Path, token_file: Path, other_holder: bool
) -> None:
    size = 8 * MIB + 5
    src = write_random_file(tmp_path / "origin" / "model.bin", size, seed=91)
    want = await tree_digests(src.parent)
    busy = {"peer.max_uploads": 1, "peer.serve_rate_bps": "8M"}
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        ref = origin.file_url("model.bin")
        if other_holder:
            # c imports the model on its own (not through a's single upload slot), then joins.
            async with running_daemon(tmp_path / "c", node_id="c", **{"store.piece_size_bytes": "1M"}) as c_alone:
                await prefetch(c_alone, ref)
        a = await stack.enter_async_context(
            running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file, **busy))
        )
        model_a = await prefetch(a, ref)
        nodes = {"a": a}
        for n in ["b", "d"] + (["c"] if other_holder else []):
            nodes[n] = await stack.enter_async_context(
                running_daemon(tmp_path / n, node_id=n, **node_flags(token_file, a))
            )
        blob = blobs_of(a, model_a)["model.bin"]
        holders = {"a", "c"} if other_holder else {"a"}
        for n in ("b", "d"):
            await wait_until(
                lambda n=n: blob_holders(nodes[n], blob) == holders, timeout_s=10, what=f"{n} learns who holds the blob"
            )
        before = (
            origin.counters.gets,
            origin.counters.bytes_sent,
        )  # b and d name the ref at the origin (a HEAD each), no more

        pulled = await asyncio.gather(prefetch(nodes["b"], ref), prefetch(nodes["d"], ref))

        assert await metric(a, "cached_peer_throttled_total") >= 1, "a answered 429 at its limit"
        for m in pulled:
            assert_from_peers(m, size)
            assert await view_digests(m) == want
        assert (origin.counters.gets, origin.counters.bytes_sent) == before
        if other_holder:
            assert await metric(nodes["c"], "cached_served_bytes_total") > 0, "the pullers moved to c"
        else:
            # a's one slot, or each other's verified pieces once they have some: every byte came
            # from a peer.
            served = [await metric(nodes[n], "cached_served_bytes_total") for n in ("a", "b", "d")]
            assert served[0] > 0 and sum(served) >= 2 * size, served
