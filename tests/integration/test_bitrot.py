"""Bit rot in stored blobs: found by the background scrub or ``POST /v1/verify``, then repaired.

Bytes are flipped in a stored (0440) blob behind the daemon's back, as a bad disk would. The
background scrub (``store.scrub_interval_s``) must find them with nobody asking; ``POST /v1/verify``
must find them on demand. Repair comes from a peer that holds the same blob first -- with the
origin stopped, so that a single origin byte would have failed the repair -- and from the origin
when the node is alone or the peer's copy is rotten too. Every bad piece is counted in
``cached_verify_bad_pieces_total``; only the bad pieces travel again.

``test_verify.py`` covers verify + origin repair piece by piece; this file adds the scrub, peers,
rot on two nodes at once, and rot with no source reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient
from cached.daemon import Daemon
from cached.store.partial import read_piece_log
from cached.types import BlobId, hash_piece, piece_count, piece_span
from tests.support.cluster import (
    MIB,
    all_see_all,
    blob_holders,
    blobs_of,
    metric,
    node_flags,
    prefetch,
    token_file,  # noqa: F401 - the fixture
    view_digests,
)
from tests.support.corrupt import flip_byte
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

PIECE = 256 * 1024
SIZE = 4 * MIB + 4321  # 17 pieces, the last one short
SCRUB = {"store.scrub_interval_s": 0.5, "store.scrub_rate_bps": "1G"}


def bad_pieces_on_disk(blob: Path) -> list[int]:
    """Pieces of a stored blob whose bytes no longer match its sidecar (run in a thread)."""
    header, records = read_piece_log(blob.with_name(blob.name + ".pieces"))
    n = piece_count(header.size, header.piece_size)
    assert sorted(records) == list(range(n))
    assert BlobId.compute(header.size, header.piece_size, [records[i] for i in range(n)]).hex == blob.name
    bad = []
    with open(blob, "rb") as f:
        for i in range(n):
            off, length = piece_span(i, header.size, header.piece_size)
            if hash_piece(os.pread(f.fileno(), length, off)) != records[i]:
                bad.append(i)
    return bad


def assert_store_sound(d: Daemon) -> None:
    """Every blob under blobs/ verifies, is 0440, and no partial is left behind (thread)."""
    for p in d.store.blobs_dir.rglob("*"):
        if p.is_file() and not p.name.endswith(".pieces"):
            assert bad_pieces_on_disk(p) == [], f"blob {p.name[:16]} does not verify"
            assert stat.S_IMODE(p.stat().st_mode) == 0o440
    assert not any(d.store.partial_dir.iterdir()), sorted(os.listdir(d.store.partial_dir))


async def blob_clean(path: Path) -> bool:
    return await asyncio.to_thread(bad_pieces_on_disk, path) == []


def scrub_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("scrub done")]


def corrupt(blob: Path, pieces: list[int]) -> None:
    size = blob.stat().st_size
    for i in pieces:
        off, length = piece_span(i, size, PIECE)
        flip_byte(blob, off + min(4096, length - 1))


async def rot(blob: Path, pieces: list[int], *, check: bool = True) -> None:
    await asyncio.to_thread(corrupt, blob, pieces)
    if check:  # not while a scrub runs: it may already be repairing
        assert await asyncio.to_thread(bad_pieces_on_disk, blob) == pieces


async def pair(
    stack: contextlib.AsyncExitStack, tmp_path: Path, token_file: Path, **extra: Any
) -> tuple[Daemon, Daemon]:
    """Two nodes of one cluster, b seeded from a; returns once each lists the other alive."""
    a = await stack.enter_async_context(
        running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file, piece="256K", **extra))
    )
    b = await stack.enter_async_context(
        running_daemon(tmp_path / "b", node_id="b", **node_flags(token_file, a, piece="256K", **extra))
    )
    await wait_until(lambda: all_see_all({"a": a, "b": b}), timeout_s=15, what="a and b see each other")
    return a, b


async def verify(d: Daemon, ref: str | None = None) -> dict[str, Any]:
    async with ApiClient(d.api_address) as api:
        return await api.request("POST", "/v1/verify", body={"ref": ref} if ref else None, long=True)


async def status(d: Daemon, ref: str) -> dict[str, Any]:
    async with ApiClient(d.api_address) as api:
        return await api.request("GET", "/v1/models/status", params={"ref": ref})


# --- one node: the scrub finds it, the origin repairs it ------------------------------------------


async def test_the_background_scrub_finds_rot_and_repairs_it_from_the_origin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=301)
    want = await view_digests({"path": str(src.parent)})
    caplog.set_level(logging.INFO, logger="cached")
    async with (
        Origin(src.parent) as origin,
        running_daemon(tmp_path / "a", **{"store.piece_size_bytes": "256K", **SCRUB}) as d,
    ):
        model = await prefetch(d, origin.file_url("model.bin"))
        blob = d.store.blob_path(blobs_of(d, model)["model.bin"])
        await wait_until(lambda: scrub_reports(caplog), timeout_s=10, what="a first scrub")
        assert await metric(d, "cached_verify_bad_pieces_total") == 0
        sent, before = origin.counters.bytes_sent, len(scrub_reports(caplog))

        await rot(blob, [3, 16], check=False)  # 16: the short last piece

        # Nobody asks: the scrub, on its own schedule, finds both pieces and repairs them; a later
        # round finds the blob clean.
        def found_then_clean() -> bool:
            bad = [int(m.split()[3].removeprefix("bad_pieces=")) for m in scrub_reports(caplog)[before:]]
            return sum(bad) == 2 and bad[-1] == 0

        await wait_until(found_then_clean, timeout_s=15, what="a scrub that repairs, then a clean one")
        assert await blob_clean(blob)
        assert await metric(d, "cached_verify_bad_pieces_total") == 2, "each bad piece counted once"
        assert origin.counters.bytes_sent - sent == PIECE + (SIZE - 16 * PIECE), (
            "only the two bad pieces were read again"
        )
        assert await view_digests(model) == want
        assert os.path.samefile(Path(model["path"]) / "model.bin", blob), "the view follows the repaired blob"
        await asyncio.to_thread(assert_store_sound, d)


# --- two nodes: the peer repairs it, the origin is not even running --------------------------------


@pytest.mark.parametrize("detect", ["verify", "scrub"])
async def test_rot_is_repaired_from_a_peer_with_the_origin_stopped(
    tmp_path: Path, token_file: Path, detect: str
) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=311)
    want = await view_digests({"path": str(src.parent)})
    extra = SCRUB if detect == "scrub" else {}
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        a, b = await pair(stack, tmp_path, token_file, **extra)
        model_a = await prefetch(a, origin.file_url("model.bin"))
        model_b = await prefetch(b, model_a["ref"])
        assert model_b["sources"] == {"peer": SIZE, "origin": 0}
        blob_hex = blobs_of(a, model_a)["model.bin"]
        await wait_until(lambda: blob_holders(a, blob_hex) == {"b"}, timeout_s=10, what="a learns b holds the blob")
        await origin.stop()  # from here on, any origin read would fail the repair
        origin_bytes = origin.counters.bytes_sent
        served = await metric(b, "cached_served_bytes_total")
        from_peers = await metric(a, "cached_fetched_bytes_total", source="peer")

        blob = a.store.blob_path(blob_hex)
        await rot(blob, [0, 7, 8], check=detect != "scrub")
        if detect == "verify":
            report = await verify(a)
            assert (report["bad_pieces"], report["repaired_blobs"], report["errors"]) == (3, 1, []), report
            assert report["checked_bytes"] == SIZE
        else:
            view = Path(model_a["path"]) / "model.bin"

            async def repaired() -> bool:  # the blob replaced, and the view moved onto it
                return await blob_clean(blob) and os.path.samefile(view, blob)

            await wait_until(repaired, timeout_s=15, what="the scrub to repair the blob from b")

        assert await blob_clean(blob)
        assert await metric(a, "cached_verify_bad_pieces_total") == 3
        repair_bytes = await metric(a, "cached_fetched_bytes_total", source="peer") - from_peers
        assert repair_bytes == 3 * PIECE, "exactly the three bad pieces came from b"
        assert await metric(b, "cached_served_bytes_total") - served == 3 * PIECE
        assert origin.counters.bytes_sent == origin_bytes
        assert await view_digests(await status(a, model_a["ref"])) == want
        assert (await verify(a))["bad_pieces"] == 0
        await asyncio.to_thread(assert_store_sound, a)


async def test_rot_on_both_nodes_at_one_piece_takes_that_piece_from_the_origin(
    tmp_path: Path, token_file: Path
) -> None:
    """The peer's copy of piece 7 is rotten too: its bytes are refused, the origin supplies that one
    piece, the peer the other; then the peer heals its own piece 7 from the repaired node."""
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=321)
    want = await view_digests({"path": str(src.parent)})
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        a, b = await pair(stack, tmp_path, token_file)
        model_a = await prefetch(a, origin.file_url("model.bin"))
        await prefetch(b, model_a["ref"])
        blob_hex = blobs_of(a, model_a)["model.bin"]
        await wait_until(
            lambda: blob_holders(a, blob_hex) == {"b"} and blob_holders(b, blob_hex) == {"a"},
            timeout_s=10,
            what="each knows the other holds the blob",
        )
        await rot(a.store.blob_path(blob_hex), [2, 7])
        await rot(b.store.blob_path(blob_hex), [7])
        origin.reset()

        report = await verify(a)
        assert (report["bad_pieces"], report["repaired_blobs"], report["errors"]) == (2, 1, []), report
        assert await metric(a, "cached_piece_verify_failures_total", source="peer") >= 1, (
            "b's rotten piece 7 was refused"
        )
        assert origin.counters.ranges == [f"{7 * PIECE}-{8 * PIECE - 1}"], "the origin supplied piece 7 only"
        assert await blob_clean(a.store.blob_path(blob_hex))

        # b finds its own rot and repairs it from a, now sound: no origin byte.
        report = await verify(b)
        assert (report["bad_pieces"], report["repaired_blobs"], report["errors"]) == (1, 1, []), report
        assert origin.counters.bytes_sent == PIECE
        for d in (a, b):
            assert await view_digests(await status(d, model_a["ref"])) == want
            await asyncio.to_thread(assert_store_sound, d)


# --- no source reachable: reported, withdrawn, fetched again later ------------------------------------


async def test_rot_with_no_source_reachable_is_reported_withdrawn_and_fetched_again_later(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=331)
    want = await view_digests({"path": str(src.parent)})
    flags = {"store.piece_size_bytes": "256K", "origins.http.retries": 1}
    async with running_daemon(tmp_path / "a", **flags) as d:
        origin = await Origin(src.parent).start()
        port = origin.port
        ref = origin.file_url("model.bin")
        try:
            model = await prefetch(d, ref)
        finally:
            await origin.stop()
        blob = d.store.blob_path(blobs_of(d, model)["model.bin"])
        await rot(blob, [5])

        report = await verify(d)
        assert (report["bad_pieces"], report["repaired_blobs"]) == (1, 0), report
        assert len(report["errors"]) == 1 and "cannot connect" in report["errors"][0], report["errors"]
        assert await metric(d, "cached_verify_bad_pieces_total") == 1
        # Known-bad bytes are never served: the model is withdrawn rather than left "ready".
        async with ApiClient(d.api_address) as api:
            status = await api.request("GET", "/v1/models/status", params={"ref": ref})
        assert status["state"] == "absent" and not Path(model["path"]).exists(), status
        await asyncio.to_thread(assert_store_sound, d)

        origin = await Origin(src.parent).start(port)  # back, at the same URL
        try:
            again = await prefetch(d, ref)
        finally:
            await origin.stop()
        assert await view_digests(again) == want
        await asyncio.to_thread(assert_store_sound, d)
