"""Peer-to-peer transfer between real daemons on 127.0.0.1 (static seeds, mDNS off).

A model one node fetched from the origin reaches the others from that node, not from the origin:
they resolve the ref through a peer's manifest (no request at all to the origin, not even a HEAD),
take every byte from peers, and end up with the same files. Several nodes that ask for the same
model at the same moment read the origin about once between them (each piece through its
rendezvous owner only) and all end up with the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

from tests.support.cluster import (  # noqa: F401 - token_file is a fixture
    MIB,
    cluster,
    prefetch,
    metric,
    tree_digests,
    view_digests,
    knows_ref_from,
    blob_holders,
    blobs_of,
    assert_from_peers,
    token_file,
)


# --- one node fetched it: the others take it from peers ---------------------------------------------


async def test_an_http_file_one_node_fetched_reaches_the_others_without_touching_the_origin(tmp_path: Path, token_file: Path) -> None:
    size = 16 * MIB + 12345
    src = write_random_file(tmp_path / "origin" / "model.gguf", size, seed=21)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        nodes = await cluster(stack, tmp_path, token_file, "abc")
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        want = await tree_digests(src.parent)

        model_a = await prefetch(a, origin.file_url("model.gguf"))
        assert model_a["sources"] == {"peer": 0, "origin": size}
        ref = model_a["ref"]
        blob = blobs_of(a, model_a)["model.gguf"]
        for d in (b, c):
            await wait_until(lambda d=d: knows_ref_from(d, ref, {"a"}), timeout_s=10, what=f"{d.cfg.node_id} learns a holds {ref}")
        before = (origin.counters.requests, origin.counters.heads, origin.counters.gets, origin.counters.bytes_sent)

        model_b = await prefetch(b, ref)
        assert_from_peers(model_b, size)
        assert model_b["manifest"] == model_a["manifest"], "b uses a's manifest, verified by its digest"
        assert await view_digests(model_b) == want
        assert await metric(b, "cached_fetched_bytes_total", source="peer") == size
        assert await metric(b, "cached_fetched_bytes_total", source="origin") == 0
        assert await metric(b, "cached_piece_verify_failures_total", source="peer") == 0
        assert (origin.counters.requests, origin.counters.heads, origin.counters.gets, origin.counters.bytes_sent) == before, (
            "b resolved the ref through a peer and took every byte from peers: not one request to the origin"
        )

        await wait_until(lambda: blob_holders(c, blob) >= {"a", "b"}, timeout_s=10, what="c learns a and b hold the blob")
        model_c = await prefetch(c, ref)
        assert_from_peers(model_c, size)
        assert await view_digests(model_c) == want
        assert await metric(c, "cached_fetched_bytes_total", source="peer") == size
        assert origin.counters.requests == before[0], "c did not touch the origin either"
        # Every byte b and c hold left a or b.
        served = await metric(a, "cached_served_bytes_total") + await metric(b, "cached_served_bytes_total")
        assert served >= 2 * size


@pytest.mark.parametrize("origin_after", ["kept", "moved-away"])
async def test_a_file_directory_one_node_imported_reaches_the_others_from_peers(
    tmp_path: Path, token_file: Path, origin_after: str
) -> None:
    """``moved-away``: once a has the model, the directory is gone; b and c must not need it."""
    src = tmp_path / "src" / "my-model"
    sizes = {"config.json": 517, "weights/model-00001-of-00002.bin": 12 * MIB + 3, "weights/model-00002-of-00002.bin": 8 * MIB}
    for i, (rel, n) in enumerate(sizes.items()):
        write_random_file(src / rel, n, seed=30 + i)
    total = sum(sizes.values())
    want = await tree_digests(src)
    async with contextlib.AsyncExitStack() as stack:
        nodes = await cluster(stack, tmp_path, token_file, "abc", piece="256K")
        a, b, c = nodes["a"], nodes["b"], nodes["c"]

        model_a = await prefetch(a, f"file://{src}")
        assert model_a["sources"] == {"peer": 0, "origin": total}
        ref = model_a["ref"]
        for d in (b, c):
            await wait_until(lambda d=d: knows_ref_from(d, ref, {"a"}), timeout_s=10, what=f"{d.cfg.node_id} learns a holds {ref}")
        if origin_after == "moved-away":
            src.rename(src.with_name("elsewhere"))

        for d in (b, c):
            model = await prefetch(d, ref)
            assert_from_peers(model, total)
            assert model["manifest"] == model_a["manifest"]
            assert model["files"] == len(sizes)
            assert await view_digests(model) == want
            assert await metric(d, "cached_fetched_bytes_total", source="peer") == total
            assert await metric(d, "cached_fetched_bytes_total", source="origin") == 0


# --- four nodes at once: the origin is read about once ---------------------------------------------


@pytest.mark.parametrize(
    ("seed", "size", "piece"),
    [(41, 8 * MIB + 100, "256K"), (42, 16 * MIB, "1M"), (43, 24 * MIB - 7, "1M")],
    ids=["8MiB-256K", "16MiB-1M", "24MiB-1M"],
)
async def test_four_nodes_asking_at_once_read_the_origin_about_once(
    tmp_path: Path, token_file: Path, seed: int, size: int, piece: str
) -> None:
    src = write_random_file(tmp_path / "origin" / "model.safetensors", size, seed=seed)
    want = await tree_digests(src.parent)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        # The four daemons share this test's event loop: on a busy 2-core machine one slow gossip
        # round can exceed a 1 s suspicion timeout, and a suspected peer's pieces go to the origin
        # (as they should); this test is about single-flight, not failure detection.
        steady = {"peer.suspect_after_s": 3.0, "peer.dead_after_s": 6.0}
        nodes = await cluster(stack, tmp_path, token_file, "abcd", piece=piece, **steady)
        ref = origin.file_url("model.safetensors")

        models = await asyncio.gather(*(prefetch(d, ref) for d in nodes.values()))

        ratio = origin.counters.bytes_sent / size
        assert ratio <= 1.05, f"the origin sent {ratio:.2f}x the model for four nodes"
        for name, m in zip(nodes, models):
            assert m["bytes_total"] == m["bytes_done"] == size, name
            assert await view_digests(m) == want, f"{name} holds other bytes"
        assert len({m["manifest"] for m in models}) == 1, "all four built the same manifest"
        # Each node's sources count every byte of its copy once: an endgame pair (the last pieces
        # asked of two sources) adds one copy, never both or neither.
        assert [m["sources"]["peer"] + m["sources"]["origin"] for m in models] == [size] * 4, [m["sources"] for m in models]
        assert sum(m["sources"]["origin"] for m in models) == origin.counters.bytes_sent
