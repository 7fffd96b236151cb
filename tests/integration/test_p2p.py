"""Peer-to-peer transfer between real daemons on 127.0.0.1 (static seeds, mDNS off).

A model one node fetched from the origin reaches the others from that node, not from the origin:
they resolve the ref at the origin (one HEAD: names come from origins, issue 18), take the blob
ids from a peer's manifest that agrees with it, every byte from peers, and end up with the same
files. A file:// ref is local to the node that imported it: peers never learn it or its bytes. Several nodes that ask for the same
model at the same moment read the origin about once between them (each piece through its
rendezvous owner only) and all end up with the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.cluster import (  # noqa: F401 - token_file is a fixture
    MIB,
    assert_from_peers,
    blob_holders,
    blobs_of,
    cluster,
    knows_ref_from,
    metric,
    prefetch,
    token_file,
    tree_digests,
    view_digests,
)
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

# --- one node fetched it: the others take it from peers ---------------------------------------------


async def test_an_http_file_one_node_fetched_reaches_the_others_without_touching_the_origin(
    tmp_path: Path, token_file: Path
) -> None:
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
            await wait_until(
                lambda d=d: knows_ref_from(d, ref, {"a"}), timeout_s=10, what=f"{d.cfg.node_id} learns a holds {ref}"
            )
        before = (origin.counters.requests, origin.counters.heads, origin.counters.gets, origin.counters.bytes_sent)

        model_b = await prefetch(b, ref)
        assert_from_peers(model_b, size)
        assert model_b["manifest"] == model_a["manifest"], (
            "b's own manifest, from the origin's answer, is the same as a's"
        )
        assert await view_digests(model_b) == want
        assert await metric(b, "cached_fetched_bytes_total", source="peer") == size
        assert await metric(b, "cached_fetched_bytes_total", source="origin") == 0
        assert await metric(b, "cached_piece_verify_failures_total", source="peer") == 0
        after = (origin.counters.requests, origin.counters.heads, origin.counters.gets, origin.counters.bytes_sent)
        assert after == (before[0] + 1, before[1] + 1, before[2], before[3]), (
            "b resolved the ref at the origin (one HEAD) and took every byte from peers"
        )

        await wait_until(
            lambda: blob_holders(c, blob) >= {"a", "b"}, timeout_s=10, what="c learns a and b hold the blob"
        )
        model_c = await prefetch(c, ref)
        assert_from_peers(model_c, size)
        assert await view_digests(model_c) == want
        assert await metric(c, "cached_fetched_bytes_total", source="peer") == size
        assert (origin.counters.gets, origin.counters.bytes_sent) == before[2:], "c read no byte from the origin either"
        # Every byte b and c hold left a or b.
        served = await metric(a, "cached_served_bytes_total") + await metric(b, "cached_served_bytes_total")
        assert served >= 2 * size


@pytest.mark.parametrize("origin_after", ["kept", "moved-away"])
async def test_a_file_directory_one_node_imported_stays_on_that_node(
    tmp_path: Path, token_file: Path, origin_after: str
) -> None:
    """file:// names a path on one node (issue 18): peers never learn the ref, never resolve it
    through the node that imported it, and take none of its bytes. ``kept``: b imports the same
    path from its own disk; ``moved-away``: the path is gone on b, so b has nothing to import."""
    src = tmp_path / "src" / "my-model"
    sizes = {
        "config.json": 517,
        "weights/model-00001-of-00002.bin": 12 * MIB + 3,
        "weights/model-00002-of-00002.bin": 8 * MIB,
    }
    for i, (rel, n) in enumerate(sizes.items()):
        write_random_file(src / rel, n, seed=30 + i)
    total = sum(sizes.values())
    want = await tree_digests(src)
    async with contextlib.AsyncExitStack() as stack:
        nodes = await cluster(stack, tmp_path, token_file, "ab", piece="256K")
        a, b = nodes["a"], nodes["b"]

        model_a = await prefetch(a, f"file://{src}")
        assert model_a["sources"] == {"peer": 0, "origin": total}
        ref = model_a["ref"]
        # b hears from a (gossip rounds pass) but never of this ref.
        rounds = await metric(b, "cached_gossip_rounds_total")
        await wait_until(
            lambda: metric_above(b, "cached_gossip_rounds_total", rounds + 5), timeout_s=10, what="gossip rounds"
        )
        assert not knows_ref_from(b, ref, {"a"})
        if origin_after == "moved-away":
            src.rename(src.with_name("elsewhere"))
            async with ApiClient(b.api_address) as api:
                with pytest.raises(ApiError) as e:
                    await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
            assert e.value.status == 404, (e.value.status, e.value.code, str(e.value))
            assert await metric(b, "cached_fetched_bytes_total", source="peer") == 0
            return
        model = await prefetch(b, ref)
        assert model["sources"] == {"peer": 0, "origin": total}, "b read its own disk, nothing from a"
        assert await view_digests(model) == want
        assert await metric(a, "cached_served_bytes_total") == 0


async def metric_above(d: object, name: str, value: float) -> bool:
    return await metric(d, name) > value  # type: ignore[arg-type]


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
        assert [m["sources"]["peer"] + m["sources"]["origin"] for m in models] == [size] * 4, [
            m["sources"] for m in models
        ]
        assert sum(m["sources"]["origin"] for m in models) == origin.counters.bytes_sent
